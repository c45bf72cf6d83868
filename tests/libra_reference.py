"""A slow, literal re-statement of Libra's forward pass (the official code's formulas, dense and unrouted), used to
check :class:`vlpretrain.libra.model.LibraLM` on mixed inputs.

Every module runs on every position and ``torch.where`` picks the modality's result; attention builds the two score
matrices (keys as text queries see them, keys as image queries see them), picks per query row, applies the causal
and padding masks and one softmax, and mixes the two value sets the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import rotate_half

from vlpretrain.libra.model import LibraLM


def _pick(vision_BL: Tensor, image: Tensor, text: Tensor) -> Tensor:
    return torch.where(vision_BL[..., None], image, text)


def _rope(x_BNLE: Tensor, cos_BLE: Tensor, sin_BLE: Tensor) -> Tensor:
    return x_BNLE * cos_BLE[:, None] + rotate_half(x_BNLE) * sin_BLE[:, None]


def reference_hidden(model: LibraLM, ids_CBL: Tensor, features_BLF: Tensor | None,
                     attention_mask_BL: Tensor | None = None) -> Tensor:  # fmt: skip
    """Final hidden states [B, L, H] of ``model`` computed literally (no cache)."""
    lm, side, vocab = model.lm, model.vision, model.vocab
    vision_BL = vocab.is_visual(ids_CBL[0])
    B, L = vision_BL.shape
    text_emb = lm.model.embed_tokens(ids_CBL[0].clamp(max=vocab.text_size - 1))
    codes = (ids_CBL - vocab.text_size).clamp(min=0)
    parts = [table(codes[c]) for c, table in enumerate(side.embed_tokens)]
    feats = features_BLF if features_BLF is not None else text_emb.new_zeros(B, L, side.feature_dim)
    image_emb = side.signal_proj(side.signal_norm(torch.cat([*parts, feats], dim=-1)))
    h = _pick(vision_BL, image_emb, text_emb)
    pos = torch.arange(L)[None].expand(B, L)
    cos, sin = lm.model.rotary_emb(h, position_ids=pos)
    keep = torch.ones(B, L, dtype=torch.bool) if attention_mask_BL is None else attention_mask_BL.bool()
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & keep[:, None, :]  # [B, Lq, Lk]
    for text, image in zip(lm.model.layers, side.layers, strict=True):
        attn = text.self_attn
        x = _pick(vision_BL, image.input_layernorm(h), text.input_layernorm(h))
        q = _pick(vision_BL, image.q_proj(x), attn.q_proj(x))
        k = _pick(vision_BL, image.k_proj(x), attn.k_proj(x))
        v = _pick(vision_BL, image.v_proj(x), attn.v_proj(x))
        dk = _pick(vision_BL, image.k_bridge_on_vision(x), image.k_bridge_on_language(x))
        dv = _pick(vision_BL, image.v_bridge_on_vision(x), image.v_bridge_on_language(x))
        k_for_text, k_for_image = _pick(vision_BL, k + dk, k), _pick(vision_BL, k, k + dk)
        v_for_text, v_for_image = _pick(vision_BL, v + dv, v), _pick(vision_BL, v, v + dv)

        def heads(t: Tensor, attn=attn) -> Tensor:
            return t.view(B, L, -1, attn.head_dim).transpose(1, 2)

        qh = _rope(heads(q), cos, sin)
        s_text = qh @ _rope(heads(k_for_text), cos, sin).transpose(-1, -2) / math.sqrt(attn.head_dim)
        s_image = qh @ _rope(heads(k_for_image), cos, sin).transpose(-1, -2) / math.sqrt(attn.head_dim)
        scores = torch.where(vision_BL[:, None, :, None], s_image, s_text)
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        out_text, out_image = probs @ heads(v_for_text), probs @ heads(v_for_image)
        out = torch.where(vision_BL[:, None, :, None], out_image, out_text).transpose(1, 2).reshape(B, L, -1)
        h = h + _pick(vision_BL, image.o_proj(out), attn.o_proj(out))
        x = _pick(vision_BL, image.post_attention_layernorm(h), text.post_attention_layernorm(h))
        h = h + _pick(vision_BL, image.mlp(x), text.mlp(x))
    return _pick(vision_BL, side.norm(h), lm.model.norm(h))


def randomize_bridges(model: LibraLM, std: float = 0.05) -> None:
    """Give every bridge a non-zero B so that the bridge terms are exercised."""
    with torch.no_grad():
        for layer in model.vision.layers:
            for name in ("k_bridge_on_language", "k_bridge_on_vision", "v_bridge_on_language", "v_bridge_on_vision"):
                getattr(layer, name).weight_B.normal_(std=std)


__all__ = ["randomize_bridges", "reference_hidden"]
