"""AdamW with weight-decay groups and per-module learning rates; linear warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlpretrain.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into (learning rate, decay) groups.

    A parameter's learning rate is that of the first ``cfg.lr_groups`` prefix its name starts with, else ``cfg.lr``.
    Biases, norm weights and other tensors of rank < 2, and names containing a ``cfg.no_decay`` substring get no
    weight decay.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    names: dict[tuple[float, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = _clean_name(name)
        lr = next((v for prefix, v in cfg.lr_groups.items() if clean.startswith(prefix)), cfg.lr)
        decay = param.ndim >= 2 and not any(s in clean for s in cfg.no_decay)
        groups.setdefault((lr, decay), []).append(param)
        names.setdefault((lr, decay), []).append(clean)
    return [
        {"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0,
         "names": names[(lr, decay)]}
        for (lr, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]  # fmt: skip


def _clean_name(name: str) -> str:
    """Parameter name without the wrappers' prefixes (DDP's ``module.``, compile's ``_orig_mod.``)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (group names kept for inspection, not passed to torch)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    torch_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig):
    """A LambdaLR applying :func:`lr_factor` to every group's base learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
