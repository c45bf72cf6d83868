"""Converting official LCL checkpoints (open_clip format): key names, round trip, parity with the official forward.

The official state dict below is written out key by key as ``open_clip.lcl_model.LCL`` names it (visual tower =
open_clip ``VisionTransformer`` with ``proj`` removed, text tower = ``TextTransformer``, ``pool_project`` =
``AttentivePoolProjection``, ``lm_head`` = LayerNorm + Linear), for one block per tower and tiny sizes. The
reference forward re-implements the official computation with ``F.multi_head_attention_forward`` on those tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlpretrain.errors import UserError
from vlpretrain.lcl.config import LCLConfig
from vlpretrain.lcl.convert import conversion_summary, convert_official, official_to_ours, ours_to_official
from vlpretrain.train.pretrained import load_task
from vlpretrain.train.task import task_config

IMAGE, PATCH, VW, VHEADS, TW, THEADS, CTX, VOCAB, POOL_HEADS = 32, 16, 24, 2, 16, 2, 16, 15, 2
SPECIAL = {"pad": 0, "sot": 10, "eot": 11, "img": 12, "soi": 13, "eoi": 14}
T = (IMAGE // PATCH) ** 2 + 1


def converter_cfg() -> LCLConfig:
    return task_config("lcl", "tiny", {
        "vit": {"image_size": IMAGE, "patch_size": PATCH, "width": VW, "depth": 1, "heads": VHEADS},
        "text": {"width": TW, "layers": 1, "heads": THEADS, "context_length": CTX}, "pool_heads": POOL_HEADS,
        "max_len": CTX, "tokenizer": "", "special_ids": SPECIAL, "vocab_size": VOCAB})  # fmt: skip


def block(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}ln_1.weight": (width,), f"{prefix}ln_1.bias": (width,),
            f"{prefix}attn.in_proj_weight": (3 * width, width), f"{prefix}attn.in_proj_bias": (3 * width,),
            f"{prefix}attn.out_proj.weight": (width, width), f"{prefix}attn.out_proj.bias": (width,),
            f"{prefix}ln_2.weight": (width,), f"{prefix}ln_2.bias": (width,),
            f"{prefix}mlp.c_fc.weight": (4 * width, width), f"{prefix}mlp.c_fc.bias": (4 * width,),
            f"{prefix}mlp.c_proj.weight": (width, 4 * width), f"{prefix}mlp.c_proj.bias": (width,)}  # fmt: skip


OFFICIAL_SHAPES: dict[str, tuple[int, ...]] = {
    "logit_scale": (),
    "visual.class_embedding": (VW,),
    "visual.positional_embedding": (T, VW),
    "visual.conv1.weight": (VW, 3, PATCH, PATCH),
    "visual.ln_pre.weight": (VW,),
    "visual.ln_pre.bias": (VW,),
    **block("visual.transformer.resblocks.0.", VW),
    "visual.ln_post.weight": (VW,),
    "visual.ln_post.bias": (VW,),
    "text.positional_embedding": (CTX, TW),
    "text.text_projection": (TW, TW),
    "text.token_embedding.weight": (VOCAB, TW),
    **block("text.transformer.resblocks.0.", TW),
    "text.ln_final.weight": (TW,),
    "text.ln_final.bias": (TW,),
    "pool_project.query_token": (1, 1, VW),
    **{f"pool_project.pooler.norm1_{x}.{p}": (VW,) for x in "qkv" for p in ("weight", "bias")},
    **{f"pool_project.pooler.cross_attn.{x}_bias": (TW,) for x in "qkv"},
    **{f"pool_project.pooler.cross_attn.{x}.weight": (TW, VW) for x in "qkv"},
    "pool_project.pooler.cross_attn.proj.weight": (TW, TW),
    "lm_head.0.weight": (TW,),
    "lm_head.0.bias": (TW,),
    "lm_head.1.weight": (VOCAB, TW),
}


def official_state(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in OFFICIAL_SHAPES.items():
        value = torch.randn(shape, generator=g)
        if key.endswith("weight") and len(shape) == 1:  # LayerNorm weights around 1
            value = 1 + 0.1 * value
        elif len(shape) == 2 and "embedding" not in key:
            value = value / shape[-1] ** 0.5
        state[key] = value
    state["logit_scale"] = torch.tensor(2.5)
    return state


def write_checkpoint(path: Path, state: dict[str, Tensor]) -> Path:
    torch.save({"epoch": 3, "name": "LCL_test", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


# ------------------------------------------------------------------------ the official computation, re-done


def _ln(x: Tensor, s: dict[str, Tensor], p: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], s[f"{p}weight"], s[f"{p}bias"], 1e-5)


def _resblock(x: Tensor, s: dict[str, Tensor], p: str, heads: int, causal: bool) -> Tensor:
    h = _ln(x, s, f"{p}ln_1.").transpose(0, 1)  # (L, B, W), as nn.MultiheadAttention
    mask = torch.full((len(h), len(h)), float("-inf")).triu(1) if causal else None
    attn, _ = F.multi_head_attention_forward(
        h, h, h, x.shape[-1], heads, s[f"{p}attn.in_proj_weight"], s[f"{p}attn.in_proj_bias"], None, None, False, 0.0,
        s[f"{p}attn.out_proj.weight"], s[f"{p}attn.out_proj.bias"], need_weights=False, attn_mask=mask)  # fmt: skip
    x = x + attn.transpose(0, 1)
    h = F.gelu(F.linear(_ln(x, s, f"{p}ln_2."), s[f"{p}mlp.c_fc.weight"], s[f"{p}mlp.c_fc.bias"]))
    return x + F.linear(h, s[f"{p}mlp.c_proj.weight"], s[f"{p}mlp.c_proj.bias"])


def official_encode_image(s: dict[str, Tensor], pixels: Tensor) -> tuple[Tensor, Tensor]:
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + s["visual.positional_embedding"]
    x = _resblock(_ln(x, s, "visual.ln_pre."), s, "visual.transformer.resblocks.0.", VHEADS, causal=False)
    x = _ln(x, s, "visual.ln_post.")[:, 1:]
    p = "pool_project.pooler."
    q = F.linear(_ln(s["pool_project.query_token"].expand(len(x), -1, -1), s, f"{p}norm1_q."),
                 s[f"{p}cross_attn.q.weight"], s[f"{p}cross_attn.q_bias"])  # fmt: skip
    k = F.linear(_ln(x, s, f"{p}norm1_k."), s[f"{p}cross_attn.k.weight"], s[f"{p}cross_attn.k_bias"])
    v = F.linear(_ln(x, s, f"{p}norm1_v."), s[f"{p}cross_attn.v.weight"], s[f"{p}cross_attn.v_bias"])
    split = lambda t: t.reshape(len(t), t.shape[1], POOL_HEADS, -1).transpose(1, 2)  # noqa: E731
    attn = ((split(q) * (TW // POOL_HEADS) ** -0.5) @ split(k).transpose(-2, -1)).softmax(-1)
    pooled = (attn @ split(v)).transpose(1, 2).reshape(len(x), 1, -1)
    proj = s[f"{p}cross_attn.proj.weight"]
    return F.linear(pooled, proj)[:, 0], F.linear(v, proj)


def official_text(s: dict[str, Tensor], ids: Tensor, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(generation logits at every position [B, L, V], contrastive features at <soi> with context [X, E])."""
    x = s["text.token_embedding.weight"][ids]
    x[ids == SPECIAL["img"]] = image_tokens.flatten(0, 1)
    x = _resblock(x + s["text.positional_embedding"][: ids.shape[1]], s, "text.transformer.resblocks.0.", THEADS,
                  causal=True)  # fmt: skip
    logits = F.linear(_ln(x, s, "lm_head.0."), s["lm_head.1.weight"])
    soi = (ids == SPECIAL["soi"]) & (torch.arange(ids.shape[1]) > 0)
    return logits, F.normalize(_ln(x[soi], s, "text.ln_final.") @ s["text.text_projection"], dim=-1)


# ----------------------------------------------------------------------------------------------------- tests


def test_convert_loads_strictly_and_round_trips(tmp_path: Path) -> None:
    state = official_state()
    out = convert_official(write_checkpoint(tmp_path / "lcl.pt", state), tmp_path / "out", converter_cfg())
    task, config = load_task(out, expect_task="lcl")
    assert config["model"]["special_ids"] == SPECIAL and "ViT 24x1 /16 at 32 px" in conversion_summary(out)
    ours = task.state_dict()
    assert torch.equal(ours["visual.vit.cls_token"][0, 0], state["visual.class_embedding"])
    assert torch.equal(ours["text.text_projection.weight"], state["text.text_projection"].T)
    assert torch.equal(ours["visual.vit.patch_embed.proj.bias"], torch.zeros(VW))
    back = ours_to_official(ours, converter_cfg())
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_converted_model_computes_what_the_official_code_computes(tmp_path: Path) -> None:
    state = official_state(1)
    task, _ = load_task(convert_official(write_checkpoint(tmp_path / "lcl.pt", state), tmp_path / "o", converter_cfg()))
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        pooled, tokens = task.encode_image(pixels)
        ref_pooled, ref_tokens = official_encode_image(state, pixels)
        assert torch.allclose(pooled, ref_pooled, atol=1e-5) and torch.allclose(tokens, ref_tokens, atol=1e-5)
        block = [SPECIAL["soi"], *[SPECIAL["img"]] * 4, SPECIAL["eoi"]]  # N = (32 / 16)^2 = 4 patches
        rows = [[*block, 3, 4, SPECIAL["eot"]], [SPECIAL["sot"], 5, *block, 6, *block]]  # 3 images, 2 with context
        ids = torch.tensor([r + [SPECIAL["pad"]] * (15 - len(r)) for r in rows])
        hidden = task.run_sequences(ids, tokens)
        ref_logits, ref_text = official_text(state, ids, ref_tokens)
        _, text = task.contrastive_features(ids, hidden, pooled)
    assert torch.allclose(task.lm_head(hidden), ref_logits, atol=1e-4)
    assert text.shape == (2, TW) and torch.allclose(text, ref_text, atol=1e-5)


def test_bad_checkpoints_name_the_keys(tmp_path: Path) -> None:
    state = official_state()
    missing = {k: v for k, v in state.items() if k != "visual.ln_pre.weight"}
    with pytest.raises(UserError, match="missing visual.ln_pre.weight"):
        official_to_ours(missing, converter_cfg())
    with pytest.raises(UserError, match="unexpected visual.proj"):
        official_to_ours(state | {"visual.proj": torch.zeros(VW, TW)}, converter_cfg())
    wrong = state | {"text.token_embedding.weight": torch.zeros(VOCAB + 1, TW)}
    with pytest.raises(UserError, match=r"text.token_embedding.weight has shape \(16, 16\)"):
        official_to_ours(wrong, converter_cfg())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        convert_official(tmp_path / "junk.pt", tmp_path / "o", converter_cfg())
