"""LCL's loss pieces, all returning SUMS (the loop divides by the global number of targets).

- :func:`contrastive_loss_sum`: symmetric InfoNCE between matched image and text features over the GLOBAL batch.
  Each rank pads its features to the largest count of any rank, gathers everyone's WITH gradient
  (:class:`GatherWithGrad`: all-gather forward, all-reduce-sum backward, as the official ``GatherLayerWithoutStack``),
  masks the padded columns to -inf and sums the cross-entropies of its OWN rows in both directions (halved). Summed
  over ranks and divided by the global count this is exactly the single-process loss on the concatenated batch,
  with the same gradients (``tests/test_lcl_distributed.py``). Logits and cross-entropies are fp32, autocast off.
- :func:`generation_loss_sum`: summed next-token cross-entropy (fp32).
- :func:`regression_loss_sum`: summed per-image mean squared error (the Emu-style baseline).

With a single matched pair in the whole batch the contrastive loss is exactly 0 (a 1 x 1 softmax); with none it is
a zero that still depends on every input (no NaN, and DDP sees every parameter used).

Shape letters: X matched pairs on this rank, E feature width, R ranks, M the largest X of any rank, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """All-gather [X, ...] from every rank -> [R, X, ...]; backward sums the gradients over ranks (all-reduce) and
    returns this rank's slice, so every rank's loss reaches every rank's features."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad_RX: Tensor) -> Tensor:  # type: ignore[override]
        grad_RX = grad_RX.contiguous()
        dist.all_reduce(grad_RX, op=dist.ReduceOp.SUM)
        return grad_RX[dist.get_rank()]


def gather_counts(counts: list[int], device: torch.device) -> Tensor:
    """Every rank's ``counts`` (no gradient): [R, K] long; [1, K] in a single process."""
    local_K = torch.tensor(counts, dtype=torch.long, device=device)
    _, world_size = world()
    if world_size == 1:
        return local_K[None]
    parts = [torch.empty_like(local_K) for _ in range(world_size)]
    dist.all_gather(parts, local_K)
    return torch.stack(parts)


def _padded(x_XE: Tensor, rows: int) -> Tensor:
    return torch.cat((x_XE, x_XE.new_zeros(rows - len(x_XE), *x_XE.shape[1:])))


def contrastive_loss_sum(
    image_XE: Tensor, text_XE: Tensor, logit_scale: Tensor, counts_R: Tensor | None = None
) -> tuple[Tensor, int]:
    """Symmetric InfoNCE over the global batch, summed over this rank's pairs.

    Args:
        image_XE: this rank's l2-normalised image features [X, E] (row i matches ``text_XE[i]``).
        text_XE: this rank's l2-normalised text-side features [X, E].
        logit_scale: the multiplier exp(log scale), a scalar tensor.
        counts_R: every rank's X (from :func:`gather_counts`); gathered here when None.

    Returns:
        (sum over this rank's X pairs of (CE(image -> texts) + CE(text -> images)) / 2, the global number of pairs).
        Dividing the sum over ranks by the global number gives CLIP's symmetric loss on the concatenated batch.
    """
    if image_XE.shape != text_XE.shape or image_XE.ndim != 2:
        raise ValueError(f"contrastive loss: expected two [X, E], got {list(image_XE.shape)}, {list(text_XE.shape)}")
    rank, world_size = world()
    if counts_R is None:
        counts_R = gather_counts([len(image_XE)], image_XE.device)[:, 0]
    total, most = int(counts_R.sum()), int(counts_R.max())
    if most == 0:  # no pairs anywhere: a zero that keeps every input in the graph
        return (image_XE.sum() + text_XE.sum() + logit_scale) * 0.0, 0
    with torch.autocast(image_XE.device.type, enabled=False):
        image_XE, text_XE = image_XE.float(), text_XE.float()
        if world_size > 1:
            all_image_ME = GatherWithGrad.apply(_padded(image_XE, most)).flatten(0, 1)  # [R * M, E]
            all_text_ME = GatherWithGrad.apply(_padded(text_XE, most)).flatten(0, 1)
        else:
            all_image_ME, all_text_ME = image_XE, text_XE
        valid_M = torch.arange(most, device=image_XE.device)[None, :] < counts_R.to(image_XE.device)[:, None]
        pad_M = ~valid_M.flatten()
        scale = logit_scale.float()
        i2t_XM = (scale * image_XE @ all_text_ME.T).masked_fill(pad_M[None], float("-inf"))
        t2i_XM = (scale * text_XE @ all_image_ME.T).masked_fill(pad_M[None], float("-inf"))
        labels_X = rank * most + torch.arange(len(image_XE), device=image_XE.device)
        loss = F.cross_entropy(i2t_XM, labels_X, reduction="sum") + F.cross_entropy(t2i_XM, labels_X, reduction="sum")
    return 0.5 * loss, total


def generation_loss_sum(logits_XV: Tensor, targets_X: Tensor) -> Tensor:
    """Summed next-token cross-entropy in fp32 over logits [X, V] and targets [X]."""
    return F.cross_entropy(logits_XV.float(), targets_X, reduction="sum")


def regression_loss_sum(predicted_XE: Tensor, target_XE: Tensor) -> Tensor:
    """Summed over images of the mean squared error over features (fp32); the target keeps its gradient, as in an
    encoder trained end to end by regression (which is what lets its latents collapse)."""
    return (predicted_XE.float() - target_XE.float()).pow(2).mean(dim=-1).sum()


__all__ = [
    "GatherWithGrad",
    "contrastive_loss_sum",
    "gather_counts",
    "generation_loss_sum",
    "regression_loss_sum",
    "world",
]
