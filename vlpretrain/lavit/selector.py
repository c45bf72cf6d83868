"""LaVIT's token selector (official key prefix ``token_predictor.``): which patches become visual tokens.

DynamicViT-style scorer: ``in_conv`` = LayerNorm(eps 1e-5) -> Linear(D, D) -> GELU; the first D/2 channels stay
local, the last D/2 are averaged over the image and broadcast back; ``out_conv`` = Linear(D, D/2) -> GELU ->
Linear(D/2, D/4) -> GELU -> Linear(D/4, 2) -> LogSoftmax. Channel 0 is "keep". Runs in fp32.

Shape letters: B images, N patches, D width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlpretrain.core.attention import init_linear_and_norm

KeepMode = Literal["gumbel", "sample", "deterministic"]


class TokenSelector(nn.Module):
    """Scores every patch: log-probabilities of (keep, drop), [B, N, 2].

    ``keep_threshold`` (a buffer, not in the official checkpoint) is the log-odds above which the deterministic mode
    keeps a patch. It starts at 0 (p_keep > 0.5) and, with ``calibrate``, training tracks it as a running estimate
    (like BatchNorm's statistics) of the log-odds quantile at which the hard threshold keeps the target fraction of
    the training patches: deterministic tokenising then keeps rho on average, and more patches in images whose
    patches the selector rates higher (a threshold shared by all images, not a per-image top-k).
    """

    def __init__(self, dim: int, calibration_momentum: float = 0.2) -> None:
        super().__init__()
        self.calibration_momentum = calibration_momentum
        self.register_buffer("keep_threshold", torch.zeros(()))
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(init_linear_and_norm)

    def forward(self, x_BND: Tensor) -> Tensor:
        """Log-probabilities [B, N, 2] (fp32, autocast off) of the raw patch features [B, N, D]."""
        with torch.autocast(x_BND.device.type, enabled=False):
            x = self.in_conv(x_BND.float())
            half = x.shape[-1] // 2
            global_ = x[..., half:].mean(dim=1, keepdim=True).expand(-1, x.shape[1], -1)  # policy is all ones here
            return self.out_conv(torch.cat([x[..., :half], global_], dim=-1))

    @torch.no_grad()
    def calibrate(self, logp_BN2: Tensor, kept_fraction: float) -> None:
        """Move ``keep_threshold`` toward the log-odds quantile that keeps ``kept_fraction`` of these patches."""
        log_odds = (logp_BN2[..., 0] - logp_BN2[..., 1]).float().flatten()
        target = torch.quantile(log_odds, min(max(1.0 - kept_fraction, 0.0), 1.0))
        self.keep_threshold.lerp_(target.to(self.keep_threshold.dtype), self.calibration_momentum)

    def deterministic(self, logp_BN2: Tensor) -> Tensor:
        """Keep where the log-odds exceed ``keep_threshold``: [B, N] float 0/1."""
        return (logp_BN2[..., 0] - logp_BN2[..., 1] > self.keep_threshold).to(logp_BN2.dtype)


def keep_decision(logp_BN2: Tensor, mode: KeepMode, tau: float = 1.0) -> Tensor:
    """The keep mask [B, N] as float 0/1.

    ``gumbel``: hard Gumbel-softmax sample with a straight-through gradient (training). ``sample``: the same sample
    without gradient (the official inference). ``deterministic``: keep where p(keep) > 0.5 (use
    :meth:`TokenSelector.deterministic` for the calibrated threshold).
    """
    if mode == "deterministic":
        return (logp_BN2[..., 0] > logp_BN2[..., 1]).to(logp_BN2.dtype)
    hard = F.gumbel_softmax(logp_BN2, tau=tau, hard=True)[..., 0]
    return hard if mode == "gumbel" else hard.detach()


def ratio_loss(keep_BN: Tensor, rho: float, per_image: bool) -> Tensor:
    """Squared gap between the kept fraction and the target ``rho``, per image [B] (or the batch mean broadcast)."""
    kept = keep_BN.float().mean(dim=1)
    if per_image:
        return (rho - kept) ** 2
    return ((rho - kept.mean()) ** 2).expand_as(kept)


def keep_entropy(logp_BN2: Tensor) -> Tensor:
    """Binary entropy (nats) of each patch's keep decision [B, N] from the log-probabilities [B, N, 2].

    Computed as -sum p log p on the log-probabilities (clamped at -100), whose gradient -p (log p + 1) stays finite
    for a saturated decision; ``entr(exp(logp))`` would give 0 x inf = NaN once exp(logp) underflows to 0.
    """
    logp_BN2 = logp_BN2.float().clamp(min=-100.0)
    return -(logp_BN2.exp() * logp_BN2).sum(dim=-1)


def log_odds_excess(logp_BN2: Tensor, bound: float) -> Tensor:
    """Squared excess of each patch's keep log-odds beyond +-``bound``, [B, N] (0 inside the bound).

    Unpenalised (the official selector), a selector can push every patch's log-odds far below zero (we saw -35 to
    -170): the Gumbel keep samples are then all "drop", their straight-through gradient is ~1e-9 and no kept token
    ever comes back (keep ratio 0.0 to the end of the run). This penalty's gradient does not pass through a sigmoid,
    so it pulls saturated log-odds back toward +-``bound``, where Gumbel sampling still keeps an occasional patch.
    """
    log_odds_BN = (logp_BN2[..., 0] - logp_BN2[..., 1]).float()
    return F.relu(log_odds_BN.abs() - bound).square()
