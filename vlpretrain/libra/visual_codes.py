"""Libra's hybrid image tokenisation: frozen ViT multi-layer features + lookup-free quantisation into C codebooks.

Choices (docs/libra.md; the official tokenizer is a taming VQGAN whose encoder is a frozen CLIP ViT-L/14-336):

- features: the outputs of chosen blocks of a frozen encoder, CLS dropped, concatenated -> [B, N, F] (officially
  HF ``hidden_states[2, 10, 18, 22]`` of CLIP ViT-L/14-336, i.e. blocks 1, 9, 17, 21 counted from 0; F = 4096). The
  features themselves are the continuous half of the LM's image input.
- ``quant_conv``: the official 1x1 Conv2d F -> D_q, here a Linear on [B, N, F] (the converter reshapes the kernel).
- :class:`LookupFreeQuantizer` (MAGVIT-2 style, as the official ``LFQ``): ``project_in`` D_q -> C * b, split into
  C groups of b bits (2 x 9), each dimension quantised to +-1 by its sign (straight-through gradients in training),
  id = sum of bit_i * 2 ** (b - 1 - i) (first dimension = most significant bit). Aux loss = entropy_weight *
  (per-sample entropy - diversity_gamma * codebook entropy) + commitment_weight * MSE(x, sign(x)), with soft
  assignments softmax(2 * inv_temperature * <x, code>) over each group's 2 ** b codes. Runs in fp32 under autocast.
- training (ours, no official recipe): ``project_out`` (C * b -> D_q) then a small per-patch MLP reconstructs the
  layer-normalised features from the bits (:class:`FeatureDecoder`); the official trains a pixel decoder with
  VQGAN losses instead, which exists only to view images.

Shape letters: B images, N patches, F feature size, D quantiser width (D_q), C codebooks, T bits per codebook
(b above), K = 2 ** T codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from vlpretrain.configs import ConfigError
from vlpretrain.core.encoders import EncoderSpec, FrozenEncoder, build_encoder


@dataclass
class VisualCodesConfig:
    """The hybrid image tokenizer.

    Args:
        encoder: the frozen encoder (``path`` = its weights; empty = random, tests only).
        layers: blocks (0-based, -1 = last) whose outputs are concatenated into the feature.
        quant_dim: D_q, output of ``quant_conv`` and input of the quantiser.
        num_codebooks: C, id streams.
        codebook_bits: T, bits per codebook (K = 2 ** T codes).
        entropy_weight, diversity_gamma, commitment_weight, inv_temperature: the LFQ aux loss (official 0.1, 2.5,
            1.0, 100).
        decoder_hidden: width of the per-patch feature decoder used in training.
        pool: average-pool the feature grid by this factor per side before quantising (1 = one image position per
            encoder patch, as officially; the demo uses 2: 16 positions for the 8 x 8 patches of a 64-px image).
    """

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    quant_dim: int = 64
    num_codebooks: int = 2
    codebook_bits: int = 9
    entropy_weight: float = 0.1
    diversity_gamma: float = 2.5
    commitment_weight: float = 1.0
    inv_temperature: float = 100.0
    decoder_hidden: int = 256
    pool: int = 1

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers: at least one encoder block is needed")
        if self.quant_dim < 1 or self.decoder_hidden < 1 or self.num_codebooks < 1:
            raise ConfigError("quant_dim / decoder_hidden / num_codebooks: must be >= 1")
        if not 1 <= self.codebook_bits <= 16:
            raise ConfigError(f"codebook_bits: {self.codebook_bits} must be in 1..16")
        if self.pool < 1:
            raise ConfigError(f"pool: {self.pool} must be >= 1")
        if min(self.entropy_weight, self.commitment_weight, self.inv_temperature) < 0:
            raise ConfigError("entropy_weight / commitment_weight / inv_temperature: must be >= 0")

    @property
    def codebook_size(self) -> int:
        """K = 2 ** codebook_bits."""
        return 2**self.codebook_bits


def bits_to_ids(bits_CT: Tensor) -> Tensor:
    """Boolean bits [..., T] (first = most significant) -> ids [...]."""
    weights = 2 ** torch.arange(bits_CT.shape[-1] - 1, -1, -1, device=bits_CT.device)
    return (bits_CT.long() * weights).sum(-1)


def ids_to_bits(ids: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`bits_to_ids`: ids [...] -> boolean bits [..., T]."""
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=ids.device)
    return (ids[..., None] & weights) != 0


