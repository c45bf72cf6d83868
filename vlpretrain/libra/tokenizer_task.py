"""Training stage ``libra-tokenizer``: the lookup-free quantiser on a frozen encoder's multi-layer features.

The official release ships a trained tokenizer but no recipe for it; ours trains ``quant_conv`` + the LFQ (+ a
per-patch feature decoder that is only a training head) to reconstruct the layer-normalised features from the bits,
with the official LFQ aux loss (entropy and commitment). One target = one image. Presets: ``tiny`` (the demo: the
64-px shapes-world ViT, blocks 0-3, F = 512, D_q = 64, 16 pooled positions) and ``paper`` (CLIP ViT-L/14-336 as a
local HF folder, HF hidden states 2, 10, 18, 22 = blocks 1, 9, 17, 21, F = 4096, D_q = 1024; ``model.encoder.path``
must be set).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlpretrain.configs import register_preset
from vlpretrain.core.encoders import EncoderSpec
from vlpretrain.data.shards import collate_pairs, decode_pair
from vlpretrain.errors import UserError
from vlpretrain.libra.visual_codes import HybridImageTokenizer, VisualCodesConfig

TASK = "libra-tokenizer"


@register_preset(TASK, "tiny")
def codes_tiny() -> VisualCodesConfig:
    """The demo: the tiny ViT's four blocks (F = 4 x 128), D_q = 64, two 9-bit codebooks, the 8 x 8 patch grid
    pooled to 4 x 4 positions."""
    return VisualCodesConfig(pool=2)


@register_preset(TASK, "paper")
def codes_paper() -> VisualCodesConfig:
    """CLIP ViT-L/14-336 (a local HF folder in ``encoder.path``), blocks 1, 9, 17, 21, D_q = 1024."""
    return VisualCodesConfig(encoder=EncoderSpec(kind="hf", path="openai-clip-vit-large-patch14-336"),
                             layers=[1, 9, 17, 21], quant_dim=1024, decoder_hidden=4096)  # fmt: skip


class LibraTokenizerTask(nn.Module):
    """The hybrid tokenizer as a training stage (the encoder stays frozen)."""

    config_cls = VisualCodesConfig
    target_unit = "img"

    def __init__(self, cfg: VisualCodesConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = HybridImageTokenizer(cfg)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Summed per-image reconstruction MSE + aux loss; logs usage and entropies."""
        out = self.tokenizer(batch["image"])
        rec_B = self.tokenizer.reconstruction_loss(out.quantized_BND, out.features_BNF)
        loss = rec_B.sum() + out.aux_loss * len(rec_B)
        return {"loss": loss, "rec": rec_B.detach().mean(), **{k: v.detach() for k, v in out.stats.items()}}

    def num_targets(self, batch: dict[str, Any]) -> int:
        return len(batch["image"])

    def flops_per_target(self) -> float:
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        encoder = sum(p.numel() for p in self.tokenizer.encoder.parameters())
        return (6.0 * trained + 2.0 * encoder) * self.tokenizer.num_patches

    def shard_units(self) -> list[nn.Module]:
        return [self.tokenizer.decoder]

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any:
        from vlpretrain.train.streams import pair_dataset

        decode = functools.partial(decode_pair, image_size=self.tokenizer.image_size)
        return pair_dataset(data_cfg, split, rank, world_size, decode=decode, collate=collate_pairs)


def load_visual_tokenizer(path: str, random_cfg: VisualCodesConfig) -> HybridImageTokenizer:
    """The frozen tokenizer of a ``libra-tokenizer`` folder, or (``path`` empty) a random one from ``random_cfg``
    built from a fixed seed, so that reloading a test checkpoint rebuilds the same random tokenizer. Eval mode, no
    gradients."""
    if path:
        from vlpretrain.train.pretrained import load_task

        if not Path(path).exists():
            raise UserError(f"model.tokenizer: {path}: no such libra-tokenizer folder")
        task, _ = load_task(path, expect_task=TASK)
        tokenizer = task.tokenizer
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_cfg.encoder.seed)
            tokenizer = HybridImageTokenizer(random_cfg)
    return tokenizer.eval().requires_grad_(False)


__all__ = ["LibraTokenizerTask", "TASK", "codes_paper", "codes_tiny", "load_visual_tokenizer"]
