"""Attention building blocks on ``F.scaled_dot_product_attention``, with the official LaVIT parameter names.

Shape letters: B batch, L query length, S key length, D width, H heads, E head dim (D = H * E).

``SelfAttention`` keeps one fused ``qkv`` projection (keys ``qkv``, ``proj``); ``CrossAttention`` has separate
``query``/``key``/``value`` projections (keys ``query``, ``key``, ``value``, ``proj``). Both expose ``project`` so a
caller can run its own attention kernel (e.g. LaVIT's dense policy softmax) on the same weights.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def split_heads(x_BLD: Tensor, heads: int) -> Tensor:
    """[B, L, D] -> [B, H, L, E]."""
    return rearrange(x_BLD, "b l (h e) -> b h l e", h=heads)


def merge_heads(x_BHLE: Tensor) -> Tensor:
    """[B, H, L, E] -> [B, L, D]."""
    return rearrange(x_BHLE, "b h l e -> b l (h e)")


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def project(self, x_BLD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v, each [B, H, L, E]."""
        q, k, v = self.qkv(x_BLD).chunk(3, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x_BLD: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: bool, broadcastable to [B, H, L, L], True = may attend. Returns [B, L, D]."""
        q, k, v = self.project(x_BLD)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class CrossAttention(nn.Module):
    """Multi-head attention from queries ``x`` to a context sequence."""

    def __init__(self, dim: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def project(self, x_BLD: Tensor, ctx_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, L, E], k and v [B, H, S, E]."""
        h = self.heads
        return split_heads(self.query(x_BLD), h), split_heads(self.key(ctx_BSD), h), split_heads(self.value(ctx_BSD), h)

    def forward(self, x_BLD: Tensor, ctx_BSD: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: bool, broadcastable to [B, H, L, S], True = may attend. Returns [B, L, D]."""
        q, k, v = self.project(x_BLD, ctx_BSD)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def init_linear_and_norm(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal Linear weights with zero bias, LayerNorm weight 1 and bias 0 (the official init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def policy_softmax(scores: Tensor, allowed: Tensor, eps: float = 1e-6) -> Tensor:
    """LaVIT's official masked softmax, in fp32: exp(s - max over ALL keys) * allowed, then (. + eps/S) / (sum + eps).

    ``allowed`` is a float mask broadcastable to ``scores`` [B, H, L, S]; it may carry straight-through gradients.
    A row with nothing allowed becomes uniform (1/S), not NaN.
    """
    S = scores.shape[-1]
    e = (scores - scores.amax(dim=-1, keepdim=True)).float().exp() * allowed.float()
    return (e + eps / S) / (e.sum(dim=-1, keepdim=True) + eps)


def policy_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Attention of heads q [B, H, L, E] over k, v [B, H, S, E] with :func:`policy_softmax` weights -> [B, L, H*E]."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, L, S)
    return merge_heads(policy_softmax(scores, allowed).to(v.dtype) @ v)


def expand_mask(mask: Tensor) -> Tensor:
    """[B, S] -> [B, 1, 1, S] for broadcasting over heads and queries."""
    return mask[:, None, None, :]


__all__ = [
    "CrossAttention",
    "Mlp",
    "SelfAttention",
    "expand_mask",
    "init_linear_and_norm",
    "merge_heads",
    "policy_attention",
    "policy_softmax",
    "split_heads",
]
