"""LaVIT's feature decoder (official file ``tokenizer_decoder.bin``): visual codes -> all N patch features.

Codes (C-d) -> ``in_proj`` Linear(C, D) + ``pos_embed`` BY RANK in the kept sequence (not grid position); N learned
``query_embed``; blocks of (bidirectional self-attention among queries, cross-attention from queries to the code
sequence with padding masked by adding -10000 as the official code does, MLP); ``norm``; ``decode_task_layer`` =
Linear -> Tanh -> Linear -> the reconstruction [B, N, D_out] of the frozen encoder's features. ``unet_proj`` maps the
reconstruction to the diffusion decoder's conditioning width (the detokenizer uses it).

Deliberate difference: the official constructor starts ``pos_embed`` and ``query_embed`` at zero, which makes all
queries identical at initialisation; training from scratch here initialises them at random, N(0, 0.02) (``official``)
or with unit variance and fan-in-scaled Linear weights (``fan_in``, the default; see :meth:`init_weights`).

Shape letters: B images, K codes per image (padded), N patches, C code dim, D width.
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
    policy_attention,
)


class DecoderBlock(nn.Module):
    """Self-attention among queries, cross-attention to the codes, MLP (pre-norm)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attn = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, q_BND: Tensor, codes_BKD: Tensor, bias_B11K: Tensor) -> Tensor:
        q_BND = q_BND + self.self_attn(self.norm0(q_BND))
        q_BND = q_BND + self.cross_attn(self.norm1(q_BND), codes_BKD, bias_B11K)
        return q_BND + self.mlp(self.norm2(q_BND))

    def forward_policy(self, q_BND: Tensor, codes_BSD: Tensor, keep_BS: Tensor) -> Tensor:
        """The block with every code row present and weighted by ``keep_BS`` (float 0/1, may carry gradients)."""
        q_BND = q_BND + self.self_attn(self.norm0(q_BND))
        q, k, v = self.cross_attn.project(self.norm1(q_BND), codes_BSD)
        q_BND = q_BND + self.cross_attn.proj(policy_attention(q, k, v, expand_mask(keep_BS)))
        return q_BND + self.mlp(self.norm2(q_BND))


class FeatureDecoder(nn.Module):
    """Reconstructs N patch features from a variable-length code sequence."""

    def __init__(self, code_dim: int, dim: int, depth: int, heads: int, mlp_hidden: int, num_patches: int,
                 out_dim: int, unet_dim: int) -> None:  # fmt: skip
        super().__init__()
        self.in_proj = nn.Linear(code_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.query_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.decode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out_dim))
        self.unet_proj = nn.Linear(out_dim, unet_dim)
        self.init_weights()

    def init_weights(self, scheme: str = "official") -> None:
        """``official``: trunc-normal(0.02) Linear weights, N(0, 0.02) positions and queries. ``fan_in``: Linear
        weights N(0, 1 / fan_in) and unit-variance positions and queries, so that from the first step the queries'
        attention over the codes has scores of order 1 and can learn which code to read (see TokenizerConfig);
        ``in_proj`` reads unit-NORM codes, so N(0, 1) gives its output the positions' unit variance."""
        if scheme == "official":
            self.apply(init_linear_and_norm)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.query_embed, std=0.02)
            return
        if scheme != "fan_in":
            raise ValueError(f"decoder init: unknown scheme {scheme!r} (official, fan_in)")
        self.apply(init_linear_and_norm)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        nn.init.normal_(self.in_proj.weight, std=1.0)
        nn.init.normal_(self.pos_embed, std=1.0)
        nn.init.normal_(self.query_embed, std=1.0)

    def forward(self, codes_BKC: Tensor, valid_BK: Tensor) -> Tensor:
        """Codes [B, K, C] (padding rows ignored via ``valid`` [B, K]) -> reconstructed features [B, N, D_out]."""
        k = codes_BKC.shape[1]
        if k > self.pos_embed.shape[1]:
            raise ValueError(f"{k} codes per image, but the decoder has {self.pos_embed.shape[1]} positions")
        x = self.in_proj(codes_BKC) + self.pos_embed[:, :k]
        bias = ((1.0 - valid_BK.to(x.dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, K)
        q = self.query_embed.expand(codes_BKC.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, x, bias)
        return self.decode_task_layer(self.norm(q))

    def forward_policy(self, codes_BNC: Tensor, keep_BN: Tensor) -> Tensor:
        """Training form: codes for ALL N rows [B, N, C], the keep mask [B, N] as attention policy -> [B, N, D_out].

        Row i gets the positional embedding of its rank among the kept rows before it (what it has, or would have,
        in the kept sequence) and enters the cross-attention with weight keep_i, so the straight-through gradient
        of the keep mask measures how much each row's code helps the reconstruction. With a hard mask the output
        equals :meth:`forward` on the kept rows (up to the policy softmax's 1e-6 leak).
        """
        if codes_BNC.shape[1] != self.query_embed.shape[1]:
            raise ValueError(f"forward_policy: expected {self.query_embed.shape[1]} rows, got {codes_BNC.shape[1]}")
        hard = keep_BN.detach().round()
        rank = (hard.cumsum(dim=1) - hard).long()  # (B, N): kept rows before each row
        x = self.in_proj(codes_BNC) + self.pos_embed[0][rank]
        q = self.query_embed.expand(codes_BNC.shape[0], -1, -1)
        for block in self.blocks:
            q = block.forward_policy(q, x, keep_BN)
        return self.decode_task_layer(self.norm(q))
