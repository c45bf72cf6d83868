"""Convert the official LaVIT pixel decoder into a ``lavit-detokenizer`` folder that :func:`load_detokenizer` reads.

The official checkpoint (``rain1011/LaVIT-7B-v2`` layout, docs/lavit.md section 11) keeps the diffusion decoder in
a diffusers folder, ``pixel_decoding/`` (Stable-Diffusion-1.5-sized, 512 px) or ``highres_pixel_decoding/`` (SDXL,
1024 px), and the projection of the reconstructed features to the UNet's width in the tokenizer's decoder file:

- ``unet/config.json`` + ``diffusion_pytorch_model.{safetensors,bin}`` (or a sharded ``*.index.json``): the UNet;
- ``vae/`` (same layout, optional): the frozen AutoencoderKL; present = latent diffusion, absent = pixel space;
- ``scheduler/scheduler_config.json``: the noise schedule (names ``DDIMScheduler`` does not take are reported as
  ignored, as diffusers' own loader ignores them);
- ``uncond_embeddings.bin`` (``pixel_decoding`` only, optional): the stored negative condition [1, L, 768];
- ``visual_tokenizer/tokenizer_decoder.bin`` (``highres_tokenizer_decoder.bin``): ``unet_proj`` (``unet_proj_1``,
  ``unet_proj_2``, ``unet_attnpool``); its feature-decoder keys belong to the tokenizer (``convert lavit-tokenizer``)
  and are known and not used here.

The model config is read from the files, not assumed: the UNet, VAE and scheduler arguments are their
``config.json`` (minus diffusers' ``_`` bookkeeping keys); the feature width D, the projection widths and the pooled
width from the shapes of ``unet_proj*`` and ``unet_attnpool.c_proj``; N from the decoder's ``query_embed``. Only the
attention pool's head count is not in the files (``pool_heads``, 16 in the official code).

Every key is mapped by one explicit rule of :data:`KEY_RULES`; the VAE's pre-0.14 diffusers attention names
(``query``/``key``/``value``/``proj_attn``) are renamed to ``to_q``/``to_k``/``to_v``/``to_out.0`` by
:data:`LEGACY_VAE_ATTENTION`. A key no rule covers, a model key no file provides, or a shape that differs is a
:class:`~vlpretrain.errors.UserError` naming the file, the key and the shapes.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlpretrain.configs import ConfigError
from vlpretrain.core.key_rules import KeyRule, listed, map_source, missing_by_source, rule_for
from vlpretrain.core.official_files import first_file, official_folder, read_hf_weights
from vlpretrain.core.vit import read_state_dict
from vlpretrain.errors import UserError
from vlpretrain.lavit.detokenizer import DetokenizerConfig, DiffusionDecoder, projection_names
from vlpretrain.lavit.detokenizer_task import save_detokenizer
from vlpretrain.train.pretrained import conversion_record

VARIANTS = {"lowres": ("pixel_decoding", "tokenizer_decoder"), "highres": ("highres_pixel_decoding",
            "highres_tokenizer_decoder")}  # fmt: skip
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
NEGATIVE_FILE = "uncond_embeddings.bin"
# The feature decoder's own keys in the decoder file: converted with the tokenizer, not here.
FEATURE_DECODER_PREFIXES = ("in_proj.", "pos_embed", "query_embed", "blocks.", "norm.", "decode_task_layer.")
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
PREFIX = "detokenizer."  # the decoder's place in the task's state dict


KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("unet", "", "detokenizer.unet."),
    KeyRule("vae", "", "detokenizer.vae."),
    KeyRule("negative", "", "detokenizer.negative_embeds"),
    KeyRule("decoder", "unet_proj.", "detokenizer.condition.unet_proj."),
    KeyRule("decoder", "unet_proj_1.", "detokenizer.condition.unet_proj_1."),
    KeyRule("decoder", "unet_proj_2.", "detokenizer.condition.unet_proj_2."),
    KeyRule("decoder", "unet_attnpool.", "detokenizer.condition.unet_attnpool."),
    *(KeyRule("decoder", prefix, None) for prefix in FEATURE_DECODER_PREFIXES),
)


@dataclass
class Sources:
    """The official files of one decoder variant: their paths and flat state dicts, by part."""

    folder: Path
    paths: dict[str, Path]
    states: dict[str, dict[str, Tensor]]
    configs: dict[str, dict[str, Any]]


def read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    """The flat state dict of a diffusers model folder (one weights file, or the shards an index names)."""
    return read_hf_weights(folder, WEIGHT_FILES, INDEX_FILES)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _diffusers_config(path: Path) -> dict[str, Any]:
    """A diffusers ``config.json`` without its ``_`` bookkeeping keys (class name, version, name_or_path)."""
    return {k: v for k, v in _read_json(path).items() if not k.startswith("_")}


def _read_negative(path: Path) -> Tensor:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise UserError(f"{path}: cannot read: {err}") from err
    if not isinstance(value, Tensor) or value.ndim not in (2, 3) or (value.ndim == 3 and len(value) != 1):
        raise UserError(f"{path}: expected a tensor [1, L, C] or [L, C]")
    return value.reshape(value.shape[-2], value.shape[-1])


def read_sources(official_dir: Path, variant: str) -> Sources:
    """Find and read every official file of ``variant`` ("lowres" or "highres"); missing ones are named."""
    if variant not in VARIANTS:
        raise UserError(f"variant: {variant!r} is not one of {sorted(VARIANTS)}")
    sub, decoder_stem = VARIANTS[variant]
    folder = official_folder(official_dir, "the official LaVIT checkpoint") / sub
    tokenizer_dir = official_dir / "visual_tokenizer"
    decoder = first_file(tokenizer_dir, decoder_stem)
    missing = [str(p) for p in (folder / "unet", folder / "scheduler") if not p.is_dir()]
    missing += [] if decoder is not None else [f"{tokenizer_dir / decoder_stem}.bin (or .safetensors)"]
    if missing:
        raise UserError(f"official LaVIT {variant} decoder: missing {'; '.join(missing)}")
    paths = {"unet": folder / "unet", "decoder": decoder}
    states = {"unet": read_diffusers_weights(folder / "unet"), "decoder": read_state_dict(decoder)}
    configs = {"unet": _diffusers_config(folder / "unet" / "config.json"),
               "scheduler": _read_json(folder / "scheduler" / "scheduler_config.json")}  # fmt: skip
    if (folder / "vae").is_dir():
        paths["vae"] = folder / "vae"
        states["vae"] = {_modern_vae_key(k): v for k, v in read_diffusers_weights(folder / "vae").items()}
        configs["vae"] = _diffusers_config(folder / "vae" / "config.json")
    if (folder / NEGATIVE_FILE).is_file():
        paths["negative"] = folder / NEGATIVE_FILE
        states["negative"] = {"": _read_negative(folder / NEGATIVE_FILE)}
    return Sources(folder, paths, states, configs)


def _modern_vae_key(key: str) -> str:
    """A VAE key with the old mid-block attention names replaced (see :data:`LEGACY_VAE_ATTENTION`)."""
    for side in ("encoder", "decoder"):
        prefix = f"{side}.mid_block.attentions.0."
        if key.startswith(prefix):
            name, dot, rest = key[len(prefix) :].partition(".")
            if name in LEGACY_VAE_ATTENTION:
                return f"{prefix}{LEGACY_VAE_ATTENTION[name]}{dot}{rest}"
    return key


def _shape(sources: Sources, key: str) -> torch.Size:
    state = sources.states["decoder"]
    if key not in state:
        raise UserError(f"{sources.paths['decoder']}: missing key '{key}'")
    return state[key].shape


def config_from_sources(
    sources: Sources, variant: str, tokenizer: str, pool_heads: int
) -> tuple[DetokenizerConfig, list[str]]:
    """The model config the files describe, and the scheduler keys DDIM does not take (ignored)."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    names = projection_names(2 if variant == "highres" else 1)
    proj = [_shape(sources, f"{name}.weight") for name in names]
    feature_dim = proj[0][1]
    pooled_dim = _shape(sources, "unet_attnpool.c_proj.weight")[0] if variant == "highres" else 0
    num_patches = _shape(sources, "query_embed")[1]
    scheduler = {k: v for k, v in sources.configs["scheduler"].items() if not k.startswith("_")}
    known = inspect.signature(DDIMScheduler.__init__).parameters
    ignored = sorted(k for k in scheduler if k not in known)
    unet, vae = sources.configs["unet"], sources.configs.get("vae", {})
    latent = bool(vae)
    factor = 2 ** (len(vae.get("block_out_channels", [64])) - 1) if latent else 1
    negative = sources.states.get("negative", {}).get("")
    try:
        cfg = DetokenizerConfig(
            tokenizer=tokenizer, tokenizer_preset="paper", feature_dim=feature_dim, num_patches=num_patches,
            image_size=int(unet.get("sample_size") or 64) * factor, proj_dims=[p[0] for p in proj],
            pooled_dim=pooled_dim, pool_heads=pool_heads, latent=latent, unet=unet, vae=vae,
            scheduler={k: v for k, v in scheduler.items() if k in known},
            negative_tokens=0 if negative is None else len(negative), guidance_scale=5.0, sample_steps=50,
        )  # fmt: skip
    except ConfigError as err:
        raise UserError(f"{sources.folder}: the files do not describe a LaVIT decoder: {err}") from err
    return cfg, ignored


