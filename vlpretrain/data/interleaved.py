"""Interleaved image-text documents: MMC4 (jsonl + an image folder) and OBELICS (parquet).

A document is ``{"key": "name:line" (MMC4, 1-based) or "name:row" (OBELICS, 0-based), "items": [...]}`` where
items, in reading order, are ``{"type": "text", "text": str}`` and ``{"type": "image", "image": PIL image (or
path / bytes when images are not loaded), "name": str}``.

MMC4 lines hold ``text_list`` (sentences) and ``image_info[*].{image_name, matched_text_index, matched_sim}``.
Filtering follows LCL: keep matches with ``matched_sim >= 0.24``, at most one image per sentence (the most similar),
at most 6 images per document (the first in reading order); each image goes right after its sentence, or right
before it with probability ``image_first_prob`` (a per-document RNG seeded by (seed, file name, line)).

OBELICS rows hold ``texts`` and ``images`` lists of equal length with exactly one non-null entry per position;
an image is bytes, a path (relative to ``image_root`` or the parquet file's folder), a ``{"bytes", "path"}``
struct, or a URL (as in the released data: such images cannot be fetched here and are skipped as
``remote_image``).

Bad lines, rows, files and images are skipped and counted; a document keeps its other images and is dropped when
fewer than ``min_images`` remain. Both datasets stream like :class:`~vlpretrain.data.shards.PairShardDataset`
(positions (epoch, file index, items emitted from the file), split over ranks and workers by file when there are
enough files, else by line or row index) and plug into :class:`~vlpretrain.data.shards.DataStream`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import random
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlpretrain.core.image import ImageError, load_image
from vlpretrain.data.errors import DataError, SkipCounter
from vlpretrain.data.shards import SourceStreamDataset, expand_urls

MIN_SIM = 0.24
MAX_IMAGES = 6
_PARQUET_BATCH_ROWS = 256


def local_files(spec: str | Sequence[str]) -> list[str]:
    """Expand a file spec (globs, brace ranges, lists; see :func:`~vlpretrain.data.shards.expand_urls`), local only."""
    files = expand_urls(spec)
    for f in files:
        if f.startswith("pipe:"):
            raise DataError(f"document files must be local, got {f!r}")
    return files


# --------------------------------------------------------------------------------------------------------- MMC4


def select_mmc4_images(
    image_info: Sequence[Mapping[str, Any]], num_sentences: int, min_sim: float = MIN_SIM, max_images: int = MAX_IMAGES
) -> dict[int, Mapping[str, Any]]:
    """Sentence index -> the image kept for it.

    Args:
        image_info: MMC4 ``image_info`` entries.
        num_sentences: ``len(text_list)``.
        min_sim: drop matches below this similarity.
        max_images: keep at most this many images, the first in reading order.

    Raises:
        DataError: an entry lacks ``image_name`` / ``matched_text_index`` / ``matched_sim`` or points past the text
            (reason ``malformed_record``).
    """
    best: dict[int, Mapping[str, Any]] = {}
    for n, info in enumerate(image_info):
        try:
            name, index, sim = info["image_name"], info["matched_text_index"], float(info["matched_sim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"image_info[{n}] is malformed: {exc!r}", reason="malformed_record") from exc
        if not isinstance(name, str) or not isinstance(index, int) or not 0 <= index < num_sentences:
            raise DataError(f"image_info[{n}]: bad image_name or matched_text_index {index!r}", "malformed_record")
        if sim >= min_sim and (index not in best or sim > float(best[index]["matched_sim"])):
            best[index] = info
    return {index: best[index] for index in sorted(best)[:max_images]}


def mmc4_items(
    record: Mapping[str, Any],
    image_dir: str | Path,
    min_sim: float = MIN_SIM,
    max_images: int = MAX_IMAGES,
    image_first_prob: float = 0.0,
    rng: random.Random | None = None,
) -> list[dict[str, Any]]:
    """The ordered items of one MMC4 record; images are paths under ``image_dir`` (not loaded).

    Args:
        record: one parsed jsonl line.
        image_dir: the image folder.
        min_sim: similarity threshold.
        max_images: image cap per document.
        image_first_prob: probability of placing an image right before its sentence instead of after.
        rng: draws the placement (needed when ``image_first_prob > 0``).

    Raises:
        DataError: the record does not have the MMC4 fields (reason ``malformed_record``).
    """
    texts, infos = record.get("text_list"), record.get("image_info", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(infos, list):
        raise DataError("expected 'text_list' (list of str) and 'image_info' (list)", reason="malformed_record")
    if image_first_prob > 0 and rng is None:
        raise ValueError("mmc4_items: image_first_prob > 0 needs an rng")
    chosen = select_mmc4_images(infos, len(texts), min_sim, max_images)
    items: list[dict[str, Any]] = []
    for index, sentence in enumerate(texts):
        info = chosen.get(index)
        image = (
            None
            if info is None
            else {"type": "image", "image": Path(image_dir) / info["image_name"], "name": info["image_name"]}
        )
        first = image is not None and image_first_prob > 0 and rng.random() < image_first_prob
        if first:
            items.append(image)
        items.append({"type": "text", "text": sentence})
        if image is not None and not first:
            items.append(image)
    return items


@contextlib.contextmanager
def _open_lines(path: str) -> Iterator[IO[bytes]]:
    """A jsonl file as a binary line iterator: plain, ``.gz``, or a ``.zip`` holding one jsonl (as MMC4 ships)."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif path.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise OSError(f"{path}: expected one file in the zip archive, found {len(names)}")
            with archive.open(names[0]) as f:
                yield f
    else:
        with open(path, "rb") as f:
            yield f


