"""Finding and reading the files of an official checkpoint folder (shared by every converter).

An official release is a folder of parts: HF/diffusers model folders (one weights file or shards named by an
``*.index.json``), flat state dicts saved as ``.safetensors`` or ``.bin`` twins, and text tokenizer files. These
helpers find them, read them and name what is missing in one :class:`~vlpretrain.errors.UserError`; the key mapping
itself is :mod:`vlpretrain.core.key_rules`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from vlpretrain.core.vit import read_state_dict
from vlpretrain.errors import UserError

SUFFIXES = (".safetensors", ".bin")  # a flat state dict's formats, the preferred first
TEXT_TOKENIZER_MODELS = ("tokenizer.model", "tokenizer.json")  # one of these makes a text tokenizer


def official_folder(official_dir: Path, what: str, subfolder: str = "") -> Path:
    """``official_dir/subfolder`` when that exists, else ``official_dir`` (the subfolder given directly).

    Args:
        official_dir: the folder the user named.
        what: what it should be, for the error (e.g. "the official LaVIT checkpoint").
        subfolder: the part of the release to use; "" = ``official_dir`` itself.

    Raises:
        UserError: ``official_dir`` is not a folder.
    """
    if not official_dir.is_dir():
        raise UserError(f"{official_dir}: no such folder (expected {what})")
    return official_dir / subfolder if subfolder and (official_dir / subfolder).is_dir() else official_dir


def first_file(folder: Path, stem: str, suffixes: Sequence[str] = SUFFIXES) -> Path | None:
    """``folder/stem<suffix>`` for the first suffix whose file exists (None when none does)."""
    return next((folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()), None)


def read_hf_weights(folder: Path, weight_files: Sequence[str], index_files: Sequence[str],
                    what: str = "weights") -> dict[str, Tensor]:  # fmt: skip
    """The flat state dict of an HF or diffusers model folder: one weights file, or the shards an index names.

    Args:
        folder: the model folder.
        weight_files: single-file names to try, in order (e.g. ``model.safetensors``, ``pytorch_model.bin``).
        index_files: shard index names to try after them (their ``weight_map`` values are the shard files).
        what: the weights' name in the error when nothing is found (e.g. "LLaMA weights").

    Raises:
        UserError: no file of either kind, or an index that is not JSON with a ``weight_map`` object.
    """
    for name in weight_files:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for name in index_files:
        if (folder / name).is_file():
            try:
                shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError) as err:
                raise UserError(f"{folder / name}: not an HF weights index ({err})") from err
            state: dict[str, Tensor] = {}
            for shard in shards:
                state |= read_state_dict(folder / shard)
            return state
    raise UserError(f"{folder}: no {what} ({' or '.join((*weight_files, *index_files))})")


def copy_text_tokenizer(folder: Path, target: Path, names: Sequence[str]) -> Path:
    """Copy the text tokenizer files ``names`` that ``folder`` holds into ``target`` (created); returns ``target``.

    Raises:
        UserError: ``folder`` has neither ``tokenizer.model`` nor ``tokenizer.json``.
    """
    files = [folder / name for name in names if (folder / name).is_file()]
    if not any(f.name in TEXT_TOKENIZER_MODELS for f in files):
        raise UserError(f"{folder}: no text tokenizer ({' or '.join(TEXT_TOKENIZER_MODELS)})")
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, target / f.name)
    return target


__all__ = ["SUFFIXES", "copy_text_tokenizer", "first_file", "official_folder", "read_hf_weights"]
