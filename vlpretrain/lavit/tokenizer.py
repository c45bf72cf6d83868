"""LaVIT's dynamic visual tokenizer: frozen encoder -> selector -> merger -> quantizer -> feature decoder.

An image becomes a content-dependent number of discrete tokens: the selector keeps the informative patches, the
merger folds the dropped patches into the kept ones, ``encode_task_layer`` maps each merged token to a C-d vector
and the cosine codebook turns it into a code id. The feature decoder reconstructs all N patch features of the frozen
encoder from the codes: that reconstruction is the training signal.

Parameter names follow the official checkpoint (``token_predictor.*``, ``causal_encoder.*``,
``encode_task_layer.*``, ``quantize.embedding.weight``; the feature decoder under ``decoder.*``; the frozen encoder
under ``encoder.*``) so that `vlpretrain convert lavit-tokenizer` maps keys one to one.

Training loss per image: mean over patches of (1 - cos(reconstruction, X)) + ratio_weight * (rho - kept fraction)^2
+ commit_weight * commitment (+ multiplier * (kept fraction - rho) with ``ratio_dual_lr``); quantisation is off
(codes = normalised vectors) for the first ``quant_warmup_steps`` training forward calls.

Shape letters: B images, N patches, K kept tokens (padded), D width, C code dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlpretrain.configs import ConfigError
from vlpretrain.core.attention import init_linear_and_norm
from vlpretrain.core.encoders import EncoderSpec, build_encoder
from vlpretrain.core.quantize import CosineCodebook, all_reduce_if_distributed
from vlpretrain.lavit.feature_decoder import FeatureDecoder
from vlpretrain.lavit.merger import TokenMerger, kept_index
from vlpretrain.lavit.selector import TokenSelector, keep_decision, keep_entropy, log_odds_excess, ratio_loss


@dataclass
class TokenizerConfig:
    """Sizes and training settings of the dynamic tokenizer (the width D is the frozen encoder's).

    Args:
        encoder: the frozen encoder (our EVA-style ViT preset/file, or a local HF CLIP/SigLIP folder).
        merger_depth, decoder_depth, heads, mlp_ratio: the merger's and the feature decoder's transformer sizes.
        codebook_size, code_dim: K codes of C dims.
        unet_dim: width of ``unet_proj`` (the diffusion decoder's conditioning width).
        rho: the target kept fraction.
        ratio_per_image: penalise each image's kept fraction (True) or the batch's mean (False, the default: a
            per-image penalty pulls every image toward rho x N, the batch-level one lets token counts follow content;
            measured in docs/lavit.md).
        ratio_weight, commit_weight: loss weights.
        ratio_dual_lr: step size of a Lagrange multiplier on the batch's kept fraction (0 = off, official): the
            loss gains ``multiplier * (kept fraction - rho)`` and after every training forward the multiplier
            moves by ``ratio_dual_lr * (kept fraction - rho)`` (all ranks' mean), so the kept fraction is held at
            rho on average whatever the reconstruction would rather keep. A fixed ``ratio_weight`` lets it drift
            above rho, and the deterministic threshold (calibrated to rho) then keeps fewer tokens than training
            did (docs/lavit.md, "Codes with shape").
        keep_entropy_weight: weight of the mean binary entropy of the keep probabilities (0 = off, official): a
            confident selector keeps in deterministic inference what it kept in training.
        keep_log_odds_bound: penalise keep log-odds beyond +- this bound (:func:`log_odds_excess`, weight 1; 0 = off,
            official): keeps a saturated selector from dropping every patch for good.
        quant_warmup_steps: training forward calls before quantisation switches on.
        random_keep_steps: training forward calls in which each patch is kept at random with probability rho
            instead of by the selector (ours; 0 = official): merger, codebook and decoder first learn to work from
            any subset of the patches, before the selector picks one (docs/lavit.md, "Token counts that follow
            content").
        ema_decay, kmeans_iters, dead_code_threshold: codebook training (see vlpretrain.core.quantize).
        eval_keep: keep decisions outside training: "deterministic" (the calibrated threshold), "sample"
            (official), or "all" (every patch: the fixed-length baseline of the paper's dynamic-vs-fixed ablation).
        eval_merger: "kept" computes only kept rows when tokenising (fast, exact up to the official eps-softmax's
            ~1e-6 leak); "dense" runs the official all-rows algorithm (bit-for-bit official codes, ~3x slower).
        policy_decoder: in training, decode all rows with the keep mask as attention policy, so that the selector
            learns from each token's use to the reconstruction (False: the decoder sees the kept rows only).
        decoder_init: how the feature decoder starts (:meth:`FeatureDecoder.init_weights`). With ``official``
            (trunc-normal 0.02, near-zero positions and queries) the learned queries' attention over the codes
            starts uniform and stays so for hundreds of steps at small widths: every query reads the image mean.
            ``fan_in`` gives the attention scores unit scale from the start (measured at D = 128 with all patches
            kept: held-out reconstruction cosine 0.70 after 200 steps with ``official``, 0.91 with ``fan_in``).
        calibrate_threshold: in training, track the log-odds threshold at which deterministic keep decisions keep
            the fraction ``rho`` of the training patches (see :class:`TokenSelector`); False: p_keep > 0.5.
    """

    encoder: EncoderSpec = field(default_factory=lambda: EncoderSpec(kind="eva", preset="tiny"))
    merger_depth: int = 2
    decoder_depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    codebook_size: int = 1024
    code_dim: int = 32
    unet_dim: int = 64
    rho: float = 1 / 3
    ratio_per_image: bool = False
    ratio_weight: float = 2.0
    commit_weight: float = 1.0
    keep_entropy_weight: float = 0.0
    keep_log_odds_bound: float = 0.0
    ratio_dual_lr: float = 0.0
    quant_warmup_steps: int = 100
    random_keep_steps: int = 0
    ema_decay: float = 0.99
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.05
    eval_keep: Literal["deterministic", "sample", "all"] = "deterministic"
    eval_merger: Literal["kept", "dense"] = "kept"
    policy_decoder: bool = True
    calibrate_threshold: bool = True
    decoder_init: Literal["official", "fan_in"] = "fan_in"

    def __post_init__(self) -> None:
        if not 0 < self.rho <= 1:
            raise ConfigError(f"rho: {self.rho} must be in (0, 1]")
        if min(self.merger_depth, self.decoder_depth, self.heads, self.codebook_size, self.code_dim) < 1:
            raise ConfigError("merger_depth, decoder_depth, heads, codebook_size, code_dim: must be >= 1")
        if self.quant_warmup_steps < 0 or self.random_keep_steps < 0:
            raise ConfigError("quant_warmup_steps, random_keep_steps: must be >= 0")
        if self.ratio_dual_lr < 0:
            raise ConfigError(f"ratio_dual_lr: must be >= 0 (0 = off), got {self.ratio_dual_lr}")
        if self.keep_log_odds_bound < 0:
            raise ConfigError(f"keep_log_odds_bound: must be >= 0 (0 = none), got {self.keep_log_odds_bound}")


@dataclass
class TokenizerOutput:
    """One forward pass: per-image losses [B] and detached statistics."""

    loss_B: Tensor
    rec_cos: Tensor
    keep_ratio: Tensor
    commit: Tensor
    stats: dict[str, Tensor]


@dataclass
class Tokenized:
    """What :meth:`DynamicTokenizer.tokenize_features` computes for a batch: keep masks [B, N] (bool), merged kept
    tokens [B, K, D] (padded) with their valid mask [B, K], the quantizer's input ``z`` [B, K, C] (before
    normalisation) and code ids [B, K] (padding rows hold arbitrary ids)."""

    keep_BN: Tensor
    merged_BKD: Tensor
    valid_BK: Tensor
    z_BKC: Tensor
    ids_BK: Tensor

    def ids_and_keep(self) -> tuple[list[Tensor], Tensor]:
        """Each image's code ids (a list of [K_b] long tensors) and the keep masks [B, N]."""
        return [self.ids_BK[b, self.valid_BK[b]] for b in range(len(self.ids_BK))], self.keep_BN


class DynamicTokenizer(nn.Module):
    """The whole tokenizer. ``forward`` computes training losses; ``tokenize`` / ``decode_codes`` are inference."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        dim = self.encoder.dim
        if dim % cfg.heads:
            raise ConfigError(f"heads: the encoder width {dim} is not divisible by {cfg.heads}")
        hidden = int(dim * cfg.mlp_ratio)
        self.token_predictor = TokenSelector(dim)
        self.causal_encoder = TokenMerger(dim, cfg.merger_depth, cfg.heads, hidden)
        self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, cfg.code_dim))
        self.quantize = CosineCodebook(
            cfg.codebook_size,
            cfg.code_dim,
            decay=cfg.ema_decay,
            kmeans_iters=cfg.kmeans_iters,
            dead_code_threshold=cfg.dead_code_threshold,
        )
        self.decoder = FeatureDecoder(cfg.code_dim, dim, cfg.decoder_depth, cfg.heads, hidden,
                                      self.encoder.num_patches, dim, cfg.unet_dim)  # fmt: skip
        self.decoder.init_weights(cfg.decoder_init)
        self.register_buffer("train_calls", torch.zeros((), dtype=torch.long))
        if cfg.ratio_dual_lr:  # only then: checkpoints without the option keep their keys
            self.register_buffer("ratio_multiplier", torch.zeros(()))  # see TokenizerConfig.ratio_dual_lr
        self.encode_task_layer.apply(init_linear_and_norm)

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    def keep_mask(self, x_BND: Tensor) -> Tensor:
        """Keep decisions [B, N] (float 0/1): Gumbel straight-through in training, else :meth:`inference_keep`.

        In training with ``calibrate_threshold`` the selector's deterministic threshold is calibrated to ``rho``.
        """
        return self.decide_keep(self.token_predictor(x_BND))

    def decide_keep(self, logp_BN2: Tensor) -> Tensor:
        """:meth:`keep_mask` given the selector's log-probabilities [B, N, 2]."""
        if not self.training:
            return self.inference_keep(logp_BN2)
        if int(self.train_calls) < self.cfg.random_keep_steps:
            return (torch.rand(logp_BN2.shape[:-1], device=logp_BN2.device) < self.cfg.rho).to(logp_BN2.dtype)
        keep_BN = keep_decision(logp_BN2, "gumbel")
        if self.cfg.calibrate_threshold:
            self.token_predictor.calibrate(logp_BN2, self.cfg.rho)
        return keep_BN

    def inference_keep(self, logp_BN2: Tensor) -> Tensor:
        """Keep decisions [B, N] of ``cfg.eval_keep``: the calibrated deterministic threshold, a sample, or all."""
        if self.cfg.eval_keep == "all":
            return torch.ones_like(logp_BN2[..., 0])
        if self.cfg.eval_keep == "deterministic":
            return self.token_predictor.deterministic(logp_BN2)
        return keep_decision(logp_BN2, "sample")

    def forward(self, images_BCHW: Tensor) -> TokenizerOutput:
        """Training losses of images [B, 3, H, W] in [0, 1]."""
        return self.forward_features(self.encoder(images_BCHW))

    def forward_features(self, x_BND: Tensor) -> TokenizerOutput:
        """Training losses given the frozen encoder's patch features [B, N, D] (e.g. cached ones).

        In training with ``policy_decoder`` every row goes through merger, quantizer and decoder, the keep mask acting
        as an attention policy (see :meth:`FeatureDecoder.forward_policy`); otherwise only the kept rows do.
        """
        logp_BN2 = self.token_predictor(x_BND)
        keep_BN = self.decide_keep(logp_BN2)
        quantizing = not self.training or int(self.train_calls) >= self.cfg.quant_warmup_steps
        if self.training:
            self.train_calls += 1
        if self.training and self.cfg.policy_decoder:
            z_BNC = self.encode_task_layer(self.causal_encoder.forward_dense(x_BND, keep_BN))
            codes_BNC, commit, stats = self._quantize(z_BNC, keep_BN.detach().bool(), quantizing)
            rec_BND = self.decoder.forward_policy(codes_BNC, keep_BN)
        else:
            merged_BKD, valid_BK = self.causal_encoder(x_BND, keep_BN, dense=self.training)
            codes_BKC, commit, stats = self._quantize(self.encode_task_layer(merged_BKD), valid_BK, quantizing)
            rec_BND = self.decoder(codes_BKC, valid_BK)
        cos_BN = F.cosine_similarity(rec_BND.float(), x_BND.float(), dim=-1)
        ratio_B = ratio_loss(keep_BN, self.cfg.rho, self.cfg.ratio_per_image)
        loss_B = (1 - cos_BN).mean(dim=1) + self.cfg.ratio_weight * ratio_B + self.cfg.commit_weight * commit
        if self.cfg.keep_entropy_weight:
            loss_B = loss_B + self.cfg.keep_entropy_weight * keep_entropy(logp_BN2).mean(dim=1)
        if self.cfg.keep_log_odds_bound:
            loss_B = loss_B + log_odds_excess(logp_BN2, self.cfg.keep_log_odds_bound).mean(dim=1)
        if self.training and self.cfg.ratio_dual_lr:
            kept_B = keep_BN.float().mean(dim=1)
            multiplier = self.ratio_multiplier.clone()  # the step below changes the buffer in place
            loss_B = loss_B + multiplier * (kept_B - self.cfg.rho)
            self._ratio_dual_step(kept_B.detach())
        return TokenizerOutput(loss_B, cos_BN.mean().detach(), keep_BN.mean().detach(), commit.detach(), stats)

    @torch.no_grad()
    def _ratio_dual_step(self, kept_B: Tensor) -> None:
        """Move the ratio multiplier by ``ratio_dual_lr`` times the gap between the kept fraction of all ranks' images
        (``kept_B`` [B], this rank's) and rho; every rank applies the same step."""
        total = torch.stack([kept_B.sum(), kept_B.new_tensor(float(len(kept_B)))])
        all_reduce_if_distributed(total)
        gap = total[0] / total[1].clamp(min=1.0) - self.cfg.rho
        self.ratio_multiplier.add_(self.cfg.ratio_dual_lr * gap.to(self.ratio_multiplier.dtype))

    def _quantize(self, z: Tensor, valid: Tensor, quantizing: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(codes [..., C], commitment loss, statistics); before quantisation starts, the normalised vectors."""
        if quantizing:
            q = self.quantize(z, valid)
            return q.z_q, q.loss, q.stats
        return F.normalize(z.float(), dim=-1), z.new_zeros((), dtype=torch.float), {}

    @torch.no_grad()
    def tokenize(self, images_BCHW: Tensor) -> tuple[list[Tensor], Tensor]:
        """Code ids of each image (a list of [K_b] long tensors) and the keep masks [B, N] (bool)."""
        return self.tokenize_features(self.encoder(images_BCHW)).ids_and_keep()

    @torch.no_grad()
    def tokenize_features(self, x_BND: Tensor) -> Tokenized:
        """:meth:`tokenize` given the frozen encoder's patch features [B, N, D], keeping every intermediate (for
        diagnostics that also need the features, e.g. a reconstruction cosine)."""
        keep_BN = self.inference_keep(self.token_predictor(x_BND))
        merged_BKD, valid_BK = self.causal_encoder(x_BND, keep_BN, dense=self.cfg.eval_merger == "dense")
        z_BKC = self.encode_task_layer(merged_BKD)
        return Tokenized(keep_BN.bool(), merged_BKD, valid_BK, z_BKC, self.quantize.encode(z_BKC))

    @torch.no_grad()
    def decode_codes(self, ids: list[Tensor]) -> Tensor:
        """Reconstructed patch features [B, N, D] from code-id sequences (each [K_b], 0 <= id < codebook_size)."""
        if not ids:
            raise ValueError("decode_codes: no sequences given")
        for b, seq in enumerate(ids):
            if seq.ndim != 1 or (len(seq) and (seq.min() < 0 or seq.max() >= self.cfg.codebook_size)):
                raise ValueError(f"sequence {b}: ids must be a 1-d tensor in [0, {self.cfg.codebook_size})")
            if len(seq) > self.num_patches:
                raise ValueError(f"sequence {b}: {len(seq)} codes, more than the {self.num_patches} patches")
        k = max(max(len(s) for s in ids), 1)
        padded = torch.zeros(len(ids), k, dtype=torch.long, device=self.decoder.pos_embed.device)
        valid = torch.zeros(len(ids), k, dtype=torch.bool, device=padded.device)
        for b, seq in enumerate(ids):
            padded[b, : len(seq)], valid[b, : len(seq)] = seq, True
        return self.decoder(self.quantize.indices_to_codes(padded), valid)

    def flops_per_image(self) -> float:
        """Approximate training FLOPs per image (trainable parts: forward + backward = 3x forward; encoder forward)."""
        n, d = self.num_patches, self.encoder.dim
        k = max(int(n * self.cfg.rho), 1)
        block = 2 * d * d * (4 + 2 * self.cfg.mlp_ratio)  # qkv/proj + cross q/k/v/proj + mlp, per token
        merger = self.cfg.merger_depth * (n * (block + 4 * n * d))
        decoder = self.cfg.decoder_depth * (n * (block + 2 * n * d + 2 * k * d))
        encoder = sum(p.numel() for p in self.encoder.parameters()) * 2 * n
        return 3.0 * (merger + decoder) + encoder


def count_statistics(ids: list[Tensor], codebook_size: int) -> dict[str, Any]:
    """Tokens per image (mean/min/max), codes used and perplexity of the code distribution over ``ids``."""
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.float)
    flat = torch.cat([s.cpu() for s in ids]) if ids else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(flat, minlength=codebook_size).float()
    p = counts / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    return {
        "tokens_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "tokens_min": int(lengths.min()) if len(lengths) else 0,
        "tokens_max": int(lengths.max()) if len(lengths) else 0,
        "codes_used": int((counts > 0).sum()),
        "code_usage": float((counts > 0).float().mean()),
        "code_perplexity": float(perplexity),
    }


__all__ = ["DynamicTokenizer", "TokenizerConfig", "TokenizerOutput", "count_statistics", "kept_index"]
