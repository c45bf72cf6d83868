"""benchmarks/lm_visual_probe.py on a micro LaVIT LM with a random tokenizer."""

from __future__ import annotations

from test_lavit_lm import micro_task

from benchmarks.lm_visual_probe import visual_input_probes


def test_probes_report_both_stages_with_accuracies() -> None:
    out = visual_input_probes(micro_task().eval(), num_images=40)
    assert out["object_tokens"] >= 10
    for stage in ("merged", "projected"):
        assert set(out[stage]) == {"shape", "color"}
        assert all(0.0 <= acc <= 1.0 for acc in out[stage].values())
    # pure colour is linear in the pixels, so even a random encoder + merger keeps some of it
    assert out["merged"]["color"] > 1 / 8
