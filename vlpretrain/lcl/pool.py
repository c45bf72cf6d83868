"""Attentive pooling whose value and output projections ALSO project every patch token into the causal LM.

One learned query cross-attends over the N patch tokens (separate LayerNorms for query, keys and values; bias-free
linears plus zero-initialised biases; bias-free output projection). The value path ``proj(v(norm_v(x)) + v_bias)``
applied to each token is what the LM reads for the image, and the pooled latent is
``proj(concat_h(sum_n a_hn * v_hn))``: per head a convex combination of the values, so (``proj`` being linear) the
pooled vector is a sum over heads of convex combinations of the head slices of the LM's image tokens. The two uses
share one set of weights by construction: nothing can untie them. Official keys: ``pool_project.query_token``,
``pool_project.pooler.norm1_{q,k,v}``, ``pool_project.pooler.cross_attn.{q,k,v,proj}.weight``, ``..{q,k,v}_bias``.

Shape letters: B images, N patch tokens, D encoder width, E latent width (the LM's), H heads, F head dim (E / H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlpretrain.core.vit import LayerNorm


class AttentivePoolProjection(nn.Module):
    """[B, N, D] patch tokens -> (pooled latent [B, E], LM input tokens [B, N, E]).

    Args:
        dim: D, the encoder width.
        out_dim: E, the latent width.
        heads: H (must divide E).
        ln_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, out_dim: int, heads: int, ln_eps: float = 1e-5) -> None:
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"AttentivePoolProjection: heads {heads} does not divide out_dim {out_dim}")
        self.heads = heads
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))  # [1, 1, D]
        self.norm_q = LayerNorm(dim, eps=ln_eps)
        self.norm_k = LayerNorm(dim, eps=ln_eps)
        self.norm_v = LayerNorm(dim, eps=ln_eps)
        self.q = nn.Linear(dim, out_dim, bias=False)
        self.k = nn.Linear(dim, out_dim, bias=False)
        self.v = nn.Linear(dim, out_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(out_dim))
        self.k_bias = nn.Parameter(torch.zeros(out_dim))
        self.v_bias = nn.Parameter(torch.zeros(out_dim))
        self.proj = nn.Linear(out_dim, out_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init: a standard-normal query, PyTorch's default Linear init, zero biases, LayerNorm (1, 0)."""
        nn.init.normal_(self.query_token)
        for linear in (self.q, self.k, self.v, self.proj):
            linear.reset_parameters()
        for bias in (self.q_bias, self.k_bias, self.v_bias):
            nn.init.zeros_(bias)
        for norm in (self.norm_q, self.norm_k, self.norm_v):
            norm.reset_parameters()

    def values(self, x_BND: Tensor) -> Tensor:
        """The value projection of every token, heads concatenated: [B, N, D] -> [B, N, E]."""
        return F.linear(self.norm_v(x_BND), self.v.weight, self.v_bias)

    def attention_weights(self, x_BND: Tensor) -> Tensor:
        """The query's softmax weights over the tokens, per head: [B, H, N] (each row sums to 1)."""
        q_1E = F.linear(self.norm_q(self.query_token[0]), self.q.weight, self.q_bias)
        k_BNE = F.linear(self.norm_k(x_BND), self.k.weight, self.k_bias)
        q_1HF = rearrange(q_1E, "1 (h f) -> 1 h f", h=self.heads)
        k_BHNF = rearrange(k_BNE, "b n (h f) -> b h n f", h=self.heads)
        scores_BHN = torch.einsum("xhf,bhnf->bhn", q_1HF, k_BHNF) * q_1HF.shape[-1] ** -0.5
        return scores_BHN.softmax(dim=-1)

    def forward(self, x_BND: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled latent [B, E] and the LM's image tokens [B, N, E] of patch tokens [B, N, D]."""
        v_BNE = self.values(x_BND)
        weights_BHN = self.attention_weights(x_BND).to(v_BNE.dtype)
        v_BHNF = rearrange(v_BNE, "b n (h f) -> b h n f", h=self.heads)
        pooled_BE = rearrange(torch.einsum("bhn,bhnf->bhf", weights_BHN, v_BHNF), "b h f -> b (h f)")
        return self.proj(pooled_BE), self.proj(v_BNE)


__all__ = ["AttentivePoolProjection"]
