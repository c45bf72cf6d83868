"""The training run config: what to train (a task and its model config), on which data, and how.

A YAML run file looks like::

    task: text-lm            # a registered task (vlpretrain.train.task.list_tasks())
    model_preset: tiny       # the task's model preset
    model: {hidden_size: 64} # overrides of the task's model config, validated against it
    data: {train: runs/data/train, val: runs/data/val, batch_size: 16}
    steps: 200
    optim: {lr: 3.0e-4, lr_groups: {"visual.": 1.5e-4}}

Unknown keys and wrong types are errors naming the key (see :mod:`vlpretrain.configs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vlpretrain.configs import ConfigError


@dataclass
class DataConfig:
    """Where the batches come from.

    Args:
        train: training shards (folder, glob, brace range or pipe: URL); required.
        val: validation shards for the eval hook; empty = no eval data.
        batch_size: samples per rank per micro-step.
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: shuffle buffer size (0 = read in order).
        seed: data order seed.
    """

    train: str = ""
    val: str = ""
    batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("data.batch_size: must be >= 1")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers / data.shuffle_buffer: must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with weight-decay groups and per-module learning rates.

    Args:
        lr: peak learning rate of parameters not matched by ``lr_groups``.
        lr_groups: parameter-name prefix -> peak learning rate (first match wins), e.g. {"visual.": 1.5e-4}.
        weight_decay: decoupled weight decay; never applied to biases, norms (tensors of rank < 2) or ``no_decay``.
        no_decay: substrings of parameter names that get no weight decay (e.g. "embed", "logit_scale").
        grad_clip: clip the global gradient norm to this (0 = off).
    """

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=list)
    lr_groups: dict[str, float] = field(default_factory=dict)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or any(v <= 0 for v in self.lr_groups.values()):
            raise ConfigError("optim.lr / optim.lr_groups: learning rates must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay / optim.grad_clip: must be >= 0")


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` x peak at the last step (or constant)."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("schedule: warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")


@dataclass
class CheckpointConfig:
    """Save every ``every`` steps (and at the end) into ``out_dir/checkpoints``, keeping the last ``keep_last``."""

    every: int = 500
    keep_last: int = 3

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint.every / checkpoint.keep_last: must be >= 1")


@dataclass
class LogConfig:
    """Rank-0 logging: progress bar, ``metrics.jsonl``, optional TensorBoard, eval and sample hooks.

    Args:
        every: log training metrics every N steps.
        eval_every: run the eval hook every N steps (0 = only at the end when val data exists).
        eval_batches: batches of validation data per eval.
        sample_every: call the task's sample hook every N steps (0 = never).
        progress: show the progress bar.
        tensorboard: also write TensorBoard events (needs the `tensorboard` package).
        peak_tflops: the machine's peak for MFU; 0 = measure a bf16/fp32 matmul at start.
    """

    every: int = 10
    eval_every: int = 0
    eval_batches: int = 10
    sample_every: int = 0
    progress: bool = True
    tensorboard: bool = False
    peak_tflops: float = 0.0


@dataclass
class TrainConfig:
    """A whole training run. ``model`` is validated later against the task's own config class."""

    task: str = "text-lm"
    model_preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    steps: int = 1000
    grad_accum: int = 1
    precision: Literal["bf16", "fp32"] = "bf16"
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    seed: int = 0
    deterministic: bool = True
    max_bad_steps: int = 5
    out_dir: str = "runs/train"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.grad_accum < 1:
            raise ConfigError("steps / grad_accum: must be >= 1")
        if self.max_bad_steps < 1:
            raise ConfigError("max_bad_steps: must be >= 1")
        if not self.out_dir:
            raise ConfigError("out_dir: must not be empty")
