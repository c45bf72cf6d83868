"""A fixed, damped whitening of token features, fitted once on the first training batch.

Features whose variance sits in a few directions (the demo tokenizer's merged tokens: effective rank about 6 of 128,
colour 6 % of the variance, shape 26 %) make the model that reads them learn the small directions last. The map

    x -> (x - mean) @ V diag(sqrt((1 + s) / (eig + s * mean_eig))) V^T

(eigen-decomposition ``cov = V diag(eig) V^T``) gives a direction of average variance unit variance, caps the large
ones at ``1 + s`` and damps the near-empty ones instead of blowing them up: ``s`` -> 0 is full (ZCA) whitening,
``s`` -> inf a plain rescaling. The map is symmetric, so the features keep their orientation.

Statistics come from the valid rows of the first batch seen in training mode (summed over ranks when
``torch.distributed`` is initialised, so every rank fits the same map) and are then frozen as buffers, saved with the
model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Whitening(nn.Module):
    """Damped whitening [..., D] -> [..., D] with statistics fitted on the first training batch.

    Args:
        dim: D, the feature size.
        shrink: s above, in units of the mean eigenvalue (> 0).
    """

    def __init__(self, dim: int, shrink: float = 1.0) -> None:
        super().__init__()
        if shrink <= 0:
            raise ValueError(f"shrink: {shrink} must be > 0")
        self.shrink = shrink
        self.register_buffer("mean_D", torch.zeros(dim))
        self.register_buffer("map_DD", torch.eye(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, rows_MD: Tensor) -> None:
        """Set mean and map from M rows [M, D] (summed over ranks when distributed)."""
        rows = rows_MD.detach().float()
        dim = rows.shape[-1]
        stats = torch.cat([rows.new_tensor([len(rows)]), rows.sum(0), (rows.T @ rows).flatten()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        count = stats[0].clamp_min(1.0)
        mean_D = stats[1 : 1 + dim] / count
        cov_DD = stats[1 + dim :].view(dim, dim) / count - torch.outer(mean_D, mean_D)
        eig_D, vec_DD = torch.linalg.eigh(cov_DD)
        eig_D = eig_D.clamp_min(0.0)
        floor = self.shrink * eig_D.mean().clamp_min(1e-12)
        gain_D = ((1.0 + self.shrink) / (eig_D + floor)).sqrt()
        self.mean_D.copy_(mean_D)
        self.map_DD.copy_(vec_DD @ torch.diag(gain_D) @ vec_DD.T)
        self.fitted.fill_(True)

    def forward(self, x_BKD: Tensor, valid_BK: Tensor | None = None) -> Tensor:
        """Mapped features, same shape; the first call in training mode first fits on ``x[valid]``."""
        if not bool(self.fitted):
            if not self.training:
                raise RuntimeError("Whitening: not fitted (run one training batch first, or load fitted weights)")
            self.fit(x_BKD[valid_BK] if valid_BK is not None else x_BKD.flatten(0, -2))
        return (x_BKD - self.mean_D.to(x_BKD.dtype)) @ self.map_DD.to(x_BKD.dtype)


__all__ = ["Whitening"]