def map_keys(sources: Sources, expected: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Map every source key by :data:`KEY_RULES`; returns (our key -> tensor in the model's dtype, report)."""
    state: dict[str, Tensor] = {}
    provided: set[str] = set()
    problems: dict[str, list[str]] = {part: [] for part in sources.states}
    unused: dict[str, int] = {}
    dtypes: set[str] = set()
    for part, source in sources.states.items():
        mapped = map_source(source, partial(rule_for, KEY_RULES, part), expected)
        state |= mapped.state
        provided |= mapped.provided
        dtypes |= mapped.dtypes
        for rule in mapped.unused.values():
            unused[rule.official] = unused.get(rule.official, 0) + 1
        problems[part] += mapped.problems("shape mismatch for", brackets=True)
    for part, keys in missing_by_source(KEY_RULES, expected, provided).items():
        problems.setdefault(part, []).insert(0, f"missing keys {listed(keys, brackets=True)}")
    messages = [f"{sources.paths.get(part, part)}: {'; '.join(found)}" for part, found in problems.items() if found]
    if messages:
        raise UserError("official LaVIT decoder does not match its config: " + " | ".join(messages))
    report = {"unused_keys": unused, "source_dtypes": sorted(dtypes)}
    return state, report


def convert_detokenizer(official_dir: str | Path, out_dir: str | Path, variant: str = "lowres", tokenizer: str = "",
                        pool_heads: int = 16) -> Path:  # fmt: skip
    """Convert the official pixel decoder into a ``lavit-detokenizer`` folder (``config.json`` + weights).

    Args:
        official_dir: the official checkpoint folder (holding ``pixel_decoding/`` and ``visual_tokenizer/``).
        out_dir: the folder to write.
        variant: "lowres" (``pixel_decoding``) or "highres" (``highres_pixel_decoding``).
        tokenizer: the converted tokenizer folder to record (``Detokenizer.from_pretrained`` loads it); "" = none.
        pool_heads: heads of the high-res attention pool (not stored in the files; 16 officially).

    Returns:
        ``out_dir``; its ``config.json`` records the source under ``converted_from``.

    Raises:
        UserError: a missing folder, file or key, unreadable files, unexpected keys, shape mismatches.
    """
    sources = read_sources(Path(official_dir), variant)
    cfg, ignored = config_from_sources(sources, variant, tokenizer, pool_heads)
    with torch.device("meta"):
        decoder = DiffusionDecoder(cfg)
    expected = {f"{PREFIX}{k}": v for k, v in decoder.state_dict().items()}  # the task's key names
    state, report = map_keys(sources, expected)
    decoder.load_state_dict({k.removeprefix(PREFIX): v for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"converter bug: tensors left on the meta device: {listed(left, brackets=True)}")
    report |= {
        "source": str(sources.folder),
        "variant": variant,
        "files": {part: str(path) for part, path in sources.paths.items()},
        "ignored_scheduler_keys": ignored,
        "parameters": sum(p.numel() for p in decoder.parameters()),
    }
    return save_detokenizer(decoder, out_dir, extra={"converted_from": report})


def conversion_summary(out_dir: str | Path) -> str:
    """One line describing a converted folder (from the ``converted_from`` record of its ``config.json``)."""
    _, info = conversion_record(out_dir)
    unused = ", ".join(f"{prefix}* ({n})" for prefix, n in sorted(info["unused_keys"].items())) or "none"
    return (
        f"converted {info['source']} ({info['variant']}) -> {out_dir}: {info['parameters']:,} parameters "
        f"({', '.join(info['source_dtypes'])}); tokenizer keys left to `convert lavit-tokenizer`: {unused}; "
        f"ignored scheduler keys: {', '.join(info['ignored_scheduler_keys']) or 'none'}"
    )


__all__ = [
    "KEY_RULES",
    "KeyRule",
    "conversion_summary",
    "convert_detokenizer",
    "map_keys",
    "read_diffusers_weights",
    "read_sources",
]
