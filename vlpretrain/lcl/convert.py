"""Official LCL checkpoints (open_clip format, e.g. ``LCL_ViT-B-16_laion``) <-> ``lcl`` folders.

The official model (``open_clip.lcl_model.LCL``) holds ``visual`` (open_clip's ``VisionTransformer`` with its
``proj`` removed), ``text`` (open_clip's ``TextTransformer``), ``pool_project`` (``AttentivePoolProjection``),
``lm_head`` (LayerNorm + bias-free Linear) and ``logit_scale``. Every key is mapped by an explicit
:class:`~vlpretrain.core.key_rules.KeyRule`; four tensors change shape on the way (``visual.class_embedding`` [W] ->
``cls_token`` [1, 1, W], ``visual.positional_embedding`` [T, W] -> ``pos_embed`` [1, T, W], ``text.text_projection``
[W, E] (used as ``x @ P``) -> a Linear weight [E, W], ``logit_scale`` [] -> [1] as FSDP2 needs); our patch
convolution's bias, which open_clip does not have, is written as zeros (and stays frozen). Missing, unexpected and
mis-shaped keys are errors naming them.

A checkpoint file is a bare state dict or a training checkpoint ``{"state_dict": ...}``, with or without DDP's
``module.`` prefix (what ``open_clip.factory.load_state_dict`` accepts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from vlpretrain.configs import apply_overrides, get_preset, to_dict
from vlpretrain.core.key_rules import KeyRule, official_name, our_key, rule_for
from vlpretrain.errors import UserError
from vlpretrain.lcl.config import TASK, LCLConfig
from vlpretrain.lcl.task import LCLTask

SOURCE = "open_clip"
ZERO_KEYS = ("visual.vit.patch_embed.proj.bias",)  # ours only: open_clip's conv1 has no bias
_BLOCK = (("ln_1.", "norm1."), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
          ("attn.out_proj.", "attn.proj."), ("ln_2.", "norm2."), ("mlp.c_fc.", "mlp.fc1."),
          ("mlp.c_proj.", "mlp.fc2."))  # fmt: skip
_FIXED = (
    ("logit_scale", "logit_scale"),
    ("visual.conv1.weight", "visual.vit.patch_embed.proj.weight"),
    ("visual.class_embedding", "visual.vit.cls_token"),
    ("visual.positional_embedding", "visual.vit.pos_embed"),
    ("visual.ln_pre.", "visual.ln_pre."),
    ("visual.ln_post.", "visual.vit.norm."),
    ("text.token_embedding.", "text.token_embedding."),
    ("text.positional_embedding", "text.pos_embed"),
    ("text.ln_final.", "text.ln_final."),
    ("text.text_projection", "text.text_projection.weight"),
    ("pool_project.query_token", "pool.query_token"),
    *((f"pool_project.pooler.norm1_{x}.", f"pool.norm_{x}.") for x in "qkv"),
    *((f"pool_project.pooler.cross_attn.{x}.", f"pool.{x}.") for x in ("q", "k", "v", "proj")),
    *((f"pool_project.pooler.cross_attn.{x}_bias", f"pool.{x}_bias") for x in "qkv"),
    ("lm_head.0.", "lm_head.norm."),
    ("lm_head.1.", "lm_head.out."),
)
_MAX_NAMED = 6


def key_rules(cfg: LCLConfig) -> list[KeyRule]:
    """The explicit official -> ours rules of a model with ``cfg``'s depths."""
    rules = [KeyRule(SOURCE, official, ours) for official, ours in _FIXED]
    towers = (("visual.transformer.resblocks.", "visual.vit.blocks.", cfg.vit.depth),
              ("text.transformer.resblocks.", "text.blocks.", cfg.text.layers))  # fmt: skip
    for official, ours, depth in towers:
        rules += [KeyRule(SOURCE, f"{official}{i}.{a}", f"{ours}{i}.{b}") for i in range(depth) for a, b in _BLOCK]
    return rules


def _to_ours(official: str, value: Tensor) -> Tensor:
    if official == "logit_scale":
        return value.reshape(1)
    if official == "visual.class_embedding":
        return value.reshape(1, 1, -1)
    if official == "visual.positional_embedding":
        return value[None]
    if official == "text.text_projection":
        return value.T.contiguous()
    return value


def _to_official(official: str, value: Tensor) -> Tensor:
    if official == "logit_scale":
        return value.reshape(())
    if official == "visual.class_embedding":
        return value.reshape(-1)
    if official == "visual.positional_embedding":
        return value[0]
    if official == "text.text_projection":
        return value.T.contiguous()
    return value


