"""Linear and attentive probes: small classifiers trained on the frozen features of an encoder.

Shape letters: B examples, N tokens per example, D feature width, C classes.

- ``linear``: tokens mean-pooled to [B, D], standardised with the training set's mean and std (a fixed affine map,
  like the affine-free BatchNorm of MAE's linear probe), then one ``nn.Linear(D, C)``.
- ``attentive``: one learned query cross-attends to the N tokens (multi-head attention, as in V-JEPA's and AIM's
  attentive probes), then LayerNorm and ``nn.Linear(D, C)``; it can use where things are, not only their average.

Features are extracted once (:func:`extract_features`, encoder frozen under ``no_grad``) and the probe trains on the
cached tensors with AdamW and a cosine schedule. The same seed gives the same probe and the same accuracy: the
initialisation and the shuffling use their own generators, leaving the global random state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlpretrain.progress import progress_bar

ProbeKind = Literal["linear", "attentive"]


class LinearProbe(nn.Module):
    """Mean pool -> standardise (train statistics) -> linear: [B, N, D] -> logits [B, C]."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean_D", torch.zeros(dim))
        self.register_buffer("std_D", torch.ones(dim))
        self.head = nn.Linear(dim, num_classes)

    def fit_statistics(self, features_BND: torch.Tensor) -> None:
        pooled_BD = features_BND.mean(dim=1)
        self.mean_D.copy_(pooled_BD.mean(dim=0))
        self.std_D.copy_(pooled_BD.std(dim=0, unbiased=False).clamp_min(1e-6))

    def forward(self, features_BND: torch.Tensor) -> torch.Tensor:
        return self.head((features_BND.mean(dim=1) - self.mean_D) / self.std_D)


class AttentiveProbe(nn.Module):
    """One learned query attending over the tokens -> LayerNorm -> linear: [B, N, D] -> logits [B, C]."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4) -> None:
        super().__init__()
        heads = num_heads if dim % num_heads == 0 else 1
        self.query_1D = nn.Parameter(torch.zeros(1, dim))
        self.norm_in = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query_1D, std=0.02)

    def forward(self, features_BND: torch.Tensor) -> torch.Tensor:
        tokens_BND = self.norm_in(features_BND)
        query_B1D = self.query_1D.expand(len(tokens_BND), 1, -1)
        pooled_B1D, _ = self.attn(query_B1D, tokens_BND, tokens_BND, need_weights=False)
        return self.head(self.norm_out(pooled_B1D[:, 0]))


@dataclass(frozen=True)
class ProbeConfig:
    """Training settings of a probe (the defaults suit a few thousand examples)."""

    kind: ProbeKind = "linear"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "attentive"):
            raise ValueError(f"probe kind: '{self.kind}' is not one of linear, attentive")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("probe: epochs and batch_size must be >= 1 and lr > 0")


@torch.no_grad()
def extract_features(
    encoder: Callable[[Any], torch.Tensor], batches: Iterable[tuple[Any, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, N, D], labels [B]) of a frozen encoder (``[B, D]`` outputs become N = 1) over labelled batches."""
    if isinstance(encoder, nn.Module):
        encoder.eval()
    feats, labels = [], []
    for images, labels_B in batches:
        out = encoder(images).float()
        feats.append(out[:, None] if out.ndim == 2 else out)
        labels.append(labels_B.long())
    return torch.cat(feats), torch.cat(labels)


def train_probe(
    features_BND: torch.Tensor, labels_B: torch.Tensor, num_classes: int, config: ProbeConfig = ProbeConfig(),
    progress: bool = False,
) -> nn.Module:  # fmt: skip
    """A probe trained on cached features [B, N, D] and labels [B] (in 0..num_classes-1); returned in eval mode."""
    if features_BND.ndim != 3 or len(features_BND) != len(labels_B):
        raise ValueError(f"probe: features must be [B, N, D] with B = len(labels); got {list(features_BND.shape)}")
    labels_B = labels_B.long()
    if len(labels_B) == 0 or int(labels_B.min()) < 0 or int(labels_B.max()) >= num_classes:
        raise ValueError(f"probe: labels must be in 0..{num_classes - 1}")
    features_BND = features_BND.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        dim = features_BND.shape[-1]
        probe = LinearProbe(dim, num_classes) if config.kind == "linear" else AttentiveProbe(dim, num_classes)
    if isinstance(probe, LinearProbe):
        probe.fit_statistics(features_BND)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(labels_B) / config.batch_size)
    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    shuffle = torch.Generator().manual_seed(config.seed)
    probe.train()
    with progress_bar(f"{config.kind} probe", total=total, enabled=progress) as advance:
        for _epoch in range(config.epochs):
            order = torch.randperm(len(labels_B), generator=shuffle)
            for first in range(0, len(order), config.batch_size):
                batch = order[first : first + config.batch_size]
                loss = F.cross_entropy(probe(features_BND[batch]), labels_B[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                advance(1)
    return probe.eval()


@torch.no_grad()
def probe_accuracy(
    probe: nn.Module, features_BND: torch.Tensor, labels_B: torch.Tensor, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of a probe on features [B, N, D] with labels [B]."""
    right = sum(
        int((probe(features_BND[i : i + batch_size].float()).argmax(dim=1) == labels_B[i : i + batch_size]).sum())
        for i in range(0, len(labels_B), batch_size)
    )
    return right / max(len(labels_B), 1)


def run(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
    config: ProbeConfig = ProbeConfig(), progress: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Train a probe on ``train`` = (features [B, N, D], labels [B]) and score it on ``test``:
    ``probe_<kind>_top1`` (test) and ``probe_<kind>_train_top1``."""
    probe = train_probe(*train, num_classes=num_classes, config=config, progress=progress)
    return {f"probe_{config.kind}_top1": probe_accuracy(probe, *test),
            f"probe_{config.kind}_train_top1": probe_accuracy(probe, *train)}  # fmt: skip


__all__ = [
    "AttentiveProbe",
    "LinearProbe",
    "ProbeConfig",
    "extract_features",
    "probe_accuracy",
    "run",
    "train_probe",
]
