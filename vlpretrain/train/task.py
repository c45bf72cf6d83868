"""What the training loop needs from a training stage, and the registry that maps stage names to them.

A *task* is an ``nn.Module`` wrapping model + loss. The loop knows nothing else about LaVIT, LCL or Libra:

- ``forward(batch) -> {"loss": summed loss over the batch's targets, ...named parts for logging}``. The loss is a
  SUM (not a mean) so that the loop can normalise by the global number of valid targets across ranks and
  gradient-accumulation steps.
- ``num_targets(batch) -> int``: that number for one micro-batch (text tokens with a label, images, ...).
- ``flops_per_target() -> float``: training FLOPs (forward + backward) per target, for model FLOP utilisation.
- ``shard_units() -> list[nn.Module]``: the transformer blocks FSDP shards one by one.
- ``build_dataset(data_cfg, split, rank, world_size)`` (classmethod-like, on the instance): an iterable dataset
  following :class:`vlpretrain.data.shards.StreamProtocol`.
- optional ``sample() -> dict[str, str]``: a few generations to log.

Tasks are registered by name with a lazy import path, so that importing the registry imports no model code.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from vlpretrain.configs import ConfigError, from_dict, get_preset, merge

# name -> "module:Class". The module registers the task's model presets under kind = task name.
_TASKS: dict[str, str] = {
    "text-lm": "vlpretrain.tasks.text_lm:TextLMTask",
    "lavit-tokenizer": "vlpretrain.lavit.tokenizer_task:LavitTokenizerTask",
    "lavit-detokenizer": "vlpretrain.lavit.detokenizer_task:LavitDetokenizerTask",
    "lavit-lm": "vlpretrain.lavit.lm_task:LavitLMTask",
    "lcl": "vlpretrain.lcl.task:LCLTask",
    "libra-tokenizer": "vlpretrain.libra.tokenizer_task:LibraTokenizerTask",
    "libra-pretrain": "vlpretrain.libra.lm_task:LibraPretrainTask",
    "libra-instruct": "vlpretrain.libra.lm_task:LibraInstructTask",
}


@runtime_checkable
class Task(Protocol):
    """The interface of a training stage (see the module docstring)."""

    def forward(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def num_targets(self, batch: Any) -> int: ...

    def flops_per_target(self) -> float: ...

    def shard_units(self) -> list[nn.Module]: ...

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any: ...


def list_tasks() -> list[str]:
    """Names of the registered training stages."""
    return sorted(_TASKS)


def task_class(name: str) -> type:
    """Import and return the task class registered as ``name``."""
    if name not in _TASKS:
        raise ConfigError(f"task: unknown task '{name}' (known: {', '.join(list_tasks())})")
    module, attr = _TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def task_config(name: str, preset: str, overrides: dict[str, Any]) -> Any:
    """The task's model config: its preset ``preset`` with ``overrides`` applied (keys checked, named model.*)."""
    cls = task_class(name)
    base = get_preset(name, preset)
    if not isinstance(base, cls.config_cls):
        raise ConfigError(f"model_preset: {name}/{preset} is not a {cls.config_cls.__name__}")
    return merge(base, overrides, where="model.")


def build_task(name: str, model_cfg: Any) -> nn.Module:
    """Instantiate the task module ``name`` from its model config."""
    return task_class(name)(model_cfg)


def model_config_from_dict(name: str, data: dict[str, Any]) -> Any:
    """Rebuild a task's model config from the plain dict stored in a checkpoint's config.json."""
    return from_dict(task_class(name).config_cls, data, where="model.")


def list_models() -> list[str]:
    """Every buildable model as ``task/preset`` (imports each task's module to see its presets)."""
    from vlpretrain.configs import list_presets

    for name in list_tasks():
        task_class(name)
    return [p for name in list_tasks() for p in list_presets(name)]