def read_official(path: str | Path) -> dict[str, Tensor]:
    """The flat official state dict in ``path`` (``state_dict`` unwrapped, ``module.`` stripped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike mean "not a checkpoint"
        raise UserError(f"{path}: cannot read checkpoint: {err}") from err
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors (or a checkpoint with 'state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _named(keys: list[str]) -> str:
    more = len(keys) - _MAX_NAMED
    return ", ".join(keys[:_MAX_NAMED]) + (f", ... ({more} more)" if more > 0 else "")


def official_to_ours(official: dict[str, Tensor], cfg: LCLConfig, where: str = "checkpoint") -> dict[str, Tensor]:
    """Our state dict from an official one, every key and shape checked against a model built from ``cfg``.

    Raises:
        UserError: keys the rules do not cover (unexpected), keys our model needs that the file lacks (missing, in
            official names), or a shape that differs from ``cfg``'s model (key and both shapes).
    """
    expected = _expected_shapes(cfg)
    rules = key_rules(cfg)
    ours: dict[str, Tensor] = {}
    unexpected = []
    for key, value in official.items():
        rule = rule_for(rules, SOURCE, key)
        name = our_key(rule, key) if rule is not None else None
        if name is None or name not in expected:
            unexpected.append(key)
            continue
        ours[name] = _to_ours(key, value)
    missing = [official_name(rules, k)[1] for k in expected if k not in ours and k not in ZERO_KEYS]
    if missing or unexpected:
        parts = ([f"missing {_named(missing)}"] if missing else []) + ([f"unexpected {_named(unexpected)}"]
                                                                       if unexpected else [])  # fmt: skip
        raise UserError(f"{where}: not an LCL checkpoint of this config ({'; '.join(parts)})")
    for name, value in ours.items():
        if tuple(value.shape) != expected[name]:
            raise UserError(f"{where}: {official_name(rules, name)[1]} has shape {tuple(value.shape)}, the config "
                            f"needs {expected[name]} (as {name}); pick the matching preset or --set sizes")  # fmt: skip
    for name in ZERO_KEYS:
        ours[name] = torch.zeros(expected[name], dtype=ours["visual.vit.patch_embed.proj.weight"].dtype)
    return ours


def ours_to_official(state: dict[str, Tensor], cfg: LCLConfig) -> dict[str, Tensor]:
    """The official state dict of our weights (inverse of :func:`official_to_ours`; the zero conv bias is dropped,
    a non-zero one is refused since open_clip cannot hold it)."""
    rules = key_rules(cfg)
    out = {}
    for name, value in state.items():
        if name in ZERO_KEYS:
            if bool(value.abs().max() > 0):
                raise UserError(f"{name}: non-zero, but open_clip's patch convolution has no bias")
            continue
        official = official_name(rules, name)[1]
        out[official] = _to_official(official, value.detach())
    return out


def _expected_shapes(cfg: LCLConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LCLTask(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def converter_config(preset: str = "paper", overrides: list[str] | None = None) -> LCLConfig:
    """The ``lcl`` preset the checkpoint must match, with ``--set`` overrides (e.g. ``vit.patch_size=32``)."""
    return apply_overrides(get_preset(TASK, preset), overrides or [])


def convert_official(path: str | Path, out_dir: str | Path, cfg: LCLConfig, dtype: str = "float32") -> Path:
    """Convert an official checkpoint into an ``lcl`` folder (``config.json`` + ``model.safetensors``).

    Args:
        path: the official ``.pt`` file.
        out_dir: the folder to write.
        cfg: the model config the checkpoint must match.
        dtype: storage dtype: float32, bfloat16 or float16.
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"--dtype: '{dtype}' is not one of {', '.join(dtypes)}")
    state = official_to_ours(read_official(path), cfg, where=str(path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtypes[dtype]).contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    record = {"task": TASK, "model": to_dict(cfg), "converted_from": str(path)}
    (out / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def conversion_summary(out_dir: str | Path) -> str:
    """One line about a converted folder: sizes and parameter count."""
    from safetensors import safe_open

    out = Path(out_dir)
    cfg = json.loads((out / "config.json").read_text())["model"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
    vit, text = cfg["vit"], cfg["text"]
    return (
        f"{out}: LCL ViT {vit['width']}x{vit['depth']} /{vit['patch_size']} at {vit['image_size']} px, LM "
        f"{text['width']}x{text['layers']} ({text['context_length']} positions), {params / 1e6:.1f}M parameters"
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = [
    "conversion_summary",
    "convert_official",
    "converter_config",
    "key_rules",
    "official_to_ours",
    "ours_to_official",
    "read_official",
]
