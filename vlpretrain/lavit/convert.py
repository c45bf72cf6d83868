"""Convert the official LaVIT visual tokenizer into a ``lavit-tokenizer`` folder that :func:`load_task` reads.

The official checkpoint (``rain1011/LaVIT-7B-v2`` layout, docs/lavit.md section 11) keeps the tokenizer in three
files under ``visual_tokenizer/``, each a flat state dict: a torch pickle ``.bin`` (read with ``weights_only=True``)
or a ``.safetensors`` twin (preferred when both exist):

- ``eva_vitg_psz14``: the frozen EVA-CLIP ViT-g/14; its weights become part of our folder;
- ``tokenizer_encoder``: selector, merger, ``encode_task_layer``, the codebook, and ``vit_proj`` (the projection
  into the LM's input space, used only for understanding: known, reported, not converted);
- ``tokenizer_decoder``: the feature decoder (``VQDecoder``), including ``unet_proj``.

Every key is mapped by one explicit prefix rule of :data:`KEY_RULES`; nothing is matched by shape or guessed. A key
no rule covers, a model key no file provides, or a shape that differs from the model config's is a
:class:`~vlpretrain.errors.UserError` that names the file, the official key and both shapes. The codebook goes
through :meth:`CosineCodebook.load_official`, which also sets our EMA state (not in the official files). The
warm-up counter ``train_calls`` is set to ``quant_warmup_steps``: the official codebook is trained, so a fine-tune
of the converted model quantises from its first step.

The model is built on the meta device and the files' tensors are assigned to it (cast to the model's dtypes), so
the 1.8B random parameters of the paper-size model are never materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlpretrain.configs import ConfigError, apply_overrides
from vlpretrain.core.key_rules import KeyRule, listed, map_source, missing_by_source, rule_for
from vlpretrain.core.official_files import SUFFIXES, first_file, official_folder
from vlpretrain.core.vit import read_state_dict
from vlpretrain.errors import UserError
from vlpretrain.lavit.tokenizer import TokenizerConfig
from vlpretrain.train.pretrained import conversion_record, save_task
from vlpretrain.train.task import build_task, task_config

TASK = "lavit-tokenizer"
SUBFOLDER = "visual_tokenizer"
FILE_STEMS = ("eva_vitg_psz14", "tokenizer_encoder", "tokenizer_decoder")
FORMATS = SUFFIXES  # the first one present is read
CODEBOOK_KEY = "tokenizer.quantize.embedding.weight"
# Our state that the official files do not hold: set by the converter, not loaded.
OURS_ONLY = frozenset(
    f"tokenizer.{name}"
    for name in (
        "train_calls",
        "token_predictor.keep_threshold",
        "quantize.ema_count",
        "quantize.ema_sum",
        "quantize.initialised",
    )
)


KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("eva_vitg_psz14", "", "tokenizer.encoder.model."),
    KeyRule("tokenizer_encoder", "token_predictor.", "tokenizer.token_predictor."),
    KeyRule("tokenizer_encoder", "causal_encoder.", "tokenizer.causal_encoder."),
    KeyRule("tokenizer_encoder", "encode_task_layer.", "tokenizer.encode_task_layer."),
    KeyRule("tokenizer_encoder", "quantize.embedding.weight", CODEBOOK_KEY),  # via CosineCodebook.load_official
    KeyRule("tokenizer_encoder", "vit_proj.", None),  # the LM's input projection (understanding only)
    KeyRule("tokenizer_decoder", "", "tokenizer.decoder."),
)


def converter_config(preset: str = "paper", overrides: Sequence[str] = ()) -> TokenizerConfig:
    """The model config to convert into: a ``lavit-tokenizer`` preset with ``key=value`` overrides applied."""
    return apply_overrides(task_config(TASK, preset, {}), list(overrides))


def convert_tokenizer(official_dir: str | Path, out_dir: str | Path, model_cfg: TokenizerConfig | None = None) -> Path:
    """Convert the official tokenizer files into a ``lavit-tokenizer`` folder (``config.json`` + weights).

    Args:
        official_dir: the official checkpoint folder (holding ``visual_tokenizer/``) or that subfolder itself.
        out_dir: the folder to write; :func:`vlpretrain.train.pretrained.load_task` loads it.
        model_cfg: the config the files must match; default the ``paper`` preset. ``encoder.kind`` must be
            ``"eva"`` and ``encoder.path`` empty (the encoder's weights come from ``official_dir``).

    Returns:
        ``out_dir``. Its ``config.json`` records the source under ``converted_from`` (files, official keys not
        used by the tokenizer, source dtypes, parameter count).

    Raises:
        UserError: a missing folder or file (named), unreadable files, missing or unexpected keys (listed per file),
            shape mismatches (key and both shapes), a codebook that is not unit-norm.
        ConfigError: a config the converter cannot fill (``encoder.kind``/``encoder.path``).
    """
    cfg = model_cfg if model_cfg is not None else converter_config()
    _check_config(cfg)
    files = _official_files(Path(official_dir))
    with torch.device("meta"):
        task = build_task(TASK, cfg)
    expected = {k: v for k, v in task.state_dict().items() if k not in OURS_ONLY}  # meta tensors: shapes, dtypes
    state, report = _map_official(files, expected)
    codebook = state.pop(CODEBOOK_KEY)
    result = task.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) != OURS_ONLY | {CODEBOOK_KEY}:
        raise RuntimeError(f"converter bug: key table out of date ({result})")
    _load_codebook(task.tokenizer.quantize, codebook, files["tokenizer_encoder"])
    task.tokenizer.train_calls = torch.tensor(cfg.quant_warmup_steps, dtype=torch.long)
    task.tokenizer.token_predictor.keep_threshold = torch.zeros(())  # p_keep > 0.5 until recalibrated
    _check_materialised(task)
    report["parameters"] = sum(p.numel() for p in task.parameters())
    return save_task(task, TASK, cfg, out_dir, extra={"converted_from": report})


def conversion_summary(out_dir: str | Path) -> str:
    """One line describing a converted folder (from the ``converted_from`` record of its ``config.json``)."""
    _, info = conversion_record(out_dir)
    unused = ", ".join(info["unused_keys"]) or "none"
    return (
        f"converted {info['source']} -> {out_dir}: {info['parameters']:,} parameters "
        f"({', '.join(info['source_dtypes'])}); official keys not used by the tokenizer: {unused}"
    )


def _check_config(cfg: TokenizerConfig) -> None:
    if cfg.encoder.kind != "eva":
        raise ConfigError(f"encoder.kind: the official tokenizer's encoder is EVA ('eva'), got {cfg.encoder.kind!r}")
    if cfg.encoder.path:
        raise ConfigError(
            f"encoder.path: must be empty when converting (the encoder comes from {SUBFOLDER}/{FILE_STEMS[0]}), "
            f"got {cfg.encoder.path!r}"
        )


def _official_files(official_dir: Path) -> dict[str, Path]:
    """The path of each official file, by stem; every missing one is named in a single error."""
    folder = official_folder(official_dir, "the official LaVIT checkpoint", SUBFOLDER)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for stem in FILE_STEMS:
        path = first_file(folder, stem, FORMATS)
        if path is not None:
            found[stem] = path
        else:
            missing.append(f"{folder / stem}.bin (or .safetensors)")
    if missing:
        raise UserError(f"official LaVIT tokenizer: missing file(s) {'; '.join(missing)}")
    return found


def _map_official(files: dict[str, Path], expected: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read every file and map its keys; returns (our key -> tensor cast to the model's dtype, report)."""
    state: dict[str, Tensor] = {}
    provided: set[str] = set()  # our keys some file holds, whatever their shape
    problems: dict[str, list[str]] = {stem: [] for stem in FILE_STEMS}
    unused: list[str] = []
    dtypes: set[str] = set()
    for stem, path in files.items():
        mapped = map_source(read_state_dict(path), partial(rule_for, KEY_RULES, stem), expected, consume=True)
        state |= mapped.state
        provided |= mapped.provided
        unused += list(mapped.unused)
        dtypes |= mapped.dtypes
        problems[stem] += mapped.problems("shape mismatch for", brackets=True)
    for stem, keys in missing_by_source(KEY_RULES, expected, provided).items():
        problems[stem].insert(0, f"missing keys {listed(keys, brackets=True)}")
    messages = [f"{files[stem]}: {'; '.join(found)}" for stem, found in problems.items() if found]
    if messages:
        raise UserError("official LaVIT tokenizer does not match the model config: " + " | ".join(messages))
    report = {
        "source": str(files[FILE_STEMS[0]].parent),
        "files": {stem: path.name for stem, path in files.items()},
        "unused_keys": sorted(unused),
        "source_dtypes": sorted(dtypes),
    }
    return state, report


def _load_codebook(quantize: nn.Module, weight_KC: Tensor, path: Path) -> None:
    """Materialise the quantizer on the CPU (its own init, then the official codes and our EMA state)."""
    quantize.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        quantize.init_weights()
    try:
        quantize.load_official(weight_KC)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err


def _check_materialised(module: nn.Module) -> None:
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"converter bug: tensors left on the meta device: {listed(left, brackets=True)}")


__all__ = ["KEY_RULES", "KeyRule", "conversion_summary", "convert_tokenizer", "converter_config"]
