"""The paper's dynamic-vs-fixed ablation at the demo's scale: the same LM budget on the dynamic tokens and on all N.

Both runs train the demo's unified LM (``vlpretrain.demo.LM_RECIPE``, batch 32 pairs, ``--steps`` steps) on the
demo's frozen tokenizer; the fixed run sets ``model.visual_keep: all`` so that every patch of every image becomes a
visual token, in both image orders. Both are then evaluated like the demo (captions, VQA and judge-scored
text-to-image on held-out images; the detokenizer was trained on the dynamic tokens, so the fixed run's drawings
go through a decoder that has not seen 64-token sequences). Needs a finished demo folder (data, judge, tokenizer,
detokenizer)::

    python -m benchmarks.lavit_dynamic_vs_fixed --demo runs/demo --out runs/lavit_fixed

Writes ``results.json`` and ``table.md`` into ``--out``; a finished run is reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

VARIANTS = {"dynamic": "", "fixed (all patches)": "all"}
COLUMNS = ("tokens_mean", "train_s", "pairs_per_s", "tok_per_s", "pad_frac", "caption_attr_f1", "vqa_accuracy",
           "t2i_prompt_match")  # fmt: skip


def train_variant(demo: Path, out: Path, keep: str, steps: int) -> float:
    """Train one LM into ``out`` (resuming); returns the wall seconds of this call."""
    from vlpretrain.configs import from_dict
    from vlpretrain.demo import LM_RECIPE
    from vlpretrain.train.config import TrainConfig
    from vlpretrain.train.loop import train

    config = {
        "task": "lavit-lm", "model_preset": "tiny", "steps": steps, "out_dir": str(out),
        "model": {"tokenizer": str(demo / "tokenizer"), "detokenizer": str(demo / "detokenizer"), "visual_keep": keep},
        "data": {"train": str(demo / "data" / "train"), "batch_size": 32, "num_workers": 1},
        **LM_RECIPE,
    }  # fmt: skip
    start = time.perf_counter()
    train(from_dict(TrainConfig, config), resume=True)
    return time.perf_counter() - start


def logged_means(run: Path) -> dict[str, float]:
    """Mean tokens/s and padding fraction over the logged steps after the first (warm-up) log line."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"tok_per_s"' in line]
    rows = rows[1:] or rows
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("tok_per_s", "pad_frac")}


def run_variant(demo: Path, out: Path, keep: str, steps: int, limit: int) -> dict[str, Any]:
    """Train and evaluate one variant; cached in ``out/result.json``."""
    from vlpretrain.eval.lm_quality import run as lm_eval

    cached = out / "result.json"
    if cached.exists():
        return json.loads(cached.read_text())
    seconds = train_variant(demo, out, keep, steps)
    result: dict[str, Any] = {"train_s": round(seconds, 1), "pairs_per_s": round(steps * 32 / seconds, 2)}
    result |= logged_means(out)
    result |= lm_eval(out, demo / "data" / "test", demo / "judge", detokenizer=demo / "detokenizer", limit=limit,
                      out=out / "eval")  # fmt: skip
    result["tokens_mean"] = _visual_tokens(out, demo, limit)
    cached.write_text(json.dumps(result, indent=2))
    return result


def _visual_tokens(run: Path, demo: Path, limit: int) -> float:
    """Mean visual tokens per held-out image as the trained LM's tokenizer sees them."""
    from vlpretrain.data.shards import read_records
    from vlpretrain.lavit.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(run)
    images, _ = read_records(str(demo / "data" / "test"), limit=limit)
    frozen = pipe.model.frozen_visual(pipe.pixels(images), [False] * len(images))
    return round(float(frozen.keep_BN.sum(dim=1).mean()), 2)


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| variant | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, res in results.items():
        cells = [f"{res[c]:.3g}" if isinstance(res.get(c), float) else str(res.get(c, "-")) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo folder")
    parser.add_argument("--out", default="runs/lavit_fixed")
    parser.add_argument("--steps", type=int, default=300, help="LM steps of each variant (the demo's 300)")
    parser.add_argument("--limit", type=int, default=200, help="held-out images evaluated")
    args = parser.parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    for part in ("data", "judge", "tokenizer", "detokenizer"):
        if not (demo / part).is_dir():
            parser.error(f"{demo / part}: missing; run `make demo` (or `vlpretrain demo --out {demo}`) first")
    results = {}
    for name, keep in VARIANTS.items():
        results[name] = run_variant(demo, out / (keep or "dynamic"), keep, args.steps, args.limit)
        print(name, json.dumps(results[name]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
