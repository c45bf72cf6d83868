"""The causal LM of LCL: open_clip's text transformer, trained from scratch, reading interleaved embeddings.

Architecture (as the official ``TextTransformer`` with a causal mask): token embedding + learned absolute positions,
pre-norm blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` (fused ``qkv`` with bias, exact GELU), a final
``ln_final`` and a bias-free ``text_projection`` used only for the contrastive embedding. The blocks return RAW
hidden states: the generation head (:class:`LMHead`) has its own LayerNorm. Attention is plain causal (no padding
mask: rows are right-padded, so no real token sees a pad). LayerNorms compute in fp32 under autocast.

Shape letters: B rows, L sequence length, W width, E projection width (= W in LCL), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlpretrain.core.attention import Mlp, SelfAttention, merge_heads
from vlpretrain.core.vit import LayerNorm
from vlpretrain.lcl.config import CausalLMSpec


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, spec: CausalLMSpec) -> None:
        super().__init__()
        self.norm1 = LayerNorm(spec.width, eps=spec.ln_eps)
        self.attn = SelfAttention(spec.width, spec.heads)
        self.norm2 = LayerNorm(spec.width, eps=spec.ln_eps)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio))

    def forward(self, x_BLW: Tensor, bias_HLL: Tensor | None = None) -> Tensor:
        """[B, L, W] -> [B, L, W]; ``bias_HLL``: additive attention scores with the causal mask in them (None =
        plain causal)."""
        q, k, v = self.attn.project(self.norm1(x_BLW))  # each [B, H, L, W/H]
        if bias_HLL is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_HLL.to(q.dtype))
        x_BLW = x_BLW + self.attn.proj(merge_heads(attended))
        return x_BLW + self.mlp(self.norm2(x_BLW))


def alibi_bias(heads: int, length: int) -> Tensor:
    """ALiBi scores [H, L, L]: -slope_h * (i - j) for keys j <= i, -inf above the diagonal (the causal mask);
    slope_h = 2^(-8 (h + 1) / H)."""
    slopes_H = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    pos_L = torch.arange(length)
    distance_LL = (pos_L[:, None] - pos_L[None, :]).float()
    bias_HLL = -slopes_H[:, None, None] * distance_LL
    return bias_HLL.masked_fill(distance_LL < 0, float("-inf"))


class CausalTransformer(nn.Module):
    """Token/position embeddings, causal blocks, and the contrastive read-out (``ln_final`` -> projection).

    Args:
        spec: sizes.
        vocab_size: V, rows of the token embedding.
        out_dim: E, the contrastive embedding width.
    """

    def __init__(self, spec: CausalLMSpec, vocab_size: int, out_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.token_embedding = nn.Embedding(vocab_size, spec.width)
        self.pos_embed = nn.Parameter(torch.zeros(spec.context_length, spec.width))  # [ctx, W]
        self.blocks = nn.ModuleList(CausalBlock(spec) for _ in range(spec.layers))
        self.ln_final = LayerNorm(spec.width, eps=spec.ln_eps)
        self.text_projection = nn.Linear(spec.width, out_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """open_clip's init: embeddings N(0, 0.02), positions N(0, 0.01), attention in-projections N(0, W^-1/2),
        residual outputs N(0, W^-1/2 (2 layers)^-1/2), MLP input N(0, (2W)^-1/2), projection N(0, W^-1/2); zero
        biases."""
        width, layers = self.spec.width, self.spec.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for block in self.blocks:
            for linear, std in ((block.attn.qkv, width**-0.5), (block.attn.proj, proj_std),
                                (block.mlp.fc1, (2 * width) ** -0.5), (block.mlp.fc2, proj_std)):  # fmt: skip
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            for norm in (block.norm1, block.norm2):
                norm.reset_parameters()
        self.ln_final.reset_parameters()
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def embed_tokens(self, ids_BL: Tensor) -> Tensor:
        """Token embeddings [B, L, W] (positions are added in :meth:`forward`)."""
        return self.token_embedding(ids_BL)

    def forward(self, embeds_BLW: Tensor) -> Tensor:
        """Raw hidden states [B, L, W] (before ``ln_final``) of input embeddings [B, L, W]."""
        length = embeds_BLW.shape[1]
        if length > self.spec.context_length:
            raise ValueError(f"CausalTransformer: {length} tokens exceed context_length {self.spec.context_length}")
        x_BLW = embeds_BLW + self.pos_embed[:length].to(embeds_BLW.dtype)
        bias_HLL = alibi_bias(self.spec.heads, length).to(x_BLW.device) if self.spec.alibi else None
        for block in self.blocks:
            x_BLW = block(x_BLW, bias_HLL)
        return x_BLW

    def project(self, hidden_XW: Tensor) -> Tensor:
        """The contrastive read-out ``text_projection(ln_final(h))`` of hidden states: [..., W] -> [..., E]."""
        return self.text_projection(self.ln_final(hidden_XW))


class LMHead(nn.Module):
    """Next-token logits from raw hidden states: LayerNorm -> bias-free Linear(W, V) (official ``lm_head.0/1``)."""

    def __init__(self, width: int, vocab_size: int, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = LayerNorm(width, eps=ln_eps)
        self.out = nn.Linear(width, vocab_size, bias=False)

    def forward(self, hidden_XW: Tensor) -> Tensor:
        """[..., W] -> logits [..., V]."""
        return self.out(self.norm(hidden_XW))


__all__ = ["CausalBlock", "CausalTransformer", "LMHead", "alibi_bias"]
