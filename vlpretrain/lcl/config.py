"""Typed config of the ``lcl`` training stage and its presets (``tiny`` for the CPU demo, ``paper`` = ViT-B/16).

The vision encoder is our :class:`~vlpretrain.core.vit.VisionTransformer` in open_clip's variant (a plain ``qkv``
bias, LayerNorm eps 1e-5) plus open_clip's ``ln_pre``; the causal LM is open_clip's text transformer (learned
absolute positions, pre-norm blocks, exact GELU). The pooled image latent, the patch tokens fed to the LM and the LM
width are one size E: the same projection produces all of them (see :mod:`vlpretrain.lcl.pool`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from vlpretrain.configs import ConfigError, check_at_least, check_divides, register_preset
from vlpretrain.core.vit import ViTConfig

TASK = "lcl"
Objective = Literal["lcl", "clip", "gen", "emu"]
DataFormat = Literal["auto", "pairs", "mmc4", "obelics"]
SPECIAL_NAMES = ("pad", "sot", "eot", "img", "soi", "eoi")
# The official open_clip BPE ids (LCL_ViT-B-16_laion.json): 49408 text tokens + <img_placehold>, <soi>, <eoi>.
OFFICIAL_SPECIAL_IDS = {"pad": 0, "sot": 49406, "eot": 49407, "img": 49408, "soi": 49409, "eoi": 49410}
OFFICIAL_VOCAB_SIZE = 49411
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class CausalLMSpec:
    """Size of the causal LM (open_clip's text transformer layout).

    Args:
        width: hidden size W; also the size E of the image latent and of the contrastive embedding.
        layers: transformer blocks.
        heads: attention heads; must divide ``width``.
        mlp_ratio: MLP hidden size = ``int(width * mlp_ratio)``.
        context_length: number of learned positions (the longest sequence).
        ln_eps: LayerNorm epsilon.
        alibi: add ALiBi's linear distance penalties to the attention scores (head h's slope 2^(-8 (h+1) / heads)),
            on top of the learned positions: a prior towards recent tokens. Off in the official model.
    """

    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = 512
    ln_eps: float = 1e-5
    alibi: bool = False

    def __post_init__(self) -> None:
        check_at_least(self, 1, ("width", "layers", "heads", "context_length"), prefix="text.")
        check_divides(self.heads, self.width, "text.heads", "width")
        if int(self.width * self.mlp_ratio) < 1 or not self.ln_eps > 0:
            raise ConfigError("text.mlp_ratio / text.ln_eps: must give a non-empty MLP and a positive epsilon")


@dataclass
class LCLDataSpec:
    """How training data becomes sequences.

    Args:
        format: "pairs" (webdataset pair shards), "mmc4" (jsonl + image folder), "obelics" (parquet) or "auto"
            (``.jsonl``/``.jsonl.gz``/``.zip`` -> mmc4, ``.parquet`` -> obelics, anything else -> pairs).
        image_dir: MMC4 image folder ("" = ``doc_images`` beside the first jsonl file, the shapes-world layout).
        image_first_prob: probability of an image block going before its caption (pairs) or sentence (MMC4).
        min_sim: MMC4 image-sentence similarity threshold.
        max_images: MMC4 images per document.
        crop_scale: random-resized-crop area range of training images ([1, 1] = resize only).
        documents_as_pairs: sequence objectives read each document image with its sentence as a PAIR row (the pair
            layout above) instead of the whole document: a diagnostic that separates the objective from the
            document context (the CLIP-style baseline always reads pairs).
    """

    format: DataFormat = "auto"
    image_dir: str = ""
    image_first_prob: float = 0.5
    min_sim: float = 0.24
    max_images: int = 6
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    documents_as_pairs: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.image_first_prob <= 1.0:
            raise ConfigError(f"data.image_first_prob: {self.image_first_prob} is outside [0, 1]")
        check_at_least(self, 1, ("max_images",), prefix="data.")
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"data.crop_scale: expected [low, high] with 0 < low <= high <= 1, got {lo_hi}")


def _default_vit() -> ViTConfig:
    return ViTConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4, qkv_bias="qkv", ln_eps=1e-5)


@dataclass
class LCLConfig:
    """Model, objective and data settings of the ``lcl`` task.

    Args:
        vit: the vision encoder (open_clip's variant: ``qkv_bias="qkv"``, ``head_out=0``).
        text: the causal LM; ``text.width`` is also the latent size E.
        pool_heads: heads of the attentive pooling (head dim = E / pool_heads; the official uses 64).
        objective: "lcl" (lambda * L_con + L_gen), "clip" (contrastive on image-text pairs only), "gen"
            (generation only, Flamingo-style) or "emu" (L_gen + lambda * latent regression, Emu-style).
        con_weight: lambda, the weight of the contrastive (lcl) or regression (emu) term.
        image_token_grad: whether the image tokens the LM reads pass gradient back to the encoder (the paper's and
            the official code's choice). False is a diagnostic: the encoder then learns only through the pooled
            latent (the contrastive target), and L_gen no longer reaches it.
        init_logit_scale: initial log logit scale (clamped to [0, ln 100] whenever used).
        max_len: tokens per sequence (pair or document rows; longer documents are cut).
        tokenizer: "shapes-world" (built in), a local HF tokenizer folder, or "" (no text side: converted weights
            used for image features only; needs ``special_ids``).
        special_ids: explicit ids of pad, sot, eot, img, soi, eoi ({} = sot/eot/pad from the tokenizer and three new
            ids after its vocabulary).
        vocab_size: embedding rows when ``special_ids`` is given (0 = derived from the tokenizer).
        data: how training data becomes sequences.
    """

    vit: ViTConfig = field(default_factory=_default_vit)
    text: CausalLMSpec = field(default_factory=CausalLMSpec)
    pool_heads: int = 2
    objective: Objective = "lcl"
    con_weight: float = 0.1
    image_token_grad: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_len: int = 512
    tokenizer: str = "shapes-world"
    special_ids: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0
    data: LCLDataSpec = field(default_factory=LCLDataSpec)

    def __post_init__(self) -> None:
        if self.vit.qkv_bias != "qkv" or self.vit.head_out:
            raise ConfigError("vit: LCL's encoder is open_clip's ViT: set vit.qkv_bias=qkv and vit.head_out=0")
        check_divides(self.pool_heads, self.text.width, "pool_heads", "the latent size")
        check_at_least(self, 0, ("con_weight",))
        if not 0 <= self.init_logit_scale <= MAX_LOGIT_SCALE:
            raise ConfigError(f"init_logit_scale: {self.init_logit_scale} is outside [0, ln 100]")
        if not self.vit.num_patches + 4 <= self.max_len <= self.text.context_length:
            raise ConfigError(
                f"max_len: {self.max_len} must hold one image block ({self.vit.num_patches} + 4 tokens) and be "
                f"<= text.context_length ({self.text.context_length})"
            )
        self._check_special_ids()

    def _check_special_ids(self) -> None:
        if not self.special_ids:
            if not self.tokenizer:
                raise ConfigError("special_ids: needed when tokenizer is '' (no tokenizer to derive them from)")
            if self.vocab_size:
                raise ConfigError("vocab_size: set it only together with special_ids")
            return
        missing = [n for n in SPECIAL_NAMES if n not in self.special_ids]
        unknown = sorted(set(self.special_ids) - set(SPECIAL_NAMES))
        if missing or unknown:
            raise ConfigError(f"special_ids: missing {missing}, unknown {unknown} (expected {list(SPECIAL_NAMES)})")
        ids = [self.special_ids[n] for n in SPECIAL_NAMES]
        if not all(0 <= i < self.vocab_size for i in ids):
            raise ConfigError(f"special_ids: every id must be in [0, vocab_size={self.vocab_size}), got {ids}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"special_ids: ids must be distinct, got {self.special_ids}")


@register_preset(TASK, "tiny")
def lcl_tiny() -> LCLConfig:
    """The CPU demo: a 4-block, 128-wide ViT on 64 px images (patch 8: N = 64) and a 2-block, 128-wide causal LM
    (about 1.3M parameters in all)."""
    return LCLConfig()


@register_preset(TASK, "paper")
def lcl_paper() -> LCLConfig:
    """``LCL_ViT-B-16_laion``: ViT-B/16 at 224 px (N = 196), a 12-block 768-wide LM with 280 positions, 12 pooling
    heads, the official BPE vocabulary ids (no tokenizer is bundled: set ``tokenizer`` to a local CLIP tokenizer
    folder with the three image tokens to train or encode text)."""
    vit = ViTConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12, qkv_bias="qkv", ln_eps=1e-5)
    text = CausalLMSpec(width=768, layers=12, heads=12, context_length=280)
    return LCLConfig(vit=vit, text=text, pool_heads=12, max_len=280, tokenizer="",
                     special_ids=dict(OFFICIAL_SPECIAL_IDS), vocab_size=OFFICIAL_VOCAB_SIZE)  # fmt: skip


__all__ = ["TASK", "CausalLMSpec", "LCLConfig", "LCLDataSpec", "lcl_paper", "lcl_tiny"]
