"""The end-to-end demo (`vlpretrain demo`, run by `make demo`) on the built-in shapes world.

Stages, each in its own folder under the run folder and skipped when already finished (a second run reuses them):

1. ``data``       synthesise the shapes world (pair shards, QA, interleaved documents) and inspect it (sample grid);
2. ``judge``      train the shapes-world judge and measure its per-attribute accuracy on the test split;
3. ``encoder``    pretrain the small frozen ViT the tokenizer reads (dense per-patch attribute supervision);
4. ``tokenizer``  train LaVIT's dynamic tokenizer through the shared loop and evaluate it on the test split;
5. ``detokenizer`` train the diffusion decoder on the frozen tokenizer; the judge scores test reconstructions;
6. ``lm``         train the unified LM; captions, VQA and text-to-image on the test split, scored against the
                  ground truth and by the judge;
7. ``report``     write ``report.html``, one self-contained page of every stage's results (:mod:`vlpretrain.report`).

``metrics.json`` in the run folder collects every stage's numbers; a summary table is printed at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


@dataclass(frozen=True)
class DemoSize:
    """How much work each stage does: the full demo, or a smoke-test size (``vlpretrain demo --smoke``)."""

    synth_preset: str = "demo"
    judge_steps: int | None = None  # None: the preset's
    encoder_steps: int | None = None
    tokenizer_steps: int = 1000  # with the ratio multiplier; 500 steps left the selector unsettled (docs/lavit.md)
    detokenizer_steps: int = 1600  # tiny-fold4: judge agreement 0.75 at about the cost of 600 steps of tiny (0.61)
    lm_understand_steps: int = 450  # stage 1 of the LM: [image, text] samples only (docs/lm.md, "Curriculum")
    lm_steps: int = 1500  # stage 2: 85 % of the pairs [text, image] (docs/lm.md, "A generation-heavy stage 2")
    codec_shards: int = 5  # the tokenizer and detokenizer train on the first 5 shards (5,000 pairs, as measured)
    eval_images: int = 200  # test images of the detokenizer and LM evaluations
    t2i_prompts: int = 200  # the first 64 alone moved by up to 0.07 between draw seeds (docs/lm.md)


FULL = DemoSize()
SMOKE = DemoSize(synth_preset="tiny", judge_steps=10, encoder_steps=3, tokenizer_steps=6, detokenizer_steps=2,
                 lm_understand_steps=2, lm_steps=2, eval_images=4, t2i_prompts=2)  # fmt: skip


@dataclass
class Stage:
    """A resumable step of the demo: ``run(run_dir, folder, size) -> metrics``; ``done.json`` marks it finished."""

    name: str
    run: Callable[[Path, Path, DemoSize], dict[str, Any]]


def _data_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    from vlpretrain.configs import get_preset
    from vlpretrain.data.inspect import inspect_shards
    from vlpretrain.data.synth_write import write_shapes_world

    stats = write_shapes_world(get_preset("synth", size.synth_preset), folder, workers=2)
    summary = inspect_shards(str(folder / "train" / "*.tar"), grid_png=folder / "grid.png", n_grid=16)
    return {
        "images": {split: s["images"] for split, s in stats["splits"].items()},
        "docs": {split: s["docs"] for split, s in stats["splits"].items()},
        "seconds": stats["seconds"],
        "caption_words_mean": summary["caption_words"]["mean"],
    }


def _judge_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    from vlpretrain.configs import get_preset
    from vlpretrain.data.judge import evaluate_judge, save_judge, train_judge
    from vlpretrain.data.shards import read_records
    from vlpretrain.data.synthetic import SynthConfig

    judge = train_judge(get_preset("judge", "default"), SynthConfig(), steps=size.judge_steps)
    save_judge(judge, folder)
    images, records = read_records(str(run_dir / "data" / "test" / "*.tar"))
    return {"test_accuracy": evaluate_judge(judge, images, records)}


def _encoder_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    import dataclasses

    from vlpretrain.configs import get_preset
    from vlpretrain.data.synthetic import SynthConfig
    from vlpretrain.lavit.demo_encoder import pretrain_demo_encoder, save_demo_encoder

    cfg = get_preset("demo-encoder", "tiny")
    if size.encoder_steps is not None:
        cfg = dataclasses.replace(cfg, steps=size.encoder_steps, pool_size=cfg.batch_size, eval_images=32)
    vit, metrics = pretrain_demo_encoder(cfg, SynthConfig())
    save_demo_encoder(vit, folder / ENCODER_FILE, metrics)
    return {k: v for k, v in metrics.items() if "acc" in k}


def _codec_train(run_dir: Path, size: DemoSize) -> str:
    """The training shards of the tokenizer and detokenizer stages: the first ``size.codec_shards`` of the data's
    train split (the LM reads them all; docs/lm.md, "More images and cheaper steps")."""
    shards = sorted((run_dir / "data" / "train").glob("*.tar"))[: size.codec_shards]
    return "::".join(str(s) for s in shards)


def _tokenizer_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    from vlpretrain.configs import from_dict
    from vlpretrain.data.shards import read_records
    from vlpretrain.eval.tokenizer_stats import run as tokenizer_stats
    from vlpretrain.lavit.api import Tokenizer
    from vlpretrain.train.config import TrainConfig
    from vlpretrain.train.loop import train

    cfg = from_dict(TrainConfig, {
        "task": "lavit-tokenizer", "model_preset": "tiny", "out_dir": str(folder),
        "model": {"encoder": {"kind": "eva", "preset": "tiny", "path": str(run_dir / "encoder" / ENCODER_FILE)}},
        "data": {"train": _codec_train(run_dir, size), "batch_size": 64, "num_workers": 1},
        **TOKENIZER_RECIPE, "steps": size.tokenizer_steps,
    })  # fmt: skip
    train(cfg, resume=True)
    images, records = read_records(str(run_dir / "data" / "test"))
    return tokenizer_stats(Tokenizer.from_pretrained(folder), images, records, progress=True)


def _detokenizer_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    from vlpretrain.eval.reconstruction import run as reconstruction_eval

    _train_stage(folder, {
        "task": "lavit-detokenizer", "model_preset": "tiny-fold4", "model": {"tokenizer": str(run_dir / "tokenizer")},
        "data": {"train": _codec_train(run_dir, size), "batch_size": 32, "num_workers": 1},
        **DETOKENIZER_RECIPE, "steps": size.detokenizer_steps,
    })  # fmt: skip
    return reconstruction_eval(folder, run_dir / "data" / "test", run_dir / "judge", limit=size.eval_images,
                               grid=folder / "reconstructions.png")  # fmt: skip


def lm_stage_config(run_dir: Path, folder: Path, size: DemoSize, generate: bool) -> dict[str, Any]:
    """The ``lavit-lm`` run of LM stage 1 (understanding) or, with ``generate``, stage 2 (the mixture, from stage 1's
    weights in ``run_dir / "lm_understand"``) on the demo's data, trained into ``folder``."""
    model = {**LM_MODEL, **(LM_GENERATE if generate else LM_UNDERSTAND)}
    if generate:
        model["init"] = str(run_dir / "lm_understand")
    return {
        "task": "lavit-lm", "model_preset": "tiny",
        "model": {"tokenizer": str(run_dir / "tokenizer"), "detokenizer": str(run_dir / "detokenizer"), **model},
        "data": {"train": str(run_dir / "data" / "train"), "batch_size": 32, "num_workers": 1},
        **LM_RECIPE, "optim": {**LM_RECIPE["optim"], **(LM_GENERATE_LR if generate else {})},
        "steps": size.lm_steps if generate else size.lm_understand_steps, "out_dir": str(folder),
    }  # fmt: skip


