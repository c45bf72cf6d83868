"""Captioning a benchmark with LaVIT's unified LM: an annotation file + its image folder -> captions -> COCO metrics.

The annotation file is one of the two public formats of :mod:`vlpretrain.eval.captioning`:

- ``karpathy`` (``dataset_coco.json``, ``dataset_flickr30k.json``): the images of one split; an image's file is
  ``IMAGES/<filepath>/<filename>`` (COCO's entries carry ``filepath``, e.g. ``val2014``), or ``IMAGES/<filename>``
  when that is where it is (a flat folder, Flickr30k);
- ``coco`` (``captions_val2014.json``, NoCaps): the ``images`` entries that have a caption; the file is
  ``IMAGES/<file_name>``.

Every image is captioned with beam search (LaVIT's defaults: 2 beams, 8..36 new tokens, cut at the first period),
the captions are written in the official results format ``[{"image_id", "caption"}]`` and scored against the
references of the same images (:func:`vlpretrain.eval.captioning.score_captions`). Beam search draws no random
numbers, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpretrain.errors import UserError
from vlpretrain.eval.captioning import METRICS, CaptionFormat, load_predictions, load_references, score_captions
from vlpretrain.eval.files import field, json_list, read_json
from vlpretrain.eval.run_common import CAPTION_SETTINGS, TextSettings, image_folder, in_batches, locate, write_json

if TYPE_CHECKING:
    from vlpretrain.lavit.pipeline import Pipeline


@dataclass(frozen=True)
class BenchmarkImage:
    """One image of an annotation file: its id as written there, its file name(s) relative to the image folder (in
    order of preference), and where the file lists it (for errors)."""

    image_id: int | str
    names: tuple[str, ...]
    where: str


def _detect(data: Any, format: CaptionFormat) -> CaptionFormat:
    if format != "auto":
        return format
    return "coco" if isinstance(data, dict) and "annotations" in data else "karpathy"


def _coco_images(data: Any, source: str) -> list[BenchmarkImage]:
    annotated = {str(a.get("image_id")) for a in json_list(data, source, "annotations") if isinstance(a, dict)}
    out: list[BenchmarkImage] = []
    for i, image in enumerate(json_list(data, source, "images")):
        where = f"images[{i}]"
        image_id = field(image, "id", source, where, (int, str))
        if str(image_id) in annotated:
            out.append(
                BenchmarkImage(image_id, (field(image, "file_name", source, where, str),), f"{where} of {source}")
            )
    unlisted = annotated - {str(im.image_id) for im in out}
    if unlisted:
        raise UserError(f"{source}: {len(unlisted)} captioned image ids are not in 'images' (first: {min(unlisted)})")
    return out


def _karpathy_images(data: Any, source: str, split: str) -> list[BenchmarkImage]:
    out: list[BenchmarkImage] = []
    for i, image in enumerate(json_list(data, source, "images")):
        where = f"images[{i}]"
        if field(image, "split", source, where, str) != split:
            continue
        key = "cocoid" if "cocoid" in image else "imgid"
        name = field(image, "filename", source, where, str)
        folder = image.get("filepath")
        names = (f"{folder}/{name}", name) if isinstance(folder, str) and folder else (name,)
        out.append(BenchmarkImage(field(image, key, source, where, (int, str)), names, f"{where} of {source}"))
    return out


def benchmark_images(
    annotations: str | Path, format: CaptionFormat = "auto", split: str = "test"
) -> list[BenchmarkImage]:
    """The images an annotation file holds captions for, in file order (``karpathy``: of ``split`` only)."""
    data = read_json(annotations)
    if _detect(data, format) == "coco":
        return _coco_images(data, str(annotations))
    return _karpathy_images(data, str(annotations), split)


def find_benchmark_images(
    annotations: str | Path, images: str | Path, format: CaptionFormat, split: str, limit: int | None,
    allow_missing: bool,
) -> tuple[list[tuple[BenchmarkImage, Path]], int]:  # fmt: skip
    """The first ``limit`` images of the file with their paths under ``images``, and how many were absent."""
    root = image_folder(images)
    listed = benchmark_images(annotations, format, split)[:limit]
    if not listed:
        raise UserError(f"{annotations}: no captioned image to evaluate")
    return locate(listed, lambda im: [root / n for n in im.names], lambda im: im.where, allow_missing)


def run(
    pipe: Pipeline,
    annotations: str | Path,
    images: str | Path,
    format: CaptionFormat = "auto",
    split: str = "test",
    limit: int | None = None,
    settings: TextSettings = CAPTION_SETTINGS,
    allow_missing: bool = False,
    predictions_path: str | Path | None = None,
    progress: bool = False,
    metrics: Sequence[str] = METRICS,
) -> dict[str, float]:
    """Caption the benchmark's images and score the captions.

    Args:
        pipe: a loaded LaVIT LM pipeline.
        annotations: a ``coco`` or ``karpathy`` annotation file.
        images: the folder the image files are under (see the module docstring).
        format, split: as :func:`vlpretrain.eval.captioning.load_references`.
        limit: caption only the first ``limit`` images (scored against their references: a subset, not comparable
            to published numbers).
        settings: beam search settings.
        allow_missing: skip images whose file is absent (counted in ``missing_images``) instead of failing.
        predictions_path: where to write the captions (``[{"image_id", "caption"}]``); None = not written.
        progress: show a progress bar.
        metrics: which of ``bleu``, ``meteor``, ``rouge``, ``cider`` to compute (METEOR starts a 2 GB Java process).

    Returns:
        ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider`` (those asked for), ``images`` (captioned) and
        ``missing_images``.
    """
    references = load_references(annotations, format, split)
    found, skipped = find_benchmark_images(annotations, images, format, split, limit, allow_missing)

    def caption(paths: list[Path]) -> list[str]:
        return pipe.caption([str(p) for p in paths], len(paths), settings.num_beams, settings.min_new_tokens,
                            settings.max_new_tokens)  # fmt: skip

    captions = in_batches(caption, [path for _, path in found], settings.batch_size, "captions", progress)
    rows = [{"image_id": im.image_id, "caption": text} for (im, _), text in zip(found, captions, strict=True)]
    write_json(predictions_path, rows)
    scored = {str(im.image_id): references[str(im.image_id)] for im, _ in found}
    return score_captions(load_predictions(rows), scored, metrics) | {"missing_images": float(skipped)}


__all__ = ["BenchmarkImage", "benchmark_images", "find_benchmark_images", "run"]
