"""A plain functional re-implementation of the OFFICIAL LaVIT tokenizer algorithm, for parity tests.

Written from the description of the official code (``LaVIT/models/modeling_visual_tokenzier.py``,
``modeling_decoder.py``, ``modeling_visual_encoder.py``) in docs/lavit.md, independent of vlpretrain: it uses only
torch and operates on raw state dicts with the OFFICIAL key names. Everything runs in fp32, eagerly, without any of
our fast paths: attention is ``softmax(q k^T * E^-0.5) v`` spelled out, the merger runs over all N rows with the
official multiplicative eps-softmax, kept rows are taken with ``masked_select`` in raster order, and codes are
the argmin of ``|z|^2 + |e|^2 - 2 z.e``.

State dicts: ``eva`` = ``eva_vitg_psz14`` keys, ``enc`` = ``tokenizer_encoder`` keys, ``dec`` =
``tokenizer_decoder`` keys. Shapes: B images, N patches, D width, n kept tokens over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EPS = 1e-6  # the official policy softmax's eps


def linear(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def layer_norm(sd: dict[str, Tensor], name: str, x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def heads_split(x: Tensor, heads: int) -> Tensor:
    """[B, L, D] -> [B, H, L, E]."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)


def heads_merge(x: Tensor) -> Tensor:
    """[B, H, L, E] -> [B, L, D]."""
    b, h, n, e = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * e)