class LFQOutput(NamedTuple):
    """``quantized`` [..., D] (straight-through in training), ``ids`` [..., C], ``aux_loss`` (scalar), ``stats``."""

    quantized: Tensor
    ids: Tensor
    aux_loss: Tensor
    stats: dict[str, Tensor]


class LookupFreeQuantizer(nn.Module):
    """Sign quantisation of a projection into C codebooks of T bits (see the module docstring)."""

    def __init__(self, dim: int, num_codebooks: int, bits: int, entropy_weight: float = 0.1,
                 diversity_gamma: float = 2.5, commitment_weight: float = 1.0,
                 inv_temperature: float = 100.0) -> None:  # fmt: skip
        super().__init__()
        self.num_codebooks, self.bits = num_codebooks, bits
        self.project_in = nn.Linear(dim, num_codebooks * bits)
        self.project_out = nn.Linear(num_codebooks * bits, dim)
        self.entropy_weight, self.diversity_gamma = entropy_weight, diversity_gamma
        self.commitment_weight, self.inv_temperature = commitment_weight, inv_temperature
        self.register_buffer("codebook_KT", ids_to_bits(torch.arange(2**bits), bits).float() * 2 - 1, persistent=False)

    def codes_to_ids(self, z_CT: Tensor) -> Tensor:
        """Projected values [..., C, T] -> ids [..., C] (positive = bit set)."""
        return bits_to_ids(z_CT > 0)

    def ids_to_codes(self, ids_C: Tensor, project_out: bool = True) -> Tensor:
        """Ids [..., C] -> the +-1 codes [..., C * T], or their ``project_out`` [..., D]."""
        codes = rearrange(ids_to_bits(ids_C, self.bits).float() * 2 - 1, "... c t -> ... (c t)")
        return self.project_out(codes) if project_out else codes

    def forward(self, x_D: Tensor) -> LFQOutput:
        """Quantise [..., D] in fp32; the aux loss and the straight-through estimator are used in training only."""
        with torch.autocast(x_D.device.type, enabled=False):
            z_CT = rearrange(self.project_in(x_D.float()), "... (c t) -> ... c t", c=self.num_codebooks)
            q_CT = torch.where(z_CT > 0, 1.0, -1.0)
            ids_C = self.codes_to_ids(z_CT)
            stats = {"usage": _usage(ids_C, 2**self.bits)}
            if not self.training:
                quantized = self.project_out(rearrange(q_CT, "... c t -> ... (c t)"))
                return LFQOutput(quantized, ids_C, z_CT.new_zeros(()), stats)
            q_st = z_CT + (q_CT - z_CT).detach()
            aux, parts = self._aux_loss(z_CT, q_CT)
            quantized = self.project_out(rearrange(q_st, "... c t -> ... (c t)"))
            return LFQOutput(quantized, ids_C, aux, stats | parts)

    def _aux_loss(self, z_CT: Tensor, q_CT: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Entropy and commitment terms on [..., C, T] (the official LFQ's formulas)."""
        logits_CK = 2 * self.inv_temperature * torch.einsum("...t,kt->...k", z_CT, self.codebook_KT)
        prob_CK = logits_CK.softmax(-1)
        per_sample = _entropy(prob_CK).mean()
        avg_CK = prob_CK.reshape(-1, self.num_codebooks, prob_CK.shape[-1]).mean(0)
        codebook = _entropy(avg_CK).mean()
        commit = F.mse_loss(z_CT, q_CT)
        aux = self.entropy_weight * (per_sample - self.diversity_gamma * codebook) + self.commitment_weight * commit
        return aux, {"per_sample_entropy": per_sample.detach(), "codebook_entropy": codebook.detach(),
                     "commit": commit.detach()}  # fmt: skip


def _entropy(prob: Tensor, eps: float = 1e-5) -> Tensor:
    return -(prob * prob.clamp(min=eps).log()).sum(-1)


def _usage(ids_C: Tensor, size: int) -> Tensor:
    """Mean over codebooks of the fraction of codes used by these ids."""
    flat = ids_C.reshape(-1, ids_C.shape[-1])
    used = [torch.unique(flat[:, c]).numel() / size for c in range(flat.shape[1])]
    return torch.tensor(sum(used) / max(len(used), 1))


class FeatureDecoder(nn.Module):
    """Per-patch MLP from the quantiser's output [.., D] to the feature [.., F] (training objective only)."""

    def __init__(self, dim: int, hidden: int, feature_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, feature_dim)

    def forward(self, x_D: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_D)))


