"""LaVIT's token merger (official key prefix ``causal_encoder.``): kept patches absorb the dropped ones.

Each block: ``x += CausalSelfAttn(norm0(x))`` among kept tokens in raster order, ``x += CrossAttn(norm1(x),
ln_vision(X))`` to the DROPPED patches only, ``x += MLP(norm2(x))``; a final ``norm``. The residual stream starts
from the raw features X; only the cross-attention keys/values use ``ln_vision(X)``.

Two exact ways to run it:

- :meth:`TokenMerger.forward_dense`: the official algorithm over all N rows with the multiplicative policy softmax
  (``policy_softmax``). The keep mask may carry a straight-through gradient, which reaches every key: training uses
  this form.
- :meth:`TokenMerger.forward_kept`: only the kept rows, batched over images of different lengths with padding masks
  and ``scaled_dot_product_attention``. Dropped rows never influence kept rows, so this equals the dense output on
  kept rows, up to the official eps-softmax's leak of ~1e-6 weight onto masked keys (see docs/lavit.md). About 3x
  less work at a keep ratio of 1/3: tokenising uses this form.

Shape letters: B images, N patches, K kept tokens (padded to the batch maximum), D width, H heads, E head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlpretrain.core.attention import (
    CrossAttention,
    Mlp,
    SelfAttention,
    expand_mask,
    init_linear_and_norm,
    merge_heads,
    policy_attention,
)


class MergerBlock(nn.Module):
    """Causal self-attention among kept tokens, cross-attention to dropped patches, MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-5)
        self.token_causal_attn = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.token_cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward_dense(self, x_BND: Tensor, origin_BND: Tensor, keep_BN: Tensor) -> Tensor:
        """The official block over all rows; ``keep_BN`` is float 0/1 (straight-through gradients allowed)."""
        n = x_BND.shape[1]
        eye = torch.eye(n, device=x_BND.device, dtype=keep_BN.dtype)
        causal = torch.ones(n, n, device=x_BND.device, dtype=torch.bool).tril()
        self_allowed = (expand_mask(keep_BN) + (1 - expand_mask(keep_BN)) * eye) * causal  # (B, 1, N, N)
        x_BND = x_BND + self._dense_attn(self.token_causal_attn, *self.token_causal_attn.project(self.norm0(x_BND)),
                                         self_allowed)  # fmt: skip
        cross = self.token_cross_attn.project(self.norm1(x_BND), origin_BND)
        x_BND = x_BND + self._dense_attn(self.token_cross_attn, *cross, expand_mask(1 - keep_BN))
        return x_BND + self.mlp(self.norm2(x_BND))

    @staticmethod
    def _dense_attn(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        return attn.proj(policy_attention(q, k, v, allowed))

    def forward_kept(
        self, x_BKD: Tensor, origin_BND: Tensor, self_mask: Tensor, cross_mask: Tensor, none_dropped_B: Tensor
    ) -> Tensor:
        """The block over kept rows only. Masks are bool (True = may attend): self [B, 1, K, K], cross [B, 1, 1, N].

        Images with nothing dropped get the official uniform average over all N values in the cross-attention.
        """
        x_BKD = x_BKD + self.token_causal_attn(self.norm0(x_BKD), self_mask)
        q, k, v = self.token_cross_attn.project(self.norm1(x_BKD), origin_BND)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=cross_mask)  # (B, H, K, E)
        uniform = v.mean(dim=2, keepdim=True).expand_as(out)
        out = torch.where(none_dropped_B[:, None, None, None], uniform, out)
        x_BKD = x_BKD + self.token_cross_attn.proj(merge_heads(out))
        return x_BKD + self.mlp(self.norm2(x_BKD))


def kept_index(keep_BN: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of kept patches in raster order, padded: (index [B, K] long, valid [B, K] bool), K >= 1."""
    keep = keep_BN.bool()
    lengths = keep.sum(dim=1)
    k = max(int(lengths.max()), 1) if keep.numel() else 1
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]  # kept first, raster order kept
    valid = torch.arange(k, device=keep.device)[None, :] < lengths[:, None]
    return order, valid


def gather_rows(x_BND: Tensor, index_BK: Tensor) -> Tensor:
    """Rows ``index`` of every image: [B, K, D] (differentiable in x)."""
    return torch.gather(x_BND, 1, index_BK[..., None].expand(-1, -1, x_BND.shape[-1]))


class TokenMerger(nn.Module):
    """The stack of merger blocks with ``ln_vision`` (for the cross-attention source) and a final ``norm``."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MergerBlock(dim, heads, mlp_hidden) for _ in range(depth))
        self.ln_vision = nn.LayerNorm(dim, eps=1e-5)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(init_linear_and_norm)

    def forward_dense(self, x_BND: Tensor, keep_BN: Tensor) -> Tensor:
        """All N rows, official algorithm: [B, N, D]."""
        origin = self.ln_vision(x_BND)
        for block in self.blocks:
            x_BND = block.forward_dense(x_BND, origin, keep_BN)
        return self.norm(x_BND)

    def forward_kept(self, x_BND: Tensor, keep_BN: Tensor) -> tuple[Tensor, Tensor]:
        """Only kept rows: (merged tokens [B, K, D] in raster order, valid [B, K]); padding rows are junk."""
        index, valid = kept_index(keep_BN)
        origin = self.ln_vision(x_BND)
        k = index.shape[1]
        causal = torch.ones(k, k, device=x_BND.device, dtype=torch.bool).tril()
        self_mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, K, K)
        dropped = ~keep_BN.bool()
        cross_mask = expand_mask(dropped)  # (B, 1, 1, N)
        none_dropped = ~dropped.any(dim=1)
        x = gather_rows(x_BND, index)
        for block in self.blocks:
            x = block.forward_kept(x, origin, self_mask, cross_mask, none_dropped)
        return self.norm(x), valid

    def forward(self, x_BND: Tensor, keep_BN: Tensor, dense: bool) -> tuple[Tensor, Tensor]:
        """Merged kept tokens [B, K, D] and valid [B, K], computed densely (training) or on kept rows only."""
        if not dense:
            return self.forward_kept(x_BND, keep_BN)
        index, valid = kept_index(keep_BN)
        return gather_rows(self.forward_dense(x_BND, keep_BN), index), valid
