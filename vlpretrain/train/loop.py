"""The one training loop every stage runs through: set-up, then a visible ``while`` with named phases.

Phases of an iteration: step (forward/backward over the accumulation micro-batches, clip, update), log, eval,
sample, save. Losses are normalised by the global number of valid targets over ranks and accumulation steps; a
non-finite loss or gradient skips the update and is counted, and ``max_bad_steps`` in a row stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpretrain.configs import to_dict
from vlpretrain.errors import TrainingDiverged
from vlpretrain.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vlpretrain.train.config import TrainConfig
from vlpretrain.train.distributed import DistEnv, all_reduce_sum, init_distributed, shutdown
from vlpretrain.train.flops import measure_peak_flops
from vlpretrain.train.log import MetricsLogger, print0
from vlpretrain.train.optim import build_optimizer, build_scheduler
from vlpretrain.train.parallelize import parallelize, resolve_mode, unwrap
from vlpretrain.train.streams import build_stream, check_data
from vlpretrain.train.task import build_task, task_config


@dataclass
class LoopState:
    """What the loop itself must carry across a resume."""

    step: int = 0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    targets_seen: float = 0.0


@dataclass
class Run:
    """Everything the loop works with, built by :func:`setup`."""

    cfg: TrainConfig
    env: DistEnv
    task: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: Any
    logger: MetricsLogger
    state: LoopState
    config_record: dict[str, Any]
    peak_flops: float


def setup(cfg: TrainConfig, env: DistEnv, resume: bool) -> Run:
    """Validate the config, build task, optimizer and data stream, and restore a checkpoint when resuming."""
    model_cfg = task_config(cfg.task, cfg.model_preset, cfg.model)
    check_data(cfg.data)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    task = build_task(cfg.task, model_cfg)
    model = parallelize(task, cfg.parallel, env)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.schedule)
    record = to_dict(cfg) | {"model": to_dict(model_cfg), "parallel": resolve_mode(cfg.parallel, env)}
    state, data_state = LoopState(), None
    ckpt = latest_checkpoint(Path(cfg.out_dir) / "checkpoints") if resume else None
    if ckpt is not None:
        loop_state, data_state = load_checkpoint(ckpt, model, optimizer, scheduler, env)
        state = LoopState(**loop_state)
        print0(f"resumed from {ckpt} at step {state.step}", is_main=env.is_main)
    elif resume:
        print0(f"no checkpoint under {cfg.out_dir}/checkpoints: starting from scratch", is_main=env.is_main)
    stream = build_stream(task, cfg.data, "train", env, state=data_state)
    logger = MetricsLogger(Path(cfg.out_dir), cfg.steps, env.is_main, cfg.log.progress, cfg.log.tensorboard,
                           resume_step=state.step)  # fmt: skip
    peak = cfg.log.peak_tflops * 1e12 or measure_peak_flops(_dtype(cfg), env.device.type)
    return Run(cfg, env, task, model, optimizer, scheduler, stream, logger, state, record, peak)


def _dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def _autocast(cfg: TrainConfig, env: DistEnv) -> contextlib.AbstractContextManager:
    """bf16 autocast (CPU too: bf16 matmuls are several times faster there); parts needing fp32 opt out."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16)


