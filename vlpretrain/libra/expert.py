"""One routed decoder layer: the HF layer's own modules for text positions, a visual expert for image positions.

The visual expert (:class:`VisionLayer`) holds low-rank q/k/v/o, a low-rank SiLU-gated MLP, two RMSNorms and four
rank-r key/value bridges; its ``forward`` runs the whole routed layer, taking the HF ``LlamaDecoderLayer`` whose
modules serve the text positions as an argument (so it is one module call, the unit FSDP shards).

- :class:`LowRankLinear` is ``W = B @ A`` without bias (official ``weight_A`` [r, in], ``weight_B`` [out, r]); the
  experts take r = out / ``down_ratio`` (4 officially), the bridges r = ``bridge_rank`` (8).
- attention: queries, keys and values come from each position's own modality weights; a text query sees image keys
  (and values) plus their bridge correction, an image query sees text keys plus theirs, own-modality keys unchanged.
  A key's correction is the bridge of the key's modality (``k_bridge_on_language`` for text keys,
  ``k_bridge_on_vision`` for image keys; ``v_`` alike) applied to the key's own normalised hidden state, added
  before RoPE as the official code does. One softmax over all (causal, padding-masked) positions; the output
  projection is the query's modality's. Two attention calls (one per query modality) compute exactly this; a call
  is skipped when its queries are absent. B of every bridge starts at zero: a no-op at init.
- with a KV cache (an HF ``DynamicCache``) a layer stores [keys as text queries see them ; keys as image queries see
  them] concatenated on the head dimension (values alike), so HF's mask builder sees the right past length.
- initialisation lives in :meth:`VisionLayer.init_weights`: A and B ~ N(0, std) for the experts (random, not copied
  from the LM, as the official ``_init_weights``), A ~ N(0, std) and B = 0 for the bridges, norms at one.

Shape letters: B batch, L positions, H hidden, N heads, E head dim, I MLP hidden, R rank, M rows of one modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
    rotate_half,
)

from vlpretrain.libra.routing import Routing

BRIDGES = ("k_bridge_on_language", "k_bridge_on_vision", "v_bridge_on_language", "v_bridge_on_vision")


class LowRankLinear(nn.Module):
    """``x @ A.T @ B.T``: a bias-free linear map of rank ``rank``.

    Args:
        in_features, out_features: the map's sizes.
        rank: R, rows of ``weight_A`` and columns of ``weight_B``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankLinear: rank must be >= 1, got {rank}")
        self.weight_A = nn.Parameter(torch.empty(rank, in_features))  # filled by the owner's init_weights
        self.weight_B = nn.Parameter(torch.empty(out_features, rank))

    def forward(self, x_MI: Tensor) -> Tensor:
        """[..., in] -> [..., out]."""
        return F.linear(F.linear(x_MI, self.weight_A), self.weight_B)

    def extra_repr(self) -> str:
        return f"in={self.weight_A.shape[1]}, out={self.weight_B.shape[0]}, rank={self.weight_A.shape[0]}"


class VisionLayer(nn.Module):
    """The image-side weights of one decoder layer, and the routed layer's forward.

    Args:
        hidden: H, the LM width.
        intermediate: I, the LM's MLP width.
        down_ratio: expert rank = output size / down_ratio.
        bridge_rank: rank of the four bridges (0 = no bridges).
        eps: RMSNorm epsilon (the LM's).
    """

    def __init__(self, hidden: int, intermediate: int, down_ratio: int, bridge_rank: int, eps: float) -> None:
        super().__init__()
        for size in (hidden, intermediate):
            if size % down_ratio:
                raise ValueError(f"VisionLayer: size {size} is not divisible by down_ratio {down_ratio}")
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.q_proj = LowRankLinear(hidden, hidden, hidden // down_ratio)
        self.k_proj = LowRankLinear(hidden, hidden, hidden // down_ratio)
        self.v_proj = LowRankLinear(hidden, hidden, hidden // down_ratio)
        self.o_proj = LowRankLinear(hidden, hidden, hidden // down_ratio)
        self.gate_proj = LowRankLinear(hidden, intermediate, intermediate // down_ratio)
        self.up_proj = LowRankLinear(hidden, intermediate, intermediate // down_ratio)
        self.down_proj = LowRankLinear(intermediate, hidden, hidden // down_ratio)
        self.use_bridge = bridge_rank > 0
        if self.use_bridge:
            for name in BRIDGES:
                self.add_module(name, LowRankLinear(hidden, hidden, bridge_rank))

    def init_weights(self, std: float) -> None:
        """Experts ~ N(0, std) in both factors; bridges A ~ N(0, std), B = 0; norms = 1."""
        for name, module in self.named_children():
            if isinstance(module, LowRankLinear):
                nn.init.normal_(module.weight_A, std=std)
                if name in BRIDGES:
                    nn.init.zeros_(module.weight_B)
                else:
                    nn.init.normal_(module.weight_B, std=std)
            elif isinstance(module, LlamaRMSNorm):
                nn.init.ones_(module.weight)

    @torch.no_grad()
    def init_from_text(self, text: LlamaDecoderLayer) -> None:
        """Start from the text layer (ours, not official): each expert map = the best rank-R approximation (truncated
        SVD) of the text layer's map, split evenly into A = sqrt(S) V^T and B = U sqrt(S); norms copied. At full rank
        (``down_ratio`` 1) image positions start out processed exactly as text positions would be."""
        attn, mlp = text.self_attn, text.mlp
        pairs = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
                 "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}  # fmt: skip
        for name, linear in pairs.items():
            expert: LowRankLinear = getattr(self, name)
            rank = expert.weight_A.shape[0]
            u_OR, s_R, vh_RI = torch.linalg.svd(linear.weight.float(), full_matrices=False)
            kept = min(rank, len(s_R))  # a rank above min(out, in) leaves the extra factors at zero
            root_R = s_R[:kept].sqrt()
            expert.weight_A.zero_()[:kept] = root_R[:, None] * vh_RI[:kept]
            expert.weight_B.zero_()[:, :kept] = u_OR[:, :kept] * root_R
        self.input_layernorm.weight.copy_(text.input_layernorm.weight)
        self.post_attention_layernorm.weight.copy_(text.post_attention_layernorm.weight)

    def mlp(self, x_MH: Tensor) -> Tensor:
        """The SiLU-gated expert MLP: [M, H] -> [M, H]."""
        return self.down_proj(F.silu(self.gate_proj(x_MH)) * self.up_proj(x_MH))

    def forward(self, h_MH: Tensor, routing: Routing, text: LlamaDecoderLayer, cos_sin: tuple[Tensor, Tensor],
                mask: Tensor | None, cache: Cache | None) -> Tensor:  # fmt: skip
        """One routed decoder layer (pre-norm attention and MLP with residuals, in HF's order of operations).

        Args:
            h_MH: the residual stream in ``routing``'s layout (sorted rows [M, H], or the grid [B, L, H]).
            routing: the text/image split of the positions.
            text: the HF layer whose modules serve the text positions.
            cos_sin: the LM's rotary (cos, sin) for these positions.
            mask: the attention mask HF's ``create_causal_mask`` built (None = causal).
            cache: the KV cache to extend, or None.
        """
        r = routing
        residual = h_MH
        x_MH = r.apply(h_MH, text.input_layernorm, self.input_layernorm)
        h_MH = residual + self.attention(x_MH, r, text.self_attn, cos_sin, mask, cache)
        residual = h_MH
        x_MH = r.apply(h_MH, text.post_attention_layernorm, self.post_attention_layernorm)
        return residual + r.apply(x_MH, text.mlp, self.mlp)

    def attention(self, x_MH: Tensor, routing: Routing, attn: LlamaAttention, cos_sin: tuple[Tensor, Tensor],
                  mask: Tensor | None, cache: Cache | None) -> Tensor:  # fmt: skip
        """Routed self-attention with the bridge: normalised rows -> rows (stream layout)."""
        r = routing
        q, k, v = (r.apply(x_MH, text_fn, image_fn) for text_fn, image_fn in
                   ((attn.q_proj, self.q_proj), (attn.k_proj, self.k_proj), (attn.v_proj, self.v_proj)))  # fmt: skip
        views = [q, *self.bridged(x_MH, r, k, v, need_image_view=r.has_image or cache is not None)]
        if r.mixed:  # one gather back to the grid for all five
            views = r.grid(torch.cat(views, dim=-1)).split(q.shape[-1], dim=-1)
        split = (*r.shape, -1, attn.head_dim)
        q_BNLE, k_text, k_image, v_text, v_image = (t.reshape(split).transpose(1, 2) for t in views)
        cos, sin = cos_sin
        shared = k_image is k_text  # no bridge (or no image view needed): one key tensor for both
        q_BNLE, k_text = apply_rotary_pos_emb(q_BNLE, k_text, cos, sin)
        k_image = k_text if shared else rotate(k_image, cos, sin)
        if cache is not None:  # both views in one cache entry: [text-query view ; image-query view]
            keys, values = cache.update(torch.cat([k_text, k_image], -1), torch.cat([v_text, v_image], -1),
                                        attn.layer_idx)  # fmt: skip
            (k_text, k_image), (v_text, v_image) = keys.chunk(2, dim=-1), values.chunk(2, dim=-1)
        out_BLNE = self.attend(q_BNLE, (k_text, v_text), (k_image, v_image), r, attn, mask)
        out_MH = r.rows(out_BLNE.reshape(*r.shape, -1).contiguous())
        return r.apply(out_MH, attn.o_proj, self.o_proj)

    def bridged(self, x_MH: Tensor, routing: Routing, k_MH: Tensor, v_MH: Tensor,
                need_image_view: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """Keys and values as text queries see them and as image queries see them: (k_text, k_image, v_text,
        v_image) in stream layout (see the module docstring). The image view is skipped (= the text view) when no
        image query can read it."""
        if not self.use_bridge or not need_image_view:
            return k_MH, k_MH, v_MH, v_MH
        r = routing
        dk_MH = r.apply(x_MH, self.k_bridge_on_language, self.k_bridge_on_vision)
        dv_MH = r.apply(x_MH, self.v_bridge_on_language, self.v_bridge_on_vision)
        k_plus, v_plus = k_MH + dk_MH, v_MH + dv_MH
        return r.pick(k_plus, k_MH), r.pick(k_MH, k_plus), r.pick(v_plus, v_MH), r.pick(v_MH, v_plus)

    def attend(self, q_BNLE: Tensor, text_kv: tuple[Tensor, Tensor], image_kv: tuple[Tensor, Tensor],
               routing: Routing, attn: LlamaAttention, mask: Tensor | None) -> Tensor:  # fmt: skip
        """One softmax over all keys per query, with the key/value view of the query's modality -> [B, L, N, E].

        Text queries run over the whole chunk; image queries only over the columns [lo, hi) that hold an image
        position (keys up to the last of them, causal aligned to the end), which is where they can be.
        """
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        dropout = attn.attention_dropout if self.training else 0.0

        def run(q: Tensor, kv: tuple[Tensor, Tensor], m: Tensor | None) -> Tensor:
            return kernel(attn, q, kv[0], kv[1], m, dropout=dropout, scaling=attn.scaling)[0]

        if not routing.has_image:
            return run(q_BNLE, text_kv, mask)
        if q_BNLE.device.type == "cpu" and q_BNLE.dtype != torch.float32:
            # CPU flash attention is about twice as fast in fp32 as in bf16 (forward + backward, L ~ 100-200)
            with torch.autocast("cpu", enabled=False):
                out = self.attend(q_BNLE.float(), _float(text_kv), _float(image_kv), routing, attn, mask)
            return out.to(q_BNLE.dtype)
        lo, hi = routing.image_span()
        seen = text_kv[0].shape[2] - (q_BNLE.shape[2] - hi)  # keys up to the last image column (past included)
        q_img = q_BNLE[:, :, lo:hi]
        kv_img = (image_kv[0][:, :, :seen], image_kv[1][:, :, :seen])
        out_img = run(q_img, kv_img, _end_aligned_mask(mask, q_img, seen, lo, hi, attn))
        if not routing.has_text:
            return out_img
        out = run(q_BNLE, text_kv, mask)
        at_image = routing.vision_BL[:, lo:hi, None, None]
        return torch.cat([out[:, :lo], torch.where(at_image, out_img, out[:, lo:hi]), out[:, hi:]], dim=1)


def _float(kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return kv[0].float(), kv[1].float()


def _end_aligned_mask(mask: Tensor | None, q_BNQE: Tensor, seen: int, lo: int, hi: int,
                      attn: LlamaAttention) -> Tensor | None:  # fmt: skip
    """The mask of the query columns [lo, hi) over the first ``seen`` keys: HF's own mask sliced, or (HF gave none:
    plain causal) a causal mask aligned to the end (query i sees keys <= seen - (hi - lo) + i)."""
    if mask is not None:
        return mask[:, :, lo:hi, :seen]
    rows = hi - lo
    if rows == 1 and seen == 1:
        return None
    allowed = torch.ones(rows, seen, dtype=torch.bool, device=q_BNQE.device).tril(diagonal=seen - rows)
    if attn.config._attn_implementation == "sdpa":
        return allowed[None, None]
    return torch.zeros(rows, seen, dtype=q_BNQE.dtype, device=q_BNQE.device).masked_fill(
        ~allowed, torch.finfo(q_BNQE.dtype).min
    )[None, None]


def rotate(x_BNLE: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of one tensor, computed as HF's ``apply_rotary_pos_emb`` computes a key."""
    return (x_BNLE * cos.unsqueeze(1)) + (rotate_half(x_BNLE) * sin.unsqueeze(1))


__all__ = ["BRIDGES", "LowRankLinear", "VisionLayer", "rotate"]
