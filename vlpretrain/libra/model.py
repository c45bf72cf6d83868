"""Libra's routed LLaMA: every decoder layer sends image positions through a visual expert and text positions
through the original HF weights; one softmax over both modalities with a cross-modal bridge.

Architecture choices (docs/libra.md; official ``LibraForCausalLM``):

- ``lm`` is an unmodified HF ``LlamaForCausalLM``; the text path calls its own modules (``embed_tokens``, each
  layer's ``input_layernorm``, ``q/k/v/o_proj``, rotary embedding, the attention kernel HF selects, ``mlp``,
  ``post_attention_layernorm``, ``norm``, ``lm_head``) in HF's order, so an input without images gives HF's
  logits bit for bit (tested with ``torch.equal``). Everything image-specific is under ``vision``.
- routing is by token type (:func:`~vlpretrain.libra.routing.route`): ids >= T are image positions, including
  ``<boi>``/``<eoi>``; no learned router.
- image input embedding: ``RMSNorm([E_0[c_0]; E_1[c_1]; feature]) -> Linear(H + F -> H)`` (E_c has H / C columns;
  the feature is the frozen ViT's concatenated multi-layer output, zeros at ``<boi>``/``<eoi>``).
- each layer is :class:`~vlpretrain.libra.expert.VisionLayer`'s forward: routed norms, attention with the
  cross-modal bridge (one softmax over both modalities) and MLP; the KV cache is an HF ``DynamicCache``.
- position ids are ``arange(L)`` (+ past) as officially, even with left padding (RoPE only sees differences).
- separate final norm (``vision.norm``) and per-codebook heads (``vision.heads``, H -> K + 2) for image positions.

Shape letters: C codebook streams, B batch, L positions (S with the past), H hidden, N heads, E head dim, F feature
size, M rows of one modality, V text vocabulary, K codes per codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from vlpretrain.libra.expert import VisionLayer
from vlpretrain.libra.routing import Routing
from vlpretrain.libra.vocab import VisualVocab

EXPERT_INITS = ("random", "lm")


class VisionSide(nn.Module):
    """The image-specific modules: per-layer experts, input embedding, final norm and heads."""

    def __init__(self, lm: LlamaForCausalLM, vocab: VisualVocab, feature_dim: int, down_ratio: int,
                 bridge_rank: int) -> None:  # fmt: skip
        super().__init__()
        c = lm.config
        hidden, eps = c.hidden_size, c.rms_norm_eps
        if hidden % vocab.num_codebooks:
            raise ValueError(f"hidden size {hidden} is not divisible by {vocab.num_codebooks} codebooks")
        self.layers = nn.ModuleList(
            VisionLayer(hidden, c.intermediate_size, down_ratio, bridge_rank, eps) for _ in range(c.num_hidden_layers)
        )
        self.embed_tokens = nn.ModuleList(
            nn.Embedding(vocab.head_size, hidden // vocab.num_codebooks) for _ in range(vocab.num_codebooks)
        )
        self.signal_norm = LlamaRMSNorm(hidden + feature_dim, eps=eps)
        self.signal_proj = nn.Linear(hidden + feature_dim, hidden, bias=False)
        self.norm = LlamaRMSNorm(hidden, eps=eps)
        self.heads = nn.ModuleList(nn.Linear(hidden, vocab.head_size, bias=False) for _ in range(vocab.num_codebooks))
        self.feature_dim = feature_dim

    def init_weights(self, std: float) -> None:
        """All image-side initialisation: N(0, std) matrices and embeddings, unit norms, zero bridge B."""
        for layer in self.layers:
            layer.init_weights(std)
        for module in (*self.embed_tokens, self.signal_proj, *self.heads):
            nn.init.normal_(module.weight, std=std)
        nn.init.ones_(self.signal_norm.weight)
        nn.init.ones_(self.norm.weight)


@dataclass
class LibraOutput:
    """``hidden_BLH`` after the final norms, ``vision_BL`` the routing mask, ``cache`` the updated KV cache."""

    hidden_BLH: Tensor
    vision_BL: Tensor
    cache: Cache | None


class LibraLM(nn.Module):
    """An HF LLaMA (``lm``) with Libra's image side (``vision``).

    Args:
        lm: the language model; its vocabulary must be the text vocabulary T of ``vocab``, without GQA.
        vocab: the id layout (T, K, C).
        feature_dim: F, size of the frozen encoder's feature at an image position.
        down_ratio: expert rank = output size / down_ratio (official 4).
        bridge_rank: rank of the bridges (official 8; 0 = no bridge).
        expert_init: "random" (official: both factors N(0, initializer_range)) or "lm" (each expert starts as the
            truncated SVD of its text layer's weights, norms copied; ours).
    """

    def __init__(self, lm: LlamaForCausalLM, vocab: VisualVocab, feature_dim: int, down_ratio: int = 4,
                 bridge_rank: int = 8, expert_init: str = "random") -> None:  # fmt: skip
        super().__init__()
        check_llama(lm, vocab)
        if expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init: '{expert_init}' is not one of {EXPERT_INITS}")
        self.lm = lm
        self.vocab = vocab
        self.vision = VisionSide(lm, vocab, feature_dim, down_ratio, bridge_rank)
        self.expert_init = expert_init
        self.init_weights()

    def init_weights(self) -> None:
        """Only the image side is initialised here; the LM keeps its weights."""
        self.vision.init_weights(self.lm.config.initializer_range)
        if self.expert_init == "lm":
            for text_layer, image_layer in zip(self.lm.model.layers, self.vision.layers, strict=True):
                image_layer.init_from_text(text_layer)

    # ------------------------------------------------------------------------------------------------ embedding

    def embed(self, ids_CBL: Tensor, vision_BL: Tensor, features_BLF: Tensor | None) -> Tensor:
        """Input embeddings [B, L, H]: word embeddings at text positions, the hybrid embedding at image positions."""
        word = self.lm.model.embed_tokens
        if not bool(vision_BL.any()):
            return word(ids_CBL[0])
        side = self.vision
        codes_CM = self.vocab.codes_of(ids_CBL[:, vision_BL])
        parts = [table(codes_CM[c]) for c, table in enumerate(side.embed_tokens)]
        if features_BLF is None:  # e.g. generated image positions: no continuous signal (official: zeros)
            parts.append(parts[0].new_zeros(len(codes_CM[0]), side.feature_dim))
        else:
            parts.append(features_BLF[vision_BL].to(parts[0].dtype))
        image_MH = side.signal_proj(side.signal_norm(torch.cat(parts, dim=-1)))
        text_MH = word(ids_CBL[0][~vision_BL])
        out = torch.empty(*vision_BL.shape, text_MH.shape[-1], dtype=text_MH.dtype, device=text_MH.device)
        out[~vision_BL] = text_MH
        out[vision_BL] = image_MH.to(text_MH.dtype)
        return out

    # --------------------------------------------------------------------------------------------------- forward

    def forward(self, ids_CBL: Tensor, features_BLF: Tensor | None = None, attention_mask_BS: Tensor | None = None,
                cache: Cache | None = None) -> LibraOutput:  # fmt: skip
        """Hidden states after the final norms.

        Args:
            ids_CBL: [C, B, L] ids (identical streams at text positions).
            features_BLF: [B, L, F] continuous features at image positions (anything elsewhere), or None.
            attention_mask_BS: [B, S] 1 = real token, over past + current positions (None = all real).
            cache: an HF ``DynamicCache`` to read and extend (None = no cache).
        """
        self._check_ids(ids_CBL)
        vision_BL = self.vocab.is_visual(ids_CBL[0])
        routing = Routing(vision_BL)
        h_BLH = self.embed(ids_CBL, vision_BL, features_BLF)
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(ids_CBL.shape[-1], device=h_BLH.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=self.lm.config, inputs_embeds=h_BLH, attention_mask=attention_mask_BS,
                                  past_key_values=cache, position_ids=position_ids)  # fmt: skip
        cos_sin = self.lm.model.rotary_emb(h_BLH, position_ids=position_ids)
        h_MH = routing.rows(h_BLH)
        for text_layer, image_layer in zip(self.lm.model.layers, self.vision.layers, strict=True):
            h_MH = image_layer(h_MH, routing, text_layer, cos_sin, mask, cache)
        h_BLH = routing.grid(routing.apply(h_MH, self.lm.model.norm, self.vision.norm))
        return LibraOutput(h_BLH, vision_BL, cache)

    # ---------------------------------------------------------------------------------------------------- heads

    def text_logits(self, h_MH: Tensor) -> Tensor:
        """``lm_head`` logits [..., V] of text positions."""
        return self.lm.lm_head(h_MH)

    def image_logits(self, h_MH: Tensor) -> Tensor:
        """Per-stream head logits [C, ..., K + 2] of image positions."""
        return torch.stack([head(h_MH) for head in self.vision.heads])

    def _check_ids(self, ids_CBL: Tensor) -> None:
        v = self.vocab
        if ids_CBL.ndim != 3 or ids_CBL.shape[0] != v.num_codebooks:
            raise ValueError(f"ids: expected [{v.num_codebooks}, B, L], got {tuple(ids_CBL.shape)}")
        if ids_CBL.numel() and (ids_CBL.min() < 0 or ids_CBL.max() > v.eoi):
            raise ValueError(f"ids: values must be in [0, {v.eoi}]")
        text = ~v.is_visual(ids_CBL[0])
        if not bool((ids_CBL[1:] == ids_CBL[:1])[:, text].all()):
            raise ValueError("ids: the streams differ at a text position")
        if not bool((v.is_visual(ids_CBL[1:]) == ~text).all()):
            raise ValueError("ids: the streams disagree on which positions are image positions")


def check_llama(lm: LlamaForCausalLM, vocab: VisualVocab) -> None:
    """ValueError when ``lm`` is not a LLaMA Libra can extend (vocabulary, GQA, biases, activation)."""
    c = lm.config
    problems = []
    if c.vocab_size != vocab.text_size:
        problems.append(f"vocab_size {c.vocab_size} != text vocabulary {vocab.text_size}")
    if (c.num_key_value_heads or c.num_attention_heads) != c.num_attention_heads:
        problems.append("grouped-query attention (Libra's experts assume num_key_value_heads == num_attention_heads)")
    if c.attention_bias or getattr(c, "mlp_bias", False) or c.hidden_act != "silu":
        problems.append("biases or a non-SiLU activation")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        problems.append(f"head_dim {c.head_dim} != hidden_size / num_attention_heads")
    if problems:
        raise ValueError("LLaMA not supported by Libra: " + "; ".join(problems))


__all__ = ["EXPERT_INITS", "LibraLM", "LibraOutput", "VisionSide", "check_llama"]