def _lm_understand_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    _train_stage(folder, lm_stage_config(run_dir, folder, size, generate=False))
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return {"steps": last["step"], "ce_understand": round(last["ce_understand"], 4)}


def _lm_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    from vlpretrain.eval.lm_quality import run as lm_eval

    _train_stage(folder, lm_stage_config(run_dir, folder, size, generate=True))
    return lm_eval(folder, run_dir / "data" / "test", run_dir / "judge", detokenizer=run_dir / "detokenizer",
                   limit=size.eval_images, t2i_limit=size.t2i_prompts, out=folder / "eval")  # fmt: skip


def _report_stage(run_dir: Path, folder: Path, size: DemoSize) -> dict[str, Any]:
    from vlpretrain.report import write_report

    return {"report": str(write_report(run_dir, limit=size.eval_images))}


def _train_stage(folder: Path, config: dict[str, Any]) -> None:
    """Train (resuming from the stage folder's checkpoints) the run described by ``config`` into ``folder``."""
    from vlpretrain.configs import from_dict
    from vlpretrain.train.config import TrainConfig
    from vlpretrain.train.loop import train

    train(from_dict(TrainConfig, {**config, "out_dir": str(folder)}), resume=True)


# The demo's tokenizer recipe (also what docs/lavit.md reports): the 10-minute CPU budget of the tiny preset.
TOKENIZER_RECIPE: dict[str, Any] = {
    "optim": {"lr": 2e-3, "weight_decay": 0.01, "betas": [0.9, 0.99]},
    "schedule": {"warmup_steps": 50},
    "checkpoint": {"every": 200, "keep_last": 1},
    "log": {"every": 20},
}
# The detokenizer's recipe (configs/lavit_detokenizer_tiny.yaml's) on the tiny-fold4 preset: 4 x 4-folded pixels make a
# step about 2.7x cheaper than tiny's 2 x 2, so 1600 steps cost about what 600 did (docs/detokenizer.md, "Folding").
DETOKENIZER_RECIPE: dict[str, Any] = {
    "optim": {"lr": 2e-3, "weight_decay": 0.01, "betas": [0.9, 0.99]},
    "schedule": {"warmup_steps": 30},
    "checkpoint": {"every": 200, "keep_last": 1},
    "log": {"every": 20},
}
LM_RECIPE: dict[str, Any] = {
    # No weight decay on the word embeddings and output rows: decayed, the rows of words that the LM has not yet
    # learned to tell apart (the eight colours) collapse towards each other and colour is never learned (docs/lm.md).
    "optim": {
        "lr": 2e-3,
        "lr_groups": {"visual.": 3e-3},
        "weight_decay": 0.1,
        "no_decay": ["embed_tokens", "lm_head"],
        "betas": [0.9, 0.95],
        "eps": 1e-6,
    },
    "schedule": {"warmup_steps": 30},
    "checkpoint": {"every": 100, "keep_last": 1},
    "log": {"every": 10},
}
# The LM curriculum (docs/lm.md, "Curriculum"): stage 1 trains understanding only ([image, text] pairs, half of
# them VQA with six questions each: the tiny preset's qa_ratio and qa_turns, docs/lm.md "Several questions per
# image" and "Yes and no about the same image"; no text-only documents), stage 2 starts from it with both image
# orders and text-only documents, weighted towards generation: 85 % of the pairs [text, image] and one text-only
# document per four pairs (the paper's mixture is 1/2 and 2:1; docs/lm.md "A generation-heavy stage 2" and
# "Stage 2: a lower learning rate, fewer understanding samples"). vit_proj
# stays at its random init in both (docs/lm.md, "Where the colour goes"); the code rows start from the codebook
# (the tiny preset's code_rows_init).
LM_MODEL: dict[str, Any] = {"train_vit_proj": False}
LM_UNDERSTAND: dict[str, Any] = {"understand_ratio": 1.0, "text_ratio": 0.0}
LM_GENERATE: dict[str, Any] = {"understand_ratio": 0.15, "text_ratio": 0.25}
# Stage 2's peak learning rates (LLM, the visual part 1.5x): it learns its codes faster at 1.4e-3 than at the
# recipe's 2e-3, which stage 1 keeps (three data orders; docs/lm.md, "Stage 2: a lower learning rate, fewer
# understanding samples").
LM_GENERATE_LR: dict[str, Any] = {"lr": 1.4e-3, "lr_groups": {"visual.": 2.1e-3}}
ENCODER_FILE = "vit.safetensors"

