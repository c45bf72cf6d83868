"""Wrap a task module for data parallelism: DDP, or FSDP2 (`fully_shard` per transformer block, then the root).

Sharding lives here, never inside models: a task only lists its blocks through ``shard_units()``.
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from vlpretrain.train.distributed import DistEnv

Mode = Literal["auto", "none", "ddp", "fsdp"]


def resolve_mode(mode: Mode, env: DistEnv) -> Literal["none", "ddp", "fsdp"]:
    """``auto`` is DDP in a multi-process job and nothing in a single process."""
    if mode == "auto":
        return "ddp" if env.distributed else "none"
    if mode != "none" and not env.distributed:
        return "none"
    return mode


def parallelize(task: nn.Module, mode: Mode, env: DistEnv) -> nn.Module:
    """Move ``task`` to the device and wrap it; returns the module the loop calls.

    FSDP2 keeps fp32 parameters sharded and gathers each block for its forward/backward; the loop's bf16 autocast
    does the mixed precision, as in the unsharded case, so DDP and FSDP compute the same thing.
    """
    task.to(env.device)
    mode = resolve_mode(mode, env)
    if mode == "none":
        return task
    if mode == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(task, device_ids=ids)
    for block in task.shard_units():
        fully_shard(block)
    fully_shard(task)
    return task


def unwrap(model: nn.Module) -> nn.Module:
    """The task module inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
