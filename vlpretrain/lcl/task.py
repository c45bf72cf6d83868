"""Training stage ``lcl``: LCL and the paper's baseline objectives on one network.

Objectives (``model.objective``), all on the same :class:`~vlpretrain.lcl.model.LCLModel`:

- ``lcl``: L = lambda * L_con + L_gen (lambda = ``con_weight``, 0.1). L_gen is the mean next-token cross-entropy over
  the global batch's text targets; L_con the symmetric InfoNCE between the LM's prediction at each ``<soi>`` (with
  context) and that image's pooled latent, over the global batch (gathered across ranks with gradient).
- ``clip``: CLIP-style contrastive learning on image-text pairs (from pair shards, or each document image with its
  sentence): the same causal LM encodes ``<sot> text <soi>``; L = L_con.
- ``gen``: generation only (Flamingo-style): L = L_gen on the interleaved sequences.
- ``emu``: L = L_gen + lambda * L_reg, where L_reg regresses each image's pooled latent from the LM's ``<soi>``
  prediction (mean squared error, no stop-gradient: Emu-style latent regression).

The loop divides the returned SUM by the global number of targets (text targets; images for ``clip``). So that the
image-side term keeps its own normalisation (a mean over the global images), it is returned scaled by
(global text targets / global images): summed over ranks and divided by the text targets, the loss is exactly
L_gen + lambda * (image term). With gradient accumulation each micro-batch contributes its own such loss, weighted
by its share of the text targets.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vlpretrain.configs import ConfigError
from vlpretrain.lcl.config import TASK, LCLConfig  # importing the config module registers the presets
from vlpretrain.lcl.loss import contrastive_loss_sum, gather_counts, generation_loss_sum, regression_loss_sum
from vlpretrain.lcl.model import LCLModel
from vlpretrain.lcl.vocab import build_vocab, load_tokenizer
from vlpretrain.train.flops import transformer_flops_per_token


class LCLTask(LCLModel):
    """The LCL network as a training stage (see the module docstring)."""

    config_cls = LCLConfig

    def __init__(self, cfg: LCLConfig) -> None:
        tokenizer = load_tokenizer(cfg.tokenizer)
        super().__init__(cfg, build_vocab(cfg, tokenizer))
        self.tokenizer = tokenizer
        self._flops_per_target = 0.0

    @property
    def target_unit(self) -> str:
        return "img" if self.cfg.objective == "clip" else "tok"

    def context_count(self, ids_BL: Tensor) -> int:
        """Images whose ``<soi>`` has context (position > 0): the contrastive / regression pairs of a batch."""
        return int((ids_BL[:, 1:] == self.vocab.soi).sum())

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{"loss": sum to divide by the global targets, "gen", "con" or "reg" (this rank's means), "scale"}``."""
        self.clamp_logit_scale_()
        ids_BL, pixels = batch["input_ids"], batch["pixels"]
        pooled_IE, tokens_INE = self.encode_image(pixels)
        if self.cfg.objective == "clip":
            hidden_BLW = self.text(self.text.embed_tokens(ids_BL))
            image_XE, text_XE = self.contrastive_features(ids_BL, hidden_BLW, pooled_IE)
            con_sum, _ = contrastive_loss_sum(image_XE, text_XE, self.logit_scale_exp())
            out = {"loss": con_sum, "con": con_sum.detach() / max(len(image_XE), 1)}
        else:
            tokens_INE = tokens_INE if self.cfg.image_token_grad else tokens_INE.detach()
            out = self._sequence_losses(ids_BL, self.run_sequences(ids_BL, tokens_INE), pooled_IE)
        out["loss"] = out["loss"] + self._anchor()
        out["scale"] = self.logit_scale_exp().detach()
        return out

    def _sequence_losses(self, ids_BL: Tensor, hidden_BLW: Tensor, pooled_IE: Tensor) -> dict[str, Tensor]:
        logits_XV, targets_X = self.generation_logits(ids_BL, hidden_BLW)
        gen_sum = generation_loss_sum(logits_XV, targets_X)
        out = {"loss": gen_sum, "gen": gen_sum.detach() / max(len(targets_X), 1)}
        if self.cfg.objective == "gen":
            return out
        counts_R2 = gather_counts([self.context_count(ids_BL), len(targets_X)], ids_BL.device)
        images, targets = int(counts_R2[:, 0].sum()), int(counts_R2[:, 1].sum())
        if self.cfg.objective == "lcl":
            image_XE, text_XE = self.contrastive_features(ids_BL, hidden_BLW, pooled_IE)
            term_sum, _ = contrastive_loss_sum(image_XE, text_XE, self.logit_scale_exp(), counts_R2[:, 0])
            name = "con"
        else:  # emu
            predicted_XE, has_context_I = self.predicted_latents(ids_BL, hidden_BLW)
            term_sum, name = regression_loss_sum(predicted_XE, pooled_IE[has_context_I]), "reg"
        out["loss"] = gen_sum + self.cfg.con_weight * term_sum * (targets / max(images, 1))
        out[name] = term_sum.detach() / max(self.context_count(ids_BL), 1)
        return out

    def _anchor(self) -> Tensor:
        """0 x one entry of each parameter an objective may leave unused (the LM head for ``clip``; the pooling
        query, contrastive read-out and logit scale for ``gen``): they still get a (zero) gradient, as DDP requires.
        All of them live outside the transformer blocks, so under FSDP2 they stay unsharded during the forward."""
        modules = (self.pool, self.text.ln_final, self.text.text_projection, self.lm_head)
        params = [p for m in modules for p in m.parameters()] + [self.logit_scale]
        return sum(p.reshape(-1)[0] for p in params) * 0.0

    def num_targets(self, batch: dict[str, Any]) -> int:
        ids_BL = batch["input_ids"]
        clip = self.cfg.objective == "clip"
        targets = self.context_count(ids_BL) if clip else int(self.generation_mask(ids_BL).sum())
        vit, text = self.cfg.vit, self.cfg.text
        vit_flops = 6.0 * sum(p.numel() for p in self.visual.parameters()) * (vit.num_patches + 1)
        lm_params = sum(p.numel() for p in self.text.blocks.parameters())
        lm_flops = transformer_flops_per_token(lm_params, text.layers, text.width, ids_BL.shape[1])
        total = len(batch["pixels"]) * vit_flops + ids_BL.numel() * lm_flops
        self._flops_per_target = total / max(targets, 1)
        return targets

    def flops_per_target(self) -> float:
        if self._flops_per_target:
            return self._flops_per_target
        text = self.cfg.text
        lm_params = sum(p.numel() for p in self.text.blocks.parameters())
        return transformer_flops_per_token(lm_params, text.layers, text.width, self.cfg.max_len)

    def shard_units(self) -> list[nn.Module]:
        return [*self.visual.vit.blocks, *self.text.blocks]

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any:
        from vlpretrain.lcl.data import build_lcl_dataset

        if self.tokenizer is None:
            raise ConfigError("model.tokenizer: training needs a text tokenizer ('shapes-world' or a local folder)")
        return build_lcl_dataset(self.cfg, self.vocab, self.tokenizer, data_cfg, split, rank, world_size)


__all__ = ["TASK", "LCLTask"]
