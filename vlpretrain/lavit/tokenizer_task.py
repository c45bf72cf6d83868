"""Training stage ``lavit-tokenizer``: the dynamic tokenizer against its frozen encoder's patch features.

Presets: ``tiny`` (the demo: 64-px shapes world, the project's own small ViT, K = 4096), ``base`` (a 224-px ViT of
width 384, merger depth 4, K = 8192) and ``paper`` (the official dimensions: EVA-CLIP ViT-G/14, D = 1408, 12 merger
and 12 decoder blocks, 16 heads, K = 16384 codes of 32 dims). The frozen encoder's weights come from
``model.encoder.path``; without it the encoder is random (tests only).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlpretrain.configs import get_preset, register_preset
from vlpretrain.core.encoders import EncoderSpec
from vlpretrain.data.shards import collate_pairs, decode_pair
from vlpretrain.errors import UserError
from vlpretrain.lavit.tokenizer import DynamicTokenizer, TokenizerConfig


@register_preset("lavit-tokenizer", "tiny")
def tokenizer_tiny() -> TokenizerConfig:
    """The demo's tokenizer. Beside the shared defaults: fast dead-code restarts (``dead_code_threshold`` 0.5: at
    this size the codebook collapses to a few codes when quantisation starts, and with 0.05 it took ~300 steps to
    recover), a firm ratio penalty (``ratio_weight`` 30: with 2 the training keep fraction drifted to 0.4-0.56 and
    held-out tokens at rho reconstructed worse), a Lagrange multiplier that holds the training keep fraction at
    rho (``ratio_dual_lr`` 0.5) and 200 steps of random keep decisions before the selector takes over
    (``random_keep_steps``: without them the selector's decisions followed the patch position rather than its
    content in one run of six, the same 21 tokens for one object as for five); no keep-entropy term (with it
    that happened more often); a 4096-code book without the commitment loss (``codebook_size`` 4096,
    ``commit_weight`` 0): with 1024 codes and the commitment the codes dropped the objects' colours (probe 0.12-0.18,
    chance 0.125), and neither change alone brought it back (0.16 with 4096 codes, 0.31-0.52 without commitment).
    With 1000 steps on the demo data, six runs: code colour probe 0.93-0.99, cosine 0.919-0.959, keep ratio within
    0.011 of rho, 59-70 % of the codes, Spearman(objects, tokens) 0.65-0.74 in five, 0.50 in one (docs/lavit.md,
    "Codes with colour")."""
    return TokenizerConfig(codebook_size=4096, commit_weight=0.0, dead_code_threshold=0.5, ratio_weight=30.0,
                           ratio_dual_lr=0.5, random_keep_steps=200)  # fmt: skip


@register_preset("lavit-tokenizer", "base")
def tokenizer_base() -> TokenizerConfig:
    return TokenizerConfig(encoder=EncoderSpec(kind="eva", preset="small"), merger_depth=4, decoder_depth=4, heads=6,
                           codebook_size=8192, unet_dim=768)  # fmt: skip


@register_preset("lavit-tokenizer", "paper")
def tokenizer_paper() -> TokenizerConfig:
    return TokenizerConfig(encoder=EncoderSpec(kind="eva", preset="eva-g-14"), merger_depth=12, decoder_depth=12,
                           heads=16, mlp_ratio=4.3637, codebook_size=16384, code_dim=32, unet_dim=768,
                           quant_warmup_steps=2000)  # fmt: skip


def load_frozen_tokenizer(path: str, preset: str = "tiny") -> DynamicTokenizer:
    """The trained tokenizer in the ``lavit-tokenizer`` folder ``path``, or a random ``preset`` one when it is empty
    (tests); the later stages (detokenizer, unified LM) read their frozen tokenizer through this."""
    if not path:
        return DynamicTokenizer(get_preset("lavit-tokenizer", preset))
    from vlpretrain.train.pretrained import load_task

    if not Path(path).exists():
        raise UserError(f"model.tokenizer: {path}: no such tokenizer folder")
    task, _ = load_task(path, expect_task="lavit-tokenizer")
    return task.tokenizer


class LavitTokenizerTask(nn.Module):
    """Wraps :class:`DynamicTokenizer` for the training loop; one target = one image."""

    config_cls = TokenizerConfig
    target_unit = "img"

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.tokenizer = DynamicTokenizer(cfg)
        self.tokenizer.decoder.unet_proj.requires_grad_(False)  # trained by the detokenizer stage

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        out = self.tokenizer(batch["image"])
        parts = {"rec_cos": out.rec_cos, "keep_ratio": out.keep_ratio, "commit": out.commit}
        parts |= {k: v for k, v in out.stats.items() if k in ("usage", "perplexity", "active_codes")}
        return {"loss": out.loss_B.sum()} | parts

    def num_targets(self, batch: dict[str, Any]) -> int:
        return len(batch["image"])

    def flops_per_target(self) -> float:
        return self.tokenizer.flops_per_image()

    def shard_units(self) -> list[nn.Module]:
        return [*self.tokenizer.causal_encoder.blocks, *self.tokenizer.decoder.blocks]

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any:
        from vlpretrain.train.streams import pair_dataset

        decode = functools.partial(decode_pair, image_size=self.tokenizer.encoder.image_size)
        return pair_dataset(data_cfg, split, rank, world_size, decode=decode, collate=collate_pairs)
