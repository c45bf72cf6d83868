"""Self-describing, atomic checkpoint folders with everything an exact resume needs.

A checkpoint ``out_dir/checkpoints/step-00000100/`` holds::

    config.json              the run config (task, model config, data, optim, ...)
    model.safetensors        full (unsharded) fp32 weights of the task module
    trainer_state.pt         optimizer, scheduler and loop state (step, skipped steps, ...)
    rank_state/rank00000.pt  per rank: RNG states and the data-stream position

It is written into ``step-00000100.tmp`` and renamed when complete, so a crash while writing never touches the
previous checkpoint; a leftover ``.tmp`` folder is ignored and replaced. Only the last ``keep_last`` are kept.
With several ranks the folder must be on a file system every rank sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from vlpretrain.errors import UserError
from vlpretrain.train.distributed import DistEnv, barrier

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` optimizer steps."""
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), NumPy and Python's random."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give repeated storages their own copy."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop_state: dict[str, Any],
    data_state: dict[str, Any],
    config: dict[str, Any],
    env: DistEnv,
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically (every rank must call this) and prune old ones."""
    root = Path(root)
    final, tmp = checkpoint_dir(root, step), root / f"step-{step:08d}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rank_state").mkdir(parents=True)
    barrier(env)
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    torch.save({"rng": rng_state(), "data": data_state}, tmp / "rank_state" / f"rank{env.rank:05d}.pt")
    if env.is_main:
        save_file(_unshared(model_sd), str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "loop": loop_state}, tmp / "trainer_state.pt"
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    barrier(env)
    if env.is_main:
        (tmp / "world_size.txt").write_text(f"{env.world_size}\n")
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: DistEnv
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights, optimizer, scheduler and this rank's RNG state; returns (loop_state, data_state)."""
    path = Path(path)
    saved_world = int((path / "world_size.txt").read_text())
    if saved_world != env.world_size:
        raise UserError(f"{path}: saved by {saved_world} processes, resumed with {env.world_size}; use the same number")
    model_sd = load_file(str(path / "model.safetensors"))
    trainer = torch.load(path / "trainer_state.pt", weights_only=False)
    try:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_sd,
            optim_state_dict=trainer["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=True),
        )
    except RuntimeError as err:
        raise UserError(f"{path / 'model.safetensors'} does not match the model: {err}") from err
    scheduler.load_state_dict(trainer["scheduler"])
    rank = torch.load(path / "rank_state" / f"rank{env.rank:05d}.pt", weights_only=False)
    set_rng_state(rank["rng"])
    return trainer["loop"], rank["data"]