def read_mmc4_file(
    path: str,
    image_dir: str | Path,
    counter: SkipCounter,
    keep: Callable[[int], bool] | None = None,
    min_sim: float = MIN_SIM,
    max_images: int = MAX_IMAGES,
    image_first_prob: float = 0.0,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Documents of one MMC4 jsonl file (images as paths), skipping and counting malformed lines.

    Args:
        path: the jsonl (``.jsonl``, ``.jsonl.gz`` or ``.zip``).
        image_dir: the image folder.
        counter: skip counter (strict: raises naming file and line).
        keep: ``keep(i)``: whether this reader owns line i (0-based); other lines are not parsed.
        min_sim, max_images, image_first_prob: see :func:`mmc4_items`.
        seed: seeds the per-document placement RNG.

    Yields:
        ``{"key": "name:line", "source": path, "items": [...]}``.
    """
    name, index = Path(path).name, -1
    try:
        with _open_lines(path) as lines:
            for index, line in enumerate(lines):
                if (keep is not None and not keep(index)) or not line.strip():
                    continue
                rng = random.Random(f"mmc4:{seed}:{name}:{index + 1}")
                try:
                    items = mmc4_items(json.loads(line), image_dir, min_sim, max_images, image_first_prob, rng)
                except (ValueError, DataError, AttributeError) as exc:
                    reason = getattr(exc, "reason", None) or "malformed_json"
                    counter.skip(reason, path, f"{name}:{index + 1}", str(exc)[:200])
                    continue
                yield {"key": f"{name}:{index + 1}", "source": path, "items": items}
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        at = index + 1
        if keep is None or keep(at):
            counter.skip("unreadable_file", path, f"{name}:{at + 1}" if at else "-", str(exc)[:200])


# ------------------------------------------------------------------------------------------------------ OBELICS


def obelics_items(texts: Any, images: Any, image_root: str | Path) -> list[dict[str, Any]]:
    """The ordered items of one OBELICS row; images stay bytes, paths or URLs (not loaded).

    Raises:
        DataError: the lists differ in length or a position has not exactly one of text and image
            (reason ``bad_row``).
    """
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise DataError("'texts' and 'images' must be lists of equal length", reason="bad_row")
    items: list[dict[str, Any]] = []
    for pos, (text, image) in enumerate(zip(texts, images, strict=True)):
        if (text is None) == (image is None):
            raise DataError(f"position {pos}: exactly one of text and image must be set", reason="bad_row")
        if text is not None:
            items.append({"type": "text", "text": text})
            continue
        if isinstance(image, dict):  # a {"bytes", "path"} struct (Hugging Face image feature)
            image = image.get("bytes") or image.get("path")
        if isinstance(image, bytes):
            items.append({"type": "image", "image": image, "name": f"image{pos}"})
        elif isinstance(image, str) and image:
            local = "://" not in image
            target = (Path(image_root) / image if not Path(image).is_absolute() else Path(image)) if local else image
            items.append({"type": "image", "image": target, "name": image})
        else:
            raise DataError(f"position {pos}: unsupported image value of type {type(image).__name__}", "bad_row")
    return items


def read_obelics_file(
    path: str,
    counter: SkipCounter,
    keep: Callable[[int], bool] | None = None,
    image_root: str | Path | None = None,
    texts_column: str = "texts",
    images_column: str = "images",
) -> Iterator[dict[str, Any]]:
    """Documents of one OBELICS parquet file (images not loaded), skipping and counting bad rows.

    An unreadable file (or one without the two columns) is skipped and counted as ``unreadable_file``.

    Args:
        path: the parquet file.
        counter: skip counter (strict: raises naming the file).
        keep: ``keep(i)``: whether this reader owns row i.
        image_root: folder for relative image paths (default: the parquet file's folder).
        texts_column, images_column: column names.

    Yields:
        ``{"key": "name:row", "source": path, "items": [...]}``.
    """
    root, name, row = Path(image_root) if image_root else Path(path).parent, Path(path).name, 0
    try:
        parquet = pq.ParquetFile(path)
        missing = sorted({texts_column, images_column} - set(parquet.schema_arrow.names))
        if missing:
            raise ValueError(f"no column(s) {missing}")
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[texts_column, images_column]):
            texts_col, images_col = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            for texts, images in zip(texts_col, images_col, strict=True):
                index, row = row, row + 1
                if keep is not None and not keep(index):
                    continue
                try:
                    items = obelics_items(texts, images, root)
                except DataError as exc:
                    counter.skip(exc.reason or "bad_row", path, f"{name}:{index}", str(exc))
                    continue
                yield {"key": f"{name}:{index}", "source": path, "items": items}
    except (OSError, pa.ArrowException, ValueError) as exc:
        if keep is None or keep(row):
            counter.skip("unreadable_file", path, f"{name}:{row}" if row else "-", str(exc)[:200])


# --------------------------------------------------------------------------------------------- shared decoding


def load_document_images(
    doc: Mapping[str, Any], counter: SkipCounter, load: bool = True, min_images: int = 1
) -> dict[str, Any]:
    """Resolve a document's images: decode them (``load``) or check that local files exist.

    Missing, corrupt and remote images are dropped from the document and counted (key ``"doc key/image name"``).

    Returns:
        ``{"key", "items"}`` with image items holding a PIL RGB image (or the path / bytes when not loading).

    Raises:
        DataError: fewer than ``min_images`` usable images remain (reason ``too_few_images``).
    """
    items: list[dict[str, Any]] = []
    for item in doc["items"]:
        if item["type"] != "image":
            items.append(item)
            continue
        try:
            image = _resolve_image(item["image"], load)
        except ImageError as exc:
            counter.skip(exc.reason, doc["source"], f"{doc['key']}/{item['name']}", str(exc)[:200])
            continue
        items.append({**item, "image": image})
    n_images = sum(item["type"] == "image" for item in items)
    if n_images < min_images:
        raise DataError(f"{doc['key']}: {n_images} usable image(s), min_images is {min_images}", "too_few_images")
    return {"key": doc["key"], "items": items}


def _resolve_image(image: Any, load: bool) -> Any:
    if isinstance(image, str):  # only URLs stay strings
        raise ImageError(f"{image}: remote images are not fetched", reason="remote_image")
    if load:
        return load_image(image)
    if isinstance(image, Path) and not image.is_file():
        raise ImageError(f"{image}: no such file", reason="missing_image")
    return image


class _DocumentDataset(SourceStreamDataset):
    """Shared decoding of the document datasets: resolve images, then the user's ``decode``."""

    source_label = "file"
    load_images: bool = True
    min_images: int = 1

    def item_origin(self, item: Mapping[str, Any]) -> tuple[str, str]:
        return item["source"], item["key"]

    def decode_item(self, item: Any, counter: SkipCounter) -> Any:
        doc = load_document_images(item, counter, self.load_images, self.min_images)
        return doc if self.decode is None else self.decode(doc)


class MMC4Dataset(_DocumentDataset):
    """MMC4 documents from jsonl files and an image folder, batched, shuffled and resumable.

    Args:
        jsonl: jsonl file spec (globs, brace ranges, lists; ``.jsonl``, ``.jsonl.gz`` or ``.zip``).
        image_dir: the folder holding the images named by ``image_info[*].image_name``.
        decode: document -> example (e.g. tokenisation); None keeps documents.
        min_sim: similarity threshold (LCL: 0.24).
        max_images: images per document (LCL: 6).
        image_first_prob: probability of an image going right before its sentence.
        min_images: drop documents with fewer usable images (``too_few_images``).
        load_images: decode images to PIL RGB; else keep paths (checking they exist).
        **see** :class:`~vlpretrain.data.shards.SourceStreamDataset` for the keyword-only stream arguments.
    """

    def __init__(
        self,
        jsonl: str | Sequence[str],
        image_dir: str | Path,
        decode: Callable[[dict[str, Any]], Any] | None = None,
        *,
        min_sim: float = MIN_SIM,
        max_images: int = MAX_IMAGES,
        image_first_prob: float = 0.0,
        min_images: int = 1,
        load_images: bool = True,
        batch_size: int = 1,
        collate: Callable[[list], Any] = list,
        shuffle_buffer: int = 0,
        seed: int = 0,
        infinite: bool = False,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        strict: bool = False,
        resume: Mapping[int, Sequence[int]] | None = None,
        rotation: int = 0,
        epoch: int = 0,
    ) -> None:
        super().__init__(
            local_files(jsonl),
            decode,
            batch_size=batch_size,
            collate=collate,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            infinite=infinite,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            strict=strict,
            resume=resume,
            rotation=rotation,
            epoch=epoch,
        )
        if not 0.0 <= image_first_prob <= 1.0 or max_images < 0 or min_images < 0:
            raise DataError(
                f"MMC4Dataset: need 0 <= image_first_prob <= 1, max_images >= 0 and min_images >= 0, "
                f"got {image_first_prob}, {max_images}, {min_images}"
            )
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"MMC4Dataset: image folder {self.image_dir} not found")
        self.min_sim, self.max_images, self.image_first_prob = min_sim, max_images, image_first_prob
        self.min_images, self.load_images = min_images, load_images

    def read_source(self, source: str, counter: SkipCounter, keep: Callable[[int], bool] | None) -> Iterator[Any]:
        return read_mmc4_file(
            source, self.image_dir, counter, keep, self.min_sim, self.max_images, self.image_first_prob, self.seed
        )


class ObelicsDataset(_DocumentDataset):
    """OBELICS documents from parquet files, batched, shuffled and resumable.

    Args:
        parquet: parquet file spec (globs, brace ranges, lists).
        decode: document -> example; None keeps documents.
        image_root: folder for relative image paths (default: each parquet file's folder).
        texts_column, images_column: column names.
        min_images: drop documents with fewer usable images (``too_few_images``).
        load_images: decode images to PIL RGB; else keep bytes / paths (checking paths exist).
        **see** :class:`~vlpretrain.data.shards.SourceStreamDataset` for the keyword-only stream arguments.
    """

    def __init__(
        self,
        parquet: str | Sequence[str],
        decode: Callable[[dict[str, Any]], Any] | None = None,
        *,
        image_root: str | Path | None = None,
        texts_column: str = "texts",
        images_column: str = "images",
        min_images: int = 1,
        load_images: bool = True,
        batch_size: int = 1,
        collate: Callable[[list], Any] = list,
        shuffle_buffer: int = 0,
        seed: int = 0,
        infinite: bool = False,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        strict: bool = False,
        resume: Mapping[int, Sequence[int]] | None = None,
        rotation: int = 0,
        epoch: int = 0,
    ) -> None:
        super().__init__(
            local_files(parquet),
            decode,
            batch_size=batch_size,
            collate=collate,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            infinite=infinite,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            strict=strict,
            resume=resume,
            rotation=rotation,
            epoch=epoch,
        )
        if min_images < 0:
            raise DataError(f"ObelicsDataset: min_images must be >= 0, got {min_images}")
        self.image_root = image_root
        self.texts_column, self.images_column = texts_column, images_column
        self.min_images, self.load_images = min_images, load_images

    def read_source(self, source: str, counter: SkipCounter, keep: Callable[[int], bool] | None) -> Iterator[Any]:
        return read_obelics_file(source, counter, keep, self.image_root, self.texts_column, self.images_column)
