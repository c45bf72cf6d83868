"""Optimizer groups (decay, per-module learning rates) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
from torch import nn

from vlpretrain.train.config import OptimConfig, ScheduleConfig
from vlpretrain.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.llm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
        self.visual = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_groups_split_decay_and_learning_rates() -> None:
    cfg = OptimConfig(lr=5e-5, lr_groups={"visual.": 1.5e-4}, weight_decay=0.1, no_decay=["llm.0."])
    groups = {(g["lr"], g["weight_decay"]): set(g["names"]) for g in param_groups(Toy(), cfg)}
    assert groups == {
        (5e-5, 0.1): {"llm.1.weight"},
        (5e-5, 0.0): {"llm.0.weight", "llm.1.bias", "llm.2.weight", "llm.2.bias"},
        (1.5e-4, 0.1): {"visual.weight"},
        (1.5e-4, 0.0): {"visual.bias"},
    }


def test_frozen_parameters_are_left_out() -> None:
    opt = build_optimizer(Toy(), OptimConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    model = Toy()
    assert len(ids) == sum(p.requires_grad for p in model.parameters())


def test_schedule_warmup_then_cosine_to_min() -> None:
    cfg = ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(500, 100, cfg) == pytest.approx(0.1)


def test_scheduler_scales_every_group_alike() -> None:
    opt = build_optimizer(Toy(), OptimConfig(lr=1.0, lr_groups={"visual.": 2.0}))
    sched = build_scheduler(opt, 20, ScheduleConfig(warmup_steps=4))
    for _ in range(2):
        opt.step()
        sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.75, 1.5])