STAGES = [
    Stage("data", _data_stage),
    Stage("judge", _judge_stage),
    Stage("encoder", _encoder_stage),
    Stage("tokenizer", _tokenizer_stage),
    Stage("detokenizer", _detokenizer_stage),
    Stage("lm_understand", _lm_understand_stage),
    Stage("lm", _lm_stage),
    Stage("report", _report_stage),
]


def run_demo(out: str | Path, size: DemoSize = FULL) -> dict[str, Any]:
    """Run (or finish) every demo stage under ``out``; returns and writes ``out/metrics.json``."""
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    warn_if_cores_busy()
    metrics: dict[str, Any] = {}
    for stage in STAGES:
        folder = run_dir / stage.name
        done = folder / "done.json"
        if done.is_file():
            console.print(f"[green]✓[/green] {stage.name}: already done ({folder})")
            metrics[stage.name] = json.loads(done.read_text())
            continue
        console.rule(f"demo stage: {stage.name}")
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = stage.run(run_dir, folder, size) | {"stage_seconds": round(time.perf_counter() - start, 1)}
        done.write_text(json.dumps(result, indent=2) + "\n")
        metrics[stage.name] = result
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    console.print(summary_table(metrics))
    return metrics


def warn_if_cores_busy() -> None:
    """A one-line warning when other processes already load the CPU while torch will use every core: its threads
    then wait on each other (measured on the 2-core machine with one core busy: the tokenizer stage ran at 6 images/s
    with 2 threads against 80 with ``OMP_NUM_THREADS=1``)."""
    import torch

    busy = os.getloadavg()[0]
    threads = torch.get_num_threads()
    if threads > 1 and busy > 0.5 and "OMP_NUM_THREADS" not in os.environ:
        console.print(f"[yellow]warning:[/yellow] load average {busy:.1f} before the demo starts and torch uses "
                      f"{threads} threads; on a busy machine OMP_NUM_THREADS={max(1, threads - round(busy))} "
                      "is much faster")  # fmt: skip


def summary_table(metrics: dict[str, Any]) -> Table:
    """One row per reported number: stage, metric, value."""
    table = Table("stage", "metric", "value", title="vlpretrain demo")
    for stage, values in metrics.items():
        for key, value in _flatten(values):
            table.add_row(stage, key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows
