"""LaVIT's quantizer (official key ``quantize.embedding.weight``): a cosine codebook trained by EMA, VQ-KD style.

Choices (docs/lavit.md sections 5, 7):

- Codebook ``embedding.weight`` [K, C] of unit-norm codes (K=16384, C=32 in LaVIT), a buffer: the optimiser never
  sees it. Its key matches the official one under the ``quantize.`` prefix; :meth:`CosineCodebook.load_official`
  loads the official tensor and sets the EMA state that training needs.
- Inputs are l2-normalised inside the quantizer (the official tokenize does this); the nearest code maximises the
  cosine similarity (= minimises L2 on unit vectors). Everything runs in fp32 with autocast disabled for the input's
  device type: bf16 similarities change about 1.4% of the codes.
- Output ``z_q = codes[ids] + (z - sg(z))``: the straight-through estimator, with the exact code values in the
  forward pass. Commitment loss ``beta * ||sg(z_q) - z||^2`` summed over C and averaged over the valid vectors of
  this rank (on unit vectors it is ``2 - 2 cos``); BEiT-v2's ``F.mse_loss`` is this divided by C.
- Training (``module.train()``) updates the codebook in every forward call: EMA (decay 0.99) of the per-code count
  and vector sum, codes = l2norm(EMA sum), so a code moves toward the mean direction of its vectors and stays unit
  norm. The first training call runs spherical k-means (seeds drawn from the batch, a few Lloyd iterations); when the
  batch holds fewer vectors than codes, the codes left unseeded start dead and are filled by restarts on the next
  batches. After each update, codes whose EMA count falls below ``dead_code_threshold`` times the mean EMA count
  (a threshold relative to the batch size, unlike an absolute count) are restarted from random vectors of the
  current batch, so the book cannot collapse. A boolean ``mask`` (True = valid) keeps padding out of every
  statistic and of the loss. Do not wrap the quantizer in activation checkpointing: a recomputed forward would
  update the codebook twice.
- Distributed: counts, sums and restart / k-means seed candidates go through one injected ``all_reduce_fn``
  (in-place sum; by default ``torch.distributed.all_reduce`` when a process group of more than one rank exists,
  else a no-op). Each rank puts its candidates in its own slot of a zero tensor, so the reduce is an all-gather
  and every rank picks the same vectors; all ranks keep bitwise-identical codebooks.

Why not vector-quantize-pytorch's ``VectorQuantize(use_cosine_sim=True)``, which has EMA, k-means init, dead-code
thresholds, masks and sync: its codebook forward disables autocast for CUDA only, so under CPU bf16 autocast the
similarities and argmax run in bf16 (checked with 1.32); its codebook is a [1, K, C] ``_codebook.embed`` beside
``embed_avg`` rather than a [K, C] ``embedding.weight``; masks must be [B, N]; sync is switched by a ``use_ddp``
flag that calls ``torch.distributed`` directly; its dead-code threshold is an absolute count that depends on the
batch size; and it reports no usage or perplexity. The part we need is about 200 lines, so we own it.

Shape letters: N vectors (the input's leading dims flattened), K codes, C code dim, R ranks, Q candidates per rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

AllReduceFn = Callable[[Tensor], None]
"""Sums a tensor over ranks in place (the signature of ``torch.distributed.all_reduce``)."""

MAX_SCORE_ELEMENTS = 2**26  # similarity rows per chunk are capped so [chunk, K] fp32 stays within 256 MiB


def all_reduce_if_distributed(t: Tensor) -> None:
    """``torch.distributed.all_reduce`` (sum, in place) when a process group of more than one rank exists."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def perplexity(counts_K: Tensor) -> Tensor:
    """exp(entropy) of the distribution given by non-negative counts [K]; 0 when all counts are 0."""
    total = counts_K.sum()
    p_K = counts_K / total.clamp(min=torch.finfo(counts_K.dtype).tiny)
    return torch.where(total > 0, torch.exp(-torch.special.xlogy(p_K, p_K).sum()), torch.zeros_like(total))


class QuantizerOutput(NamedTuple):
    """What :meth:`CosineCodebook.forward` returns.

    Args:
        z_q: [..., C] fp32 codes of the nearest entries, with straight-through gradients to the input.
        ids: [...] long code ids. Both are also computed at masked positions, where they mean nothing.
        loss: fp32 scalar, the commitment loss over the valid vectors (0 when there are none).
        stats: detached fp32 scalars: ``usage`` (fraction of codes used by this batch, at most N / K),
            ``perplexity`` (of this batch's code distribution), ``active_codes`` (codes whose EMA count is at or
            above the dead-code threshold), ``ema_perplexity`` (of the EMA counts), ``restarted`` (codes restarted
            by this call), ``vectors`` (valid vectors counted). In training these cover all ranks; in eval mode
            this rank only.
    """

    z_q: Tensor
    ids: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