def _grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last accumulation micro-step."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def train_step(run: Run, micro: list[Any]) -> dict[str, float]:
    """Forward/backward over the micro-batches, then one optimizer update (or a counted skip)."""
    cfg, env, task, model = run.cfg, run.env, run.task, run.model
    local_targets = float(sum(task.num_targets(b) for b in micro))
    (global_targets,) = all_reduce_sum([local_targets], env)
    scale = env.world_size / max(global_targets, 1.0)  # DDP and FSDP average gradients over ranks
    loss_sum, parts = 0.0, {}
    for i, batch in enumerate(micro):
        with _grad_sync(model, i == len(micro) - 1), _autocast(cfg, env):
            out = model(to_device(batch, env.device))
        (out["loss"].float() * scale).backward()
        loss_sum += float(out["loss"].detach())
        for key, value in out.items():
            if key != "loss":
                parts[key] = parts.get(key, 0.0) + float(value.detach()) / len(micro)
    reduced = all_reduce_sum([loss_sum, *parts.values()], env)
    loss = reduced[0] / max(global_targets, 1.0)
    parts = {k: v / env.world_size for k, v in zip(parts, reduced[1:], strict=True)}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
        run.state.bad_in_a_row = 0
    else:
        run.state.bad_in_a_row += 1
        run.state.skipped_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.state.targets_seen += global_targets
    return {"loss": loss, "grad_norm": grad_norm, "targets": global_targets, "finite": finite, **parts}


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Target-weighted validation loss over ``log.eval_batches`` batches of a fresh, unshuffled val stream."""
    cfg, env = run.cfg, run.env
    stream = build_stream(run.task, cfg.data, "val", env, state=None)
    run.model.eval()
    loss_sum = targets = 0.0
    for _, batch in zip(range(cfg.log.eval_batches), stream, strict=False):
        with _autocast(cfg, env):
            out = run.model(to_device(batch, env.device))
        loss_sum += float(out["loss"])
        targets += run.task.num_targets(batch)
    run.model.train()
    loss_sum, targets = all_reduce_sum([loss_sum, targets], env)
    return {"val_loss": loss_sum / max(targets, 1.0)}


def _speed(run: Run, targets: float, seconds: float) -> tuple[dict[str, float], str]:
    rate = targets / max(seconds, 1e-9)
    unit = getattr(run.task, "target_unit", "targets")
    mfu = run.task.flops_per_target() * rate / (run.peak_flops * run.env.world_size)
    return {f"{unit}_per_s": rate, "mfu": mfu}, f"{rate:,.0f} {unit}/s mfu {100 * mfu:.1f}%"


def _save(run: Run) -> None:
    save_checkpoint(Path(run.cfg.out_dir) / "checkpoints", run.state.step, run.model, run.optimizer, run.scheduler,
                    dataclasses.asdict(run.state), run.stream.state_dict(), run.config_record, run.env,
                    run.cfg.checkpoint.keep_last)  # fmt: skip


def run_loop(run: Run) -> dict[str, float]:
    """The training loop. Returns the last logged metrics."""
    cfg, state = run.cfg, run.state
    batches = iter(run.stream)
    last: dict[str, float] = {}
    window_targets, window_start = 0.0, time.perf_counter()
    while state.step < cfg.steps:
        # --- step ---
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        out = train_step(run, micro)
        state.step += 1
        window_targets += out["targets"]
        if state.bad_in_a_row >= cfg.max_bad_steps:
            raise TrainingDiverged(
                f"step {state.step}: non-finite loss or gradient {state.bad_in_a_row} steps in a "
                f"row (last loss {out['loss']}); lower the learning rate or check the data"
            )
        # --- log ---
        lr = run.optimizer.param_groups[0]["lr"]
        if state.step % cfg.log.every == 0 or state.step == cfg.steps:
            speed, shown = _speed(run, window_targets, time.perf_counter() - window_start)
            last = (
                {k: v for k, v in out.items() if k != "finite"}
                | speed
                | {"lr": lr, "skipped_steps": state.skipped_steps}
            )
            run.logger.log(state.step, last)
            run.logger.update_bar(state.step, out["loss"], lr, shown)
            window_targets, window_start = 0.0, time.perf_counter()
        # --- eval ---
        at_eval = cfg.log.eval_every and state.step % cfg.log.eval_every == 0
        if cfg.data.val and (at_eval or state.step == cfg.steps):
            metrics = evaluate(run)
            run.logger.log(state.step, metrics)
            last |= metrics
        # --- sample ---
        if cfg.log.sample_every and state.step % cfg.log.sample_every == 0 and hasattr(run.task, "sample"):
            with torch.random.fork_rng(devices=[]):
                run.logger.log(state.step, {"samples": unwrap(run.model).sample()})
        # --- save ---
        if state.step % cfg.checkpoint.every == 0 or state.step == cfg.steps:
            _save(run)
    return last


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, float]:
    """Run (or resume) a training run described by ``cfg``; returns the final metrics."""
    env = init_distributed()
    try:
        run = setup(cfg, env, resume)
        try:
            return run_loop(run)
        finally:
            run.logger.close()
    finally:
        shutdown()


__all__ = ["LoopState", "Run", "TrainingDiverged", "evaluate", "run_loop", "setup", "train"]
