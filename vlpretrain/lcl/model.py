"""The LCL network: a ViT, attentive pooling/projection, a causal LM over interleaved sequences, two read-outs.

- Vision: :class:`VisualTower` = our ViT in open_clip's layout (``ln_pre`` after the position embedding,
  ``ln_post`` = the ViT's final ``norm``); its patch tokens (CLS dropped) go to the attentive pooling
  (:class:`~vlpretrain.lcl.pool.AttentivePoolProjection`), which returns the pooled image latent z [I, E] and the
  projected tokens [I, N, E] that replace the ``<img>`` placeholders of the image's block ``<soi> <img>*N <eoi>``.
- LM: :class:`~vlpretrain.lcl.text.CausalTransformer` (learned positions, plain causal mask) over the interleaved
  embeddings; raw hidden states [B, L, W].
- Contrastive read-out: the hidden state AT each ``<soi>`` (the prediction of the coming image from the preceding
  context) -> ``ln_final`` -> ``text_projection``, l2-normalised, against the l2-normalised z of that image; a
  ``<soi>`` at position 0 has no context and is excluded (with its image).
- Generation read-out: :class:`~vlpretrain.lcl.text.LMHead` on the raw hidden states; targets are the next tokens
  except ``<img>``, ``<eoi>`` and padding (so ``<soi>`` and ``<eot>`` are predicted).
- ``logit_scale``: a learnable log temperature, clamped to [0, ln 100] before every use (the official code clamps
  after every optimizer step; both give the loss the same value).

The same network serves every objective of :mod:`vlpretrain.lcl.task` (LCL, CLIP-style, generation-only,
Emu-style), so their encoders are directly comparable.

Shape letters: I images, N patches per image, D encoder width, E latent width (= W), B rows, L sequence length,
W LM width, V vocabulary, X selected positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlpretrain.core.vit import LayerNorm, VisionTransformer, ViTConfig
from vlpretrain.lcl.config import MAX_LOGIT_SCALE, LCLConfig
from vlpretrain.lcl.pool import AttentivePoolProjection
from vlpretrain.lcl.text import CausalTransformer, LMHead
from vlpretrain.lcl.vocab import LCLVocab


class VisualTower(nn.Module):
    """open_clip's ViT on our :class:`VisionTransformer`: embed -> ``ln_pre`` -> blocks -> ``ln_post`` (``vit.norm``).

    open_clip's patch convolution has no bias; ours has one, kept at zero and frozen so the two stay identical.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.vit = VisionTransformer(cfg)
        self.ln_pre = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.vit.patch_embed.proj.bias.requires_grad_(False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The ViT's own init, a zero patch bias and a unit ``ln_pre``."""
        self.vit.init_weights()
        self.vit.patch_embed.proj.bias.zero_()
        self.ln_pre.reset_parameters()

    def forward(self, pixels_ICHW: Tensor) -> Tensor:
        """Normalised pixels [I, 3, S, S] -> patch tokens [I, N, D] after ``ln_post``, CLS dropped."""
        x_ITD = self.ln_pre(self.vit.embed(pixels_ICHW))
        for block in self.vit.blocks:
            x_ITD = block(x_ITD)
        return self.vit.norm(x_ITD)[:, 1:]


class LCLModel(nn.Module):
    """The whole network (see the module docstring).

    Args:
        cfg: sizes.
        vocab: special token ids and the embedding table size.
    """

    def __init__(self, cfg: LCLConfig, vocab: LCLVocab) -> None:
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        width = cfg.text.width
        self.visual = VisualTower(cfg.vit)
        self.pool = AttentivePoolProjection(cfg.vit.width, width, cfg.pool_heads, cfg.text.ln_eps)
        self.text = CausalTransformer(cfg.text, vocab.size, width)
        self.lm_head = LMHead(width, vocab.size, cfg.text.ln_eps)
        # [1], not a scalar: FSDP2 cannot shard 0-d parameters (the official checkpoint stores a scalar)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))

    # ------------------------------------------------------------------------------------------------- images
    def encode_image(self, pixels_ICHW: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled latents z [I, E] and LM image tokens [I, N, E] of normalised pixels [I, 3, S, S]."""
        return self.pool(self.visual(pixels_ICHW))

    def image_embeddings(self, pixels_ICHW: Tensor) -> Tensor:
        """l2-normalised pooled latents [I, E] (the image side of retrieval and zero-shot classification)."""
        return F.normalize(self.encode_image(pixels_ICHW)[0].float(), dim=-1)

    # ------------------------------------------------------------------------------------------- sequences
    def interleave(self, ids_BL: Tensor, tokens_INE: Tensor) -> Tensor:
        """Token embeddings [B, L, W] with the ``<img>`` placeholders replaced, in reading order (row-major), by the
        images' tokens [I, N, E]."""
        embeds_BLW = self.text.embed_tokens(ids_BL)
        slots_BL = ids_BL == self.vocab.img
        image_XW = tokens_INE.flatten(0, 1)
        if int(slots_BL.sum()) != len(image_XW):
            raise ValueError(f"interleave: {int(slots_BL.sum())} <img> slots for {len(image_XW)} image tokens")
        if not len(image_XW):
            return embeds_BLW
        dtype = torch.promote_types(embeds_BLW.dtype, image_XW.dtype)
        embeds_BLW = embeds_BLW.to(dtype)
        embeds_BLW[slots_BL] = image_XW.to(dtype)
        return embeds_BLW

    def run_sequences(self, ids_BL: Tensor, tokens_INE: Tensor) -> Tensor:
        """Raw LM hidden states [B, L, W] of interleaved sequences."""
        return self.text(self.interleave(ids_BL, tokens_INE))

    def predicted_latents(self, ids_BL: Tensor, hidden_BLW: Tensor) -> tuple[Tensor, Tensor]:
        """The LM's image predictions at every ``<soi>`` with context (position > 0), unnormalised [X, E], and which
        images [I] have one (images are numbered in reading order; image i is the i-th ``<soi>``)."""
        soi_BL = ids_BL == self.vocab.soi
        has_context_I = soi_BL.nonzero()[:, 1] > 0  # one entry per <soi> = per image, row-major
        context_BL = soi_BL.clone()
        context_BL[:, 0] = False
        return self.text.project(hidden_BLW[context_BL]), has_context_I

    def contrastive_features(self, ids_BL: Tensor, hidden_BLW: Tensor, pooled_IE: Tensor) -> tuple[Tensor, Tensor]:
        """Matched (image, text) features for L_con, both l2-normalised fp32 [X, E]: the pooled latents of the images
        whose ``<soi>`` has context and the LM's predictions at those ``<soi>``."""
        predicted_XE, has_context_I = self.predicted_latents(ids_BL, hidden_BLW)
        if len(has_context_I) != len(pooled_IE):
            raise ValueError(f"contrastive_features: {len(has_context_I)} <soi> tokens for {len(pooled_IE)} images")
        image_XE = F.normalize(pooled_IE[has_context_I].float(), dim=-1)
        return image_XE, F.normalize(predicted_XE.float(), dim=-1)

    def generation_mask(self, ids_BL: Tensor) -> Tensor:
        """[B, L-1]: which next tokens are generation targets (not ``<img>``, ``<eoi>`` or padding)."""
        v, targets_BL = self.vocab, ids_BL[:, 1:]
        return (targets_BL != v.img) & (targets_BL != v.eoi) & (targets_BL != v.pad)

    def generation_logits(self, ids_BL: Tensor, hidden_BLW: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [X, V] at the positions that predict a target, and the targets [X]."""
        mask_BL = self.generation_mask(ids_BL)
        return self.lm_head(hidden_BLW[:, :-1][mask_BL]), ids_BL[:, 1:][mask_BL]

    def encode_text(self, ids_BL: Tensor) -> Tensor:
        """l2-normalised text embeddings [B, E] of text-only rows ``<sot> text <soi>`` (one ``<soi>`` per row, at a
        position > 0): the LM's prediction of the image that would follow, as in the official ``encode_text``."""
        soi_BL = ids_BL == self.vocab.soi
        if not bool((soi_BL.sum(dim=1) == 1).all()) or bool(soi_BL[:, 0].any()):
            raise ValueError("encode_text: every row needs exactly one <soi>, after at least one token")
        hidden_BLW = self.text(self.text.embed_tokens(ids_BL))
        return F.normalize(self.text.project(hidden_BLW[soi_BL]).float(), dim=-1)

    # ------------------------------------------------------------------------------------------ temperature
    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the log logit scale in [0, ln 100] (the official post-step clamp, applied before each use)."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def logit_scale_exp(self) -> Tensor:
        """exp(logit_scale) in fp32, a scalar."""
        return self.logit_scale.float().exp()[0]


__all__ = ["LCLModel", "VisualTower"]
