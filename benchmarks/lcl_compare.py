"""LCL against its baselines on shapes-world documents: same data, same steps, then frozen-encoder evaluation.

For each objective (``lcl``, ``clip``, ``gen``, ``emu``) it trains the ``lcl`` task from ``configs/lcl_tiny.yaml``
through the real training loop on the same interleaved documents (the CLIP-style baseline reads each document
image with its sentence: the same images in the same order), then scores the FROZEN encoder of each, and of a
randomly initialised one, with :func:`vlpretrain.lcl.evaluate.evaluate` (attentive probes on object attributes,
zero-shot classification, retrieval). Finished runs are reused.

    python -m benchmarks.lcl_compare --out runs/lcl_compare [--steps 600] [--objectives lcl,clip,gen,emu] \
        [--probe-seeds 0,1,2]

The probe columns are means over the probe seeds (the probe's own initialisation and shuffling); the per-seed probe
means are listed under the table, so that a gap can be read against the probe's own spread.
Writes ``OUT/results.json`` and ``OUT/table.md`` (the table in docs/lcl.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vlpretrain.configs import load_config
from vlpretrain.data.synth_write import write_shapes_world
from vlpretrain.data.synthetic import SynthConfig
from vlpretrain.eval.probe import ProbeConfig
from vlpretrain.lcl.evaluate import (
    PROBE_LR,
    EvalSets,
    evaluate,
    probe_attributes,
    read_synth_config,
    synth_eval_sets,
)
from vlpretrain.train.checkpoint import latest_checkpoint
from vlpretrain.train.config import TrainConfig
from vlpretrain.train.loop import train
from vlpretrain.train.pretrained import load_task
from vlpretrain.train.task import build_task, task_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG, SYNTH = CONFIGS / "lcl_tiny.yaml", CONFIGS / "lcl_synth.yaml"
COLUMNS = ("probe_count", "probe_color", "probe_shape", "probe_size", "probe_mean", "zero_shot_count",
           "zero_shot_color", "zero_shot_shape", "retrieval_r_mean")  # fmt: skip


def make_data(root: Path, overrides: list[str]) -> None:
    """The shapes world of ``configs/lcl_synth.yaml`` (with ``overrides``) unless ``root`` already holds one."""
    if (root / "stats.json").is_file():
        return
    write_shapes_world(load_config(SynthConfig, "synth", SYNTH, overrides), root, workers=2, progress=True)


def train_objective(objective: str, data: Path, out: Path, steps: int, overrides: list[str]) -> dict[str, Any]:
    """Train one objective (or reuse a finished run); returns its wall time and last logged metrics."""
    run = out / objective
    record = run / "run.json"
    if record.is_file() and latest_checkpoint(run / "checkpoints") is not None:
        return json.loads(record.read_text())
    sets = [f"model.objective={objective}", f"data.train={data / 'train' / 'docs.jsonl'}", "data.val=",
            f"steps={steps}", f"out_dir={run}", "log.progress=false", *overrides]  # fmt: skip
    cfg = load_config(TrainConfig, "train", CONFIG, sets)
    start = time.perf_counter()
    last = train(cfg)
    info = {"objective": objective, "steps": steps, "train_seconds": round(time.perf_counter() - start, 1),
            "last": {k: v for k, v in last.items() if isinstance(v, int | float)}}  # fmt: skip
    record.write_text(json.dumps(info, indent=2) + "\n")
    return info


def score(model: torch.nn.Module, sets: EvalSets, config: ProbeConfig, seeds: list[int]) -> dict[str, Any]:
    """All metrics with the first probe seed; the ``probe_*`` ones averaged over ``seeds`` (``probe_mean_by_seed``
    keeps each seed's mean)."""
    metrics: dict[str, Any] = evaluate(model, sets, config=replace(config, seed=seeds[0]))
    runs = [{k: v for k, v in metrics.items() if k.startswith("probe_")}]
    runs += [probe_attributes(model, sets, replace(config, seed=seed)) for seed in seeds[1:]]
    for key in runs[0]:
        metrics[key] = sum(r[key] for r in runs) / len(runs)
    metrics["probe_mean_by_seed"] = [round(r["probe_mean"], 3) for r in runs]
    return metrics


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per encoder."""
    head = "| encoder | steps | train s | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, r in results.items():
        cells = [f"{r['metrics'].get(c, float('nan')):.3f}" for c in COLUMNS]
        lines.append(f"| {name} | {r.get('steps', 0)} | {r.get('train_seconds', 0):.0f} | " + " | ".join(cells) + " |")
    seeds = [f"{name} {r['metrics']['probe_mean_by_seed']}" for name, r in results.items()
             if len(r["metrics"].get("probe_mean_by_seed", [])) > 1]  # fmt: skip
    if seeds:
        lines += ["", "probe mean per probe seed: " + "; ".join(seeds)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/lcl_compare"))
    parser.add_argument("--data", type=Path, default=None, help="shapes-world folder (default OUT/data, generated)")
    parser.add_argument("--synth", action="append", default=[], help="data override when generating (repeatable)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--objectives", default="lcl,clip,gen,emu")
    parser.add_argument("--probe-epochs", type=int, default=20)
    parser.add_argument("--probe-seeds", default="0", help="comma-separated probe seeds; probe columns are their mean")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="train config override (repeatable)")
    args = parser.parse_args()
    data = args.data or args.out / "data"
    make_data(data, args.synth)
    results: dict[str, dict[str, Any]] = {}
    for objective in args.objectives.split(","):
        results[objective] = train_objective(objective, data, args.out, args.steps, args.sets)
    sets = synth_eval_sets(2000, 1000, read_synth_config(data))
    probe_cfg = ProbeConfig(kind="attentive", epochs=args.probe_epochs, lr=PROBE_LR)
    torch.manual_seed(0)
    base = load_config(TrainConfig, "train", CONFIG, args.sets)
    model_cfg = task_config("lcl", base.model_preset, base.model)
    encoders = {"random init": build_task("lcl", model_cfg)}
    encoders |= {name: load_task(args.out / name, expect_task="lcl")[0] for name in results}
    for name, model in encoders.items():
        start = time.perf_counter()
        metrics = score(model, sets, probe_cfg, [int(s) for s in args.probe_seeds.split(",")])
        results.setdefault(name, {"objective": name, "steps": 0, "train_seconds": 0})
        results[name] |= {"metrics": metrics, "eval_seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps({k: v if isinstance(v, list) else round(v, 3) for k, v in metrics.items()}), flush=True)
    results = {"random init": results.pop("random init"), **results}
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args) | {"out": str(args.out),
            "data": str(data)}}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
