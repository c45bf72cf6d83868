"""`vlpretrain train CONFIG.yaml [--set key=value ...] [--resume]` (also under torchrun)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from vlpretrain.cli.common import config_options


def train(
    config: Path = typer.Argument(..., help="Run config YAML (task, model, data, optim, ...)."),
    set_: list[str] = config_options.set_,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in out_dir."),
) -> None:
    """Train a stage (tokenizer, detokenizer, LM, LCL, Libra, ...) through the shared loop."""
    from vlpretrain.configs import load_config
    from vlpretrain.train.config import TrainConfig
    from vlpretrain.train.loop import train as run_train

    cfg = load_config(TrainConfig, "train", config, set_)
    metrics = run_train(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, int | float)}, sort_keys=True))