class TokenizedImages(NamedTuple):
    """``codes_BCN`` code ids per codebook, ``features_BNF`` the continuous features, ``quantized_BND`` and
    ``aux_loss`` (training) of the quantiser."""

    codes_BCN: Tensor
    features_BNF: Tensor
    quantized_BND: Tensor
    aux_loss: Tensor
    stats: dict[str, Tensor]


class HybridImageTokenizer(nn.Module):
    """Frozen encoder -> multi-layer features -> ``quant_conv`` -> LFQ codes.

    Args:
        cfg: the config.
        encoder: a built frozen encoder (None = ``build_encoder(cfg.encoder)``).
    """

    def __init__(self, cfg: VisualCodesConfig, encoder: FrozenEncoder | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else build_encoder(cfg.encoder)
        self.feature_dim = self.encoder.dim * len(cfg.layers)
        side = math.isqrt(self.encoder.num_patches)
        if side * side != self.encoder.num_patches or side % cfg.pool:
            raise ConfigError(f"pool: {cfg.pool} does not divide the encoder's {side} x {side} patch grid")
        self.grid = side // cfg.pool
        self.quant_conv = nn.Linear(self.feature_dim, cfg.quant_dim)
        self.quantize = LookupFreeQuantizer(cfg.quant_dim, cfg.num_codebooks, cfg.codebook_bits,
                                            cfg.entropy_weight, cfg.diversity_gamma, cfg.commitment_weight,
                                            cfg.inv_temperature)  # fmt: skip
        self.decoder = FeatureDecoder(cfg.quant_dim, cfg.decoder_hidden, self.feature_dim)

    @property
    def num_patches(self) -> int:
        """N, image positions per image without ``<boi>``/``<eoi>`` (the pooled grid's cells)."""
        return self.grid**2

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @torch.no_grad()
    def features(self, pixels_B3HW: Tensor) -> Tensor:
        """Concatenated block outputs [B, N, F] (fp32) of images in [0, 1], average-pooled by ``cfg.pool``."""
        with torch.autocast(pixels_B3HW.device.type, enabled=False):
            layers = self.encoder.layer_features(pixels_B3HW.float(), self.cfg.layers)
        feats_BNF = torch.cat([x.float() for x in layers], dim=-1)
        if self.cfg.pool == 1:
            return feats_BNF
        p = self.cfg.pool
        return reduce(feats_BNF, "b (gh ph gw pw) f -> b (gh gw) f", "mean", gh=self.grid, ph=p, gw=self.grid, pw=p)

    def forward(self, pixels_B3HW: Tensor) -> TokenizedImages:
        """Codes [B, C, N] and features [B, N, F] (plus the quantiser's training outputs)."""
        feats_BNF = self.features(pixels_B3HW)
        with torch.autocast(feats_BNF.device.type, enabled=False):
            out = self.quantize(self.quant_conv(feats_BNF))
        codes_BCN = rearrange(out.ids, "b n c -> b c n")
        return TokenizedImages(codes_BCN, feats_BNF, out.quantized, out.aux_loss, out.stats)

    def reconstruction_loss(self, quantized_BND: Tensor, feats_BNF: Tensor) -> Tensor:
        """Per-image MSE [B] between the decoded bits and the layer-normalised features (each layer on its own)."""
        chunks = feats_BNF.split(self.encoder.dim, dim=-1)
        target = torch.cat([F.layer_norm(c, c.shape[-1:]) for c in chunks], dim=-1)
        with torch.autocast(feats_BNF.device.type, enabled=False):
            pred = self.decoder(quantized_BND.float())
        return (pred - target).pow(2).mean(dim=(1, 2))


__all__ = [
    "FeatureDecoder",
    "HybridImageTokenizer",
    "LFQOutput",
    "LookupFreeQuantizer",
    "TokenizedImages",
    "VisualCodesConfig",
    "bits_to_ids",
    "ids_to_bits",
]