def scores(q: Tensor, k: Tensor) -> Tensor:
    return (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5


def mlp(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return linear(sd, f"{name}.fc2", F.gelu(linear(sd, f"{name}.fc1", x)))


# ---------------------------------------------------------------------------------------------- EVA-CLIP encoder


def eva_features(eva: dict[str, Tensor], pixels: Tensor, heads: int, patch: int) -> Tensor:
    """Pixels [B, 3, S, S] in [0, 1] -> last block's output before the final norm, CLS dropped: [B, N, D]."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = F.conv2d((pixels - mean) / std, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)  # [B, N, D]
    x = torch.cat([eva["cls_token"].expand(len(x), -1, -1), x], dim=1) + eva["pos_embed"]
    depth = len({k.split(".")[1] for k in eva if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        h = layer_norm(eva, f"{p}.norm1", x, 1e-6)
        q_bias = eva[f"{p}.attn.q_bias"]
        bias = torch.cat([q_bias, torch.zeros_like(q_bias), eva[f"{p}.attn.v_bias"]])  # k has no bias
        q, k, v = F.linear(h, eva[f"{p}.attn.qkv.weight"], bias).chunk(3, dim=-1)
        q, k, v = (heads_split(t, heads) for t in (q, k, v))
        x = x + linear(eva, f"{p}.attn.proj", heads_merge(scores(q, k).softmax(dim=-1) @ v))
        x = x + mlp(eva, f"{p}.mlp", layer_norm(eva, f"{p}.norm2", x, 1e-6))
    return x[:, 1:]


# ---------------------------------------------------------------------------------------------- selector


def selector_log_probs(enc: dict[str, Tensor], x: Tensor) -> Tensor:
    """TokenPredictor with an all-ones policy: [B, N, D] -> log-probabilities [B, N, 2] (channel 0 = keep)."""
    policy = torch.ones(*x.shape[:2], 1)
    h = F.gelu(linear(enc, "token_predictor.in_conv.1", layer_norm(enc, "token_predictor.in_conv.0", x, 1e-5)))
    c = h.shape[-1]
    local = h[..., : c // 2]
    global_ = (h[..., c // 2 :] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
    h = torch.cat([local, global_.expand(-1, h.shape[1], -1)], dim=-1)
    h = F.gelu(linear(enc, "token_predictor.out_conv.0", h))
    h = F.gelu(linear(enc, "token_predictor.out_conv.2", h))
    return F.log_softmax(linear(enc, "token_predictor.out_conv.4", h), dim=-1)


# ---------------------------------------------------------------------------------------------- merger


def policy_softmax(attn: Tensor, allowed: Tensor, eps: float = EPS) -> Tensor:
    """The official masked softmax: exp(a - max over ALL keys) * allowed, then (. + eps/N) / (sum + eps).

    A tiny ``eps`` (e.g. 1e-30) gives the exact masked softmax (rows with nothing allowed stay uniform).
    """
    n = attn.shape[-1]
    e = (attn - attn.max(dim=-1, keepdim=True)[0]).to(torch.float32).exp() * allowed.to(torch.float32)
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)


def merge_dense(enc: dict[str, Tensor], x: Tensor, keep: Tensor, heads: int, eps: float = EPS) -> Tensor:
    """TokenMerger over all N rows for the keep decisions [B, N] (float 0/1): [B, N, D] after the final norm.

    ``eps`` is the policy softmax's (the official 1e-6 by default).
    """
    b, n, _ = x.shape
    policy = keep.float().reshape(b, 1, 1, n)
    eye = torch.eye(n).view(1, 1, n, n)
    causal = (torch.arange(n)[None, :] <= torch.arange(n)[:, None]).float().view(1, 1, n, n)
    self_allowed = (policy + (1.0 - policy) * eye) * causal  # kept keys j <= i, and always i itself
    cross_allowed = 1.0 - policy  # only dropped keys
    origin = layer_norm(enc, "causal_encoder.ln_vision", x, 1e-5)
    depth = len({k.split(".")[2] for k in enc if k.startswith("causal_encoder.blocks.")})
    for i in range(depth):
        p = f"causal_encoder.blocks.{i}"
        h = layer_norm(enc, f"{p}.norm0", x, 1e-5)
        q, k, v = (heads_split(t, heads) for t in linear(enc, f"{p}.token_causal_attn.qkv", h).chunk(3, dim=-1))
        attn = policy_softmax(scores(q, k), self_allowed, eps)
        x = x + linear(enc, f"{p}.token_causal_attn.proj", heads_merge(attn @ v))
        h = layer_norm(enc, f"{p}.norm1", x, 1e-5)
        q = heads_split(linear(enc, f"{p}.token_cross_attn.query", h), heads)
        k = heads_split(linear(enc, f"{p}.token_cross_attn.key", origin), heads)
        v = heads_split(linear(enc, f"{p}.token_cross_attn.value", origin), heads)
        attn = policy_softmax(scores(q, k), cross_allowed, eps)
        x = x + linear(enc, f"{p}.token_cross_attn.proj", heads_merge(attn @ v))
        x = x + mlp(enc, f"{p}.mlp", layer_norm(enc, f"{p}.norm2", x, 1e-5))
    return layer_norm(enc, "causal_encoder.norm", x, 1e-5)


def kept_rows(merged: Tensor, keep: Tensor) -> list[Tensor]:
    """The kept rows of each image in raster order (the official ``masked_select``): a list of [K_b, D]."""
    d = merged.shape[-1]
    rows = torch.masked_select(merged, keep.bool()[..., None]).reshape(-1, d)
    return list(torch.split(rows, keep.bool().sum(dim=1).tolist()))


# ---------------------------------------------------------------------------------------------- quantizer


def tokenize(enc: dict[str, Tensor], rows: Tensor) -> Tensor:
    """Merged kept tokens [n, D] -> code ids [n]: encode_task_layer, l2-normalise, argmin of the L2 distance."""
    z = linear(enc, "encode_task_layer.2", torch.tanh(linear(enc, "encode_task_layer.0", rows)))
    z = F.normalize(z, p=2, dim=-1)
    e = enc["quantize.embedding.weight"]
    d = z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", z, e)
    return d.argmin(dim=1)


# ---------------------------------------------------------------------------------------------- feature decoder


def decode(enc: dict[str, Tensor], dec: dict[str, Tensor], ids: list[Tensor], heads: int) -> tuple[Tensor, Tensor]:
    """VQDecoder on the codes of each image: (decode_task_layer output [B, N, D_out], unet_proj output [B, N, U])."""
    codes = enc["quantize.embedding.weight"][torch.cat(ids)]
    x = linear(dec, "in_proj", codes)
    token_num = [len(s) for s in ids]
    longest = max(token_num)
    x_pad = torch.zeros(len(ids), longest, x.shape[-1])
    mask = torch.zeros(len(ids), longest)
    for i, part in enumerate(torch.split(x, token_num)):
        x_pad[i, : len(part)] = part
        mask[i, : len(part)] = 1
    x_pad = x_pad + dec["pos_embed"][:, :longest]
    q = dec["query_embed"].expand(len(ids), -1, -1)
    depth = len({k.split(".")[1] for k in dec if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        h = layer_norm(dec, f"{p}.norm0", q, 1e-5)
        qq, kk, vv = (heads_split(t, heads) for t in linear(dec, f"{p}.self_attn.qkv", h).chunk(3, dim=-1))
        q = q + linear(dec, f"{p}.self_attn.proj", heads_merge(scores(qq, kk).softmax(dim=-1) @ vv))
        h = layer_norm(dec, f"{p}.norm1", q, 1e-5)
        qq = heads_split(linear(dec, f"{p}.cross_attn.query", h), heads)
        kk = heads_split(linear(dec, f"{p}.cross_attn.key", x_pad), heads)
        vv = heads_split(linear(dec, f"{p}.cross_attn.value", x_pad), heads)
        attn = scores(qq, kk) + (1.0 - mask[:, None, None, :]) * -10000.0
        q = q + linear(dec, f"{p}.cross_attn.proj", heads_merge(attn.softmax(dim=-1) @ vv))
        q = q + mlp(dec, f"{p}.mlp", layer_norm(dec, f"{p}.norm2", q, 1e-5))
    q = layer_norm(dec, "norm", q, 1e-5)
    rec = linear(dec, "decode_task_layer.2", torch.tanh(linear(dec, "decode_task_layer.0", q)))
    return rec, linear(dec, "unet_proj", rec)