class CodeTable(nn.Module):
    """Holds the codebook as the buffer ``weight`` [K, C], so its key is ``embedding.weight`` as in the official
    checkpoint, without making it a parameter an optimiser or weight decay could touch."""

    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(num_codes, dim))


class CosineCodebook(nn.Module):
    """Cosine-similarity vector quantizer with EMA updates, k-means init and dead-code restarts.

    Args:
        num_codes: K, the codebook size.
        dim: C, the code dimension.
        beta: weight of the commitment loss.
        decay: EMA decay of the per-code counts and sums (per training forward call).
        kmeans_init: run spherical k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that k-means (0 = codes are random batch vectors).
        dead_code_threshold: restart codes whose EMA count is below this fraction of the mean EMA count (0 = never).
        all_reduce_fn: in-place sum over ranks; default :func:`all_reduce_if_distributed`.
    """

    def __init__(
        self,
        num_codes: int = 16384,
        dim: int = 32,
        *,
        beta: float = 1.0,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.05,
        all_reduce_fn: AllReduceFn | None = None,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"quantizer: num_codes and dim must be >= 1, got {num_codes} and {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"quantizer: decay must be in [0, 1), got {decay}")
        if kmeans_iters < 0 or dead_code_threshold < 0:
            raise ValueError("quantizer: kmeans_iters and dead_code_threshold must be >= 0")
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.decay = beta, decay
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.all_reduce_fn = all_reduce_fn or all_reduce_if_distributed
        self.embedding = CodeTable(num_codes, dim)
        self.register_buffer("ema_count", torch.zeros(num_codes))  # [K]
        self.register_buffer("ema_sum", torch.zeros(num_codes, dim))  # [K, C]
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random unit codes and an empty EMA state (k-means, if enabled, runs again on the next training batch)."""
        self.embedding.weight.copy_(F.normalize(torch.randn_like(self.embedding.weight), dim=-1))
        self.ema_count.zero_()
        self.ema_sum.zero_()
        self.initialised.fill_(not self.kmeans_init)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, decay={self.decay}, "
            f"kmeans_init={self.kmeans_init}, dead_code_threshold={self.dead_code_threshold}"
        )

    @property
    def codebook(self) -> Tensor:
        """The unit-norm codes [K, C]."""
        return self.embedding.weight

    @torch.no_grad()
    def load_official(self, weight_KC: Tensor) -> None:
        """Load the official ``quantize.embedding.weight`` [K, C] and mark the codebook initialised.

        The checkpoint holds no EMA state: every code starts with an EMA count of 1 (and sum = code), a prior the
        EMA forgets within about 1 / (1 - decay) training steps. Codes are re-normalised in fp32.

        Raises:
            ValueError: wrong shape, or codes that are not unit-norm (to 1e-2, allowing half-precision storage).
        """
        if tuple(weight_KC.shape) != (self.num_codes, self.dim):
            raise ValueError(
                f"quantize.embedding.weight: expected shape {(self.num_codes, self.dim)}, got {tuple(weight_KC.shape)}"
            )
        weight_KC = weight_KC.to(self.embedding.weight)
        norms_K = weight_KC.norm(dim=-1)
        if (norms_K - 1).abs().max() > 1e-2:
            lo, hi = norms_K.aminmax()
            raise ValueError(f"quantize.embedding.weight: codes must be unit-norm, norms span {lo:.4f}..{hi:.4f}")
        self.embedding.weight.copy_(F.normalize(weight_KC, dim=-1))
        self.ema_count.fill_(1.0)
        self.ema_sum.copy_(self.embedding.weight)
        self.initialised.fill_(True)

    def quantize(self, z: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """Same as calling the module: see :meth:`forward`."""
        return self(z, mask)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Code ids [...] of the vectors z [..., C] (normalised here); never updates the codebook."""
        self._check_input(z, None)
        with torch.autocast(z.device.type, enabled=False):
            z_NC = F.normalize(rearrange(z.float(), "... c -> (...) c"), dim=-1)
            return self._nearest(z_NC, self.codebook.float()).reshape(z.shape[:-1])

    def indices_to_codes(self, ids: Tensor) -> Tensor:
        """The codes [..., C] (fp32) of ids [...]: the inverse of :meth:`encode` for decoding."""
        return F.embedding(ids, self.codebook.float())

    def forward(self, z: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """Quantize z [..., C]; in training mode also update the codebook from the valid vectors.

        Args:
            z: [..., C] vectors, any float dtype (normalised here).
            mask: optional bool [...] (z's leading shape), True = a valid vector; padding is left out of the loss
                and of every codebook statistic.
        """
        self._check_input(z, mask)
        with torch.autocast(z.device.type, enabled=False):
            z_NC = F.normalize(rearrange(z.float(), "... c -> (...) c"), dim=-1)
            valid_N = None if mask is None else mask.reshape(-1)
            update, restart = self.training, True
            if update and not bool(self.initialised):
                self._kmeans_init(z_NC.detach(), valid_N)
                restart = False  # this batch seeded the codes: restarts from it would duplicate them
            codes_KC = self.codebook.float()
            ids_N = self._nearest(z_NC.detach(), codes_KC)
            code_NC = codes_KC[ids_N]  # a copy: the in-place codebook update below does not change it
            weight_N = z_NC.new_ones(len(z_NC)) if valid_N is None else valid_N.float()
            err_N = (code_NC - z_NC).pow(2).sum(-1)
            loss = self.beta * (err_N * weight_N).sum() / weight_N.sum().clamp(min=1.0)
            if update:
                counts_K, restarted = self._update(z_NC.detach(), ids_N, weight_N, restart)
            else:
                counts_K, restarted = torch.bincount(ids_N, weights=weight_N, minlength=self.num_codes), 0
            z_q_NC = code_NC + (z_NC - z_NC.detach())  # straight-through, exact code values forward
        z_q = z_q_NC.reshape(*z.shape[:-1], self.dim)
        return QuantizerOutput(z_q, ids_N.reshape(z.shape[:-1]), loss, self._stats(counts_K, restarted))

    def _check_input(self, z: Tensor, mask: Tensor | None) -> None:
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"quantizer: expected input [..., {self.dim}], got {tuple(z.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != z.shape[:-1]):
            raise ValueError(
                f"quantizer: mask must be bool of shape {tuple(z.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if self.training and self.codebook.dtype != torch.float32:
            raise TypeError(f"quantizer: the codebook must stay fp32 for EMA training, got {self.codebook.dtype}")

    def _nearest(self, z_NC: Tensor, codes_KC: Tensor) -> Tensor:
        """argmax_k cos(z_n, code_k) for unit vectors [N, C], in row chunks to bound the [N, K] score memory."""
        rows = max(1, MAX_SCORE_ELEMENTS // len(codes_KC))
        chunks = [(z_chunk @ codes_KC.T).argmax(dim=-1) for z_chunk in z_NC.split(rows)]
        return torch.cat(chunks) if chunks else z_NC.new_zeros(0, dtype=torch.long)

    def _reduced_stats(self, z_NC: Tensor, ids_N: Tensor, weight_N: Tensor) -> tuple[Tensor, Tensor]:
        """Per-code counts [K] and vector sums [K, C] over the valid vectors of all ranks (one reduce)."""
        stats_KC1 = z_NC.new_zeros(self.num_codes, self.dim + 1)
        values_NC1 = torch.cat([z_NC, torch.ones_like(weight_N)[:, None]], dim=-1) * weight_N[:, None]
        stats_KC1.index_add_(0, ids_N, values_NC1)
        self.all_reduce_fn(stats_KC1)
        return stats_KC1[:, -1], stats_KC1[:, :-1]

    @torch.no_grad()
    def _update(self, z_NC: Tensor, ids_N: Tensor, weight_N: Tensor, restart: bool) -> tuple[Tensor, int]:
        """EMA step, re-normalisation and dead-code restarts. Returns the global batch counts [K] and #restarted."""
        counts_K, sums_KC = self._reduced_stats(z_NC, ids_N, weight_N)
        self.ema_count.lerp_(counts_K, 1.0 - self.decay)
        self.ema_sum.lerp_(sums_KC, 1.0 - self.decay)
        self._renormalise(self.ema_sum)
        return counts_K, self._restart_dead_codes(z_NC, weight_N > 0) if restart else 0

    def _renormalise(self, sums_KC: Tensor) -> None:
        """codes = l2norm(sums); a code whose sum is 0 (never used) keeps its direction."""
        norm_K1 = sums_KC.norm(dim=-1, keepdim=True)
        unit_KC = sums_KC / norm_K1.clamp(min=torch.finfo(norm_K1.dtype).tiny)
        self.embedding.weight.copy_(torch.where(norm_K1 > torch.finfo(norm_K1.dtype).tiny, unit_KC, self.codebook))

    def _dead_mask(self) -> Tensor:
        return self.ema_count < self.dead_code_threshold * self.ema_count.mean()

    def _restart_dead_codes(self, z_NC: Tensor, valid_N: Tensor) -> int:
        """Replace dead codes by random valid batch vectors (the same on every rank); the most unused go first.

        A restarted code gets the mean EMA count, so it has about log(1 / threshold) / (1 - decay) steps to win
        vectors before it is dead again. When there are fewer candidates than dead codes, the rest wait.
        """
        if self.dead_code_threshold <= 0:
            return 0
        dead_K = self._dead_mask()
        num_dead = int(dead_K.sum())  # identical on all ranks: the EMA state is
        if num_dead == 0:
            return 0
        new_MC = self._sample_candidates(z_NC, valid_N, num_dead)
        order_K = torch.argsort(self.ema_count.masked_fill(~dead_K, math.inf), stable=True)
        ids_M = order_K[: len(new_MC)]
        reset = self.ema_count.mean()
        self.embedding.weight[ids_M] = new_MC
        self.ema_count[ids_M] = reset
        self.ema_sum[ids_M] = new_MC * reset
        return len(ids_M)

    def _sample_candidates(self, z_NC: Tensor, valid_N: Tensor | None, num: int) -> Tensor:
        """Up to ``num`` random valid vectors [M, C] drawn from all ranks, identical on every rank.

        Each rank draws ceil(num / R) of its own vectors into its slot of a zero [R, Q, C + 1] tensor (last column:
        1 = filled); the sum over ranks is then an all-gather. Candidates are taken rank-interleaved.
        """
        rank, world = _rank_and_world()
        quota = -(-num // world)
        local_VC = z_NC if valid_N is None else z_NC[valid_N]
        take = min(quota, len(local_VC))
        pick = torch.randperm(len(local_VC), device=z_NC.device)[:take]
        box_RQC1 = z_NC.new_zeros(world, quota, self.dim + 1)
        box_RQC1[rank, :take, :-1] = local_VC[pick]
        box_RQC1[rank, :take, -1] = 1.0
        self.all_reduce_fn(box_RQC1)
        flat_MC1 = rearrange(box_RQC1, "r q c -> (q r) c")
        return flat_MC1[flat_MC1[:, -1] > 0.5][:num, :-1]

    @torch.no_grad()
    def _kmeans_init(self, z_NC: Tensor, valid_N: Tensor | None) -> None:
        """Spherical k-means over the valid vectors of all ranks; seeds are random batch vectors.

        With fewer vectors than codes, the unseeded codes keep their random init with an EMA count of 0, so the
        dead-code restarts of the following batches fill them.
        """
        z_VC = z_NC if valid_N is None else z_NC[valid_N]
        ones_V = z_VC.new_ones(len(z_VC))
        seeds_MC = self._sample_candidates(z_VC, None, self.num_codes)
        if len(seeds_MC) == 0:  # no valid vector on any rank: try again on the next batch
            return
        self.embedding.weight[: len(seeds_MC)] = seeds_MC
        counts_K, sums_KC = self._reduced_stats(z_VC, self._nearest(z_VC, self.codebook), ones_V)
        if self.kmeans_iters == 0:  # each seed stands for itself
            sums_KC = self.codebook * counts_K[:, None]
        for step in range(self.kmeans_iters):
            self._renormalise(sums_KC)
            if step + 1 < self.kmeans_iters:
                counts_K, sums_KC = self._reduced_stats(z_VC, self._nearest(z_VC, self.codebook), ones_V)
        self.ema_count.copy_(counts_K)
        self.ema_sum.copy_(sums_KC)
        self.initialised.fill_(True)

    def _stats(self, counts_K: Tensor, restarted: int) -> dict[str, Tensor]:
        counts_K = counts_K.detach()
        active = (~self._dead_mask()).sum() if self.dead_code_threshold > 0 else (self.ema_count > 0).sum()
        return {
            "usage": (counts_K > 0).float().mean(),
            "perplexity": perplexity(counts_K),
            "active_codes": active.float(),
            "ema_perplexity": perplexity(self.ema_count),
            "restarted": counts_K.new_tensor(float(restarted)),
            "vectors": counts_K.sum(),
        }
