"""The demo runs every stage end to end (smoke size), writes metrics.json, and a second run reuses finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpretrain.demo import FULL, SMOKE, STAGES, lm_stage_config, run_demo


def test_demo_smoke_runs_every_stage_and_resumes(tmp_path: Path, capsys) -> None:
    metrics = run_demo(tmp_path, SMOKE)
    names = [stage.name for stage in STAGES]
    assert list(metrics) == names
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["data"]["images"] == {"train": 256, "val": 64, "test": 64}
    assert (tmp_path / "data" / "grid.png").stat().st_size > 1000
    assert set(metrics["judge"]["test_accuracy"]) >= {"count", "colors", "shapes"}
    assert (tmp_path / "encoder" / "vit.safetensors").exists()
    assert {"tokens_mean", "rec_cos", "code_usage"} <= set(metrics["tokenizer"])
    assert "agree_mean" in metrics["detokenizer"] and (tmp_path / "detokenizer" / "reconstructions.png").exists()
    assert metrics["lm_understand"]["steps"] == 2 and metrics["lm_understand"]["ce_understand"] > 0
    lm_config = json.loads(next((tmp_path / "lm" / "checkpoints").glob("step-*/config.json")).read_text())
    assert lm_config["model"]["init"] == str(tmp_path / "lm_understand")  # stage 2 starts from stage 1
    assert {"caption_attr_f1", "vqa_accuracy", "t2i_prompt_match"} <= set(metrics["lm"])
    assert (tmp_path / "lm" / "eval" / "samples.json").exists()
    report = (tmp_path / "report.html").read_text()
    assert metrics["report"]["report"] == str(tmp_path / "report.html")
    for section in ("metrics", "complexity", "keep-masks", "samples", "reconstructions", "text-to-image", "training",
                    "data"):  # fmt: skip
        assert f'<section id="{section}">' in report
    assert report.count("data:image/png;base64,") >= 5 and "<svg" in report and "not available" not in report
    capsys.readouterr()
    again = run_demo(tmp_path, SMOKE)
    assert json.dumps(again, sort_keys=True) == json.dumps(metrics, sort_keys=True)  # NaN-safe comparison
    assert capsys.readouterr().out.count("already done") == len(names)


def test_demo_warns_when_the_cpu_is_already_busy(monkeypatch) -> None:
    import torch

    from vlpretrain import demo

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for load, expected in ((1.2, "OMP_NUM_THREADS=1"), (0.1, "")):
        monkeypatch.setattr(demo.os, "getloadavg", lambda load=load: (load, load, load))
        with demo.console.capture() as captured:
            demo.warn_if_cores_busy()
        assert (expected in captured.get()) and (bool(captured.get()) == bool(expected)), (load, captured.get())


@pytest.mark.parametrize(
    ("yaml_name", "generate"), [("lavit_lm_understand_tiny.yaml", False), ("lavit_lm_tiny.yaml", True)]
)
def test_lm_config_files_hold_the_demo_lm_recipe(yaml_name: str, generate: bool) -> None:
    from vlpretrain.configs import load_yaml

    run_dir = Path("runs/demo")
    demo = lm_stage_config(run_dir, run_dir / "lm", FULL, generate=generate)
    config = load_yaml(Path(__file__).parents[1] / "configs" / yaml_name)
    for key in ("task", "model_preset", "steps", "optim", "schedule"):
        assert config[key] == demo[key], key
    assert config["data"]["batch_size"] == demo["data"]["batch_size"]
    model = {k: v for k, v in demo["model"].items() if k != "init"}
    assert {k: config["model"][k] for k in model} == model
    assert ("init" in config["model"]) == generate
