"""What the evaluators that run a model on a benchmark share: finding its image files, batched calls with a
progress bar, and the results file written beside ``metrics.json``.

Every image path is checked before the model runs, so a missing file ends the evaluation at once with one line that
names it (a :class:`UserError`), or, with ``allow_missing``, its item is skipped and counted (``missing_images``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vlpretrain.errors import UserError
from vlpretrain.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class TextSettings:
    """Beam-search settings of captions and answers (:meth:`vlpretrain.lavit.pipeline.Pipeline.caption` / ``ask``).

    ``batch_size`` changes the speed, not the text (the pipeline's results do not depend on batching).
    """

    batch_size: int = 16
    num_beams: int = 2
    min_new_tokens: int = 8
    max_new_tokens: int = 36

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ValueError("batch_size, num_beams, max_new_tokens >= 1 and min_new_tokens >= 0 are required")


CAPTION_SETTINGS = TextSettings()  # LaVIT's captioning defaults
ANSWER_SETTINGS = TextSettings(num_beams=5, min_new_tokens=1, max_new_tokens=10)  # LaVIT's VQA defaults


def format_name(pattern: str, flag: str, **fields: Any) -> str:
    """``pattern.format(**fields)``; an unknown field or a format spec that does not fit (``{image_id:012d}`` of a
    string id) is a :class:`UserError` naming ``flag`` and the fields there are."""
    try:
        return pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        known = ", ".join("{" + k + "}" for k in fields)
        raise UserError(f"{flag} '{pattern}': cannot fill it for {fields} ({err}; fields: {known})") from err


def image_folder(images: str | Path) -> Path:
    """``images`` as a folder; a :class:`UserError` when it is not one."""
    root = Path(images)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    return root


def locate(
    items: Sequence[T],
    candidates: Callable[[T], Sequence[Path]],
    where: Callable[[T], str],
    allow_missing: bool,
) -> tuple[list[tuple[T, Path]], int]:
    """Each item with the first of its candidate image paths that is a file.

    Args:
        items: benchmark items (images or questions).
        candidates: the paths an item's image may have, in order of preference.
        where: names an item in an error (``"images[3] of dataset_coco.json"``).
        allow_missing: skip items whose image is absent instead of failing.

    Returns:
        (the items found with their paths, in order; how many were skipped).

    Raises:
        UserError: an image is absent (without ``allow_missing``), or every item was skipped.
    """
    found: list[tuple[T, Path]] = []
    for item in items:
        paths = list(candidates(item))
        path = next((p for p in paths if p.is_file()), None)
        if path is not None:
            found.append((item, path))
        elif not allow_missing:
            also = f" (nor {', '.join(map(str, paths[1:]))})" if len(paths) > 1 else ""
            raise UserError(f"image not found: {paths[0]}{also} for {where(item)}; "
                            "pass --allow-missing to skip and count such items")  # fmt: skip
    if not found:
        raise UserError(f"none of the {len(items)} images was found (first: {list(candidates(items[0]))[0]})")
    return found, len(items) - len(found)


def in_batches(
    fn: Callable[[list[T]], list[R]], inputs: Sequence[T], batch_size: int, description: str, progress: bool
) -> list[R]:
    """``fn`` over ``inputs`` in chunks of ``batch_size``, with a progress bar counting inputs; the concatenated
    results. A ValueError of ``fn`` (an image Pillow cannot decode, a prompt past the context) becomes a
    :class:`UserError`."""
    out: list[R] = []
    with progress_bar(description, total=len(inputs), enabled=progress) as advance:
        for start in range(0, len(inputs), batch_size):
            chunk = list(inputs[start : start + batch_size])
            try:
                out += fn(chunk)
            except ValueError as err:
                raise UserError(str(err)) from err
            advance(len(chunk))
    return out


def write_json(path: str | Path | None, data: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON (folders created); nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


__all__ = [
    "ANSWER_SETTINGS",
    "CAPTION_SETTINGS",
    "TextSettings",
    "format_name",
    "image_folder",
    "in_batches",
    "locate",
    "write_json",
]
