"""Load and save trained task modules as self-describing folders (``config.json`` + ``model.safetensors``).

The same layout serves a training checkpoint (``out_dir/checkpoints/step-N``), a whole run folder (its newest
checkpoint is used) and a folder written by a converter from official weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from vlpretrain.configs import to_dict
from vlpretrain.errors import UserError
from vlpretrain.train.checkpoint import latest_checkpoint
from vlpretrain.train.task import build_task, model_config_from_dict


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding ``model.safetensors``: ``path`` itself, or the newest checkpoint of a run folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise UserError(f"{path}: no model.safetensors and no checkpoints/step-* folder in it")
    return latest


def load_task(path: str | Path, expect_task: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the task recorded in ``config.json`` and load its weights strictly; returns (module in eval mode, config).

    Args:
        path: a checkpoint folder or a run folder.
        expect_task: refuse a checkpoint of another task (e.g. "lavit-tokenizer").
    """
    folder = resolve_checkpoint(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: no config.json")
    config = json.loads(config_file.read_text())
    task_name = config.get("task")
    if expect_task is not None and task_name != expect_task:
        raise UserError(f"{folder}: a '{task_name}' checkpoint, expected '{expect_task}'")
    task = build_task(task_name, model_config_from_dict(task_name, config["model"]))
    load_weights(task, folder / "model.safetensors")
    return task.eval(), config


def folder_model_config(folder: str | Path, task: str, option: str) -> Any:
    """The model config recorded in the ``config.json`` of a saved ``task`` folder that the user gave as ``option``.

    Raises:
        UserError: no ``config.json``, or one of another task (``option`` and the folder are named).
    """
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{option}: {folder}: not a {task} folder (no config.json)")
    config = json.loads(config_file.read_text())
    if config.get("task") != task:
        raise UserError(f"{option}: {folder}: a '{config.get('task')}' folder, not a {task}")
    return model_config_from_dict(task, config["model"])


def conversion_record(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``config.json``, its ``converted_from`` record) of a folder a converter wrote, for its summary line.

    Raises:
        UserError: no ``config.json``, or one without a ``converted_from`` record.
    """
    config_file = Path(out_dir) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_file}: no such file")
    config = json.loads(config_file.read_text())
    info = config.get("converted_from") if isinstance(config, dict) else None
    if not info:
        raise UserError(f"{out_dir}/config.json: not written by the converter (no converted_from)")
    return config, info


def load_weights(module: nn.Module, path: Path) -> None:
    """Strictly load a safetensors file into ``module``, naming missing, unexpected and mis-shaped keys."""
    state = load_file(str(path))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{path}: does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                        + (f" (+{len(missing) + len(unexpected) - 10} more)" if len(missing) + len(unexpected) > 10
                           else ""))  # fmt: skip
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise UserError(
                f"{path}: '{key}' has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(state, strict=True)


def save_task(task: nn.Module, task_name: str, model_cfg: Any, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``task`` as a loadable folder: ``config.json`` ({"task", "model", ...extra}) and ``model.safetensors``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in task.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {"task": task_name, "model": to_dict(model_cfg)} | (extra or {})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
