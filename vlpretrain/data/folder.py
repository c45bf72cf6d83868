"""Write img2dataset-layout shards (:class:`ShardWriter`) and import an image folder with captions into them.

Shards are tar files ``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ... whose members per key are written in
the order given (``{key}.png|jpg``, ``{key}.txt``, ``{key}.json``). Member metadata is fixed (mtime 0, uid/gid 0,
mode 0644), so the same input gives byte-identical shards. A shard is written to ``*.tar.tmp`` and renamed when
complete: an interrupted run never leaves a truncated ``.tar`` that looks finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from vlpretrain.core.image import ImageError, load_image, resize_shorter
from vlpretrain.data.errors import DataError, SkipCounter
from vlpretrain.progress import progress_bar

IMPORT_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KEEP_AS_IS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
PROGRESS_MIN_IMAGES = 200  # below this an import takes a moment and a bar is noise
JPEG_QUALITY = 95

_KEY = re.compile(r"[A-Za-z0-9_-]+")
_EXT = re.compile(r"[a-z0-9]+(\.[a-z0-9]+)*")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")


class ShardWriter:
    """Write samples into numbered tar shards of at most ``max_count`` samples each.

    Use as a context manager (or call :meth:`close`); an exception inside the ``with`` block discards the shard
    being written and keeps the completed ones. Existing shards of the same names are replaced.

    Args:
        out_dir: destination folder (created).
        prefix: shard name prefix: ``{prefix}-{index:06d}.tar``.
        max_count: samples per shard.

    Attributes:
        shards: paths of the shards written so far, including the one being written (complete after close).
        count: samples written.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", max_count: int = 1000) -> None:
        if max_count < 1:
            raise ValueError(f"ShardWriter: max_count must be >= 1, got {max_count}")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"ShardWriter: prefix {prefix!r} may only hold letters, digits, '_', '-' and '.'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count = prefix, max_count
        self.shards: list[Path] = []
        self.count = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def write(self, key: str, members: Mapping[str, bytes | str | Mapping | list]) -> None:
        """Write one sample.

        Args:
            key: unique sample key: letters, digits, ``_`` and ``-`` (no dots: the key ends at the first dot).
            members: extension -> content, written in this order, e.g. ``{"png": bytes, "txt": str, "json": dict}``.
                Bytes are written as they are, strings as UTF-8, dicts and lists as JSON (sorted keys).
        """
        if not _KEY.fullmatch(key):
            raise ValueError(f"ShardWriter: key {key!r} may only hold letters, digits, '_' and '-'")
        if key in self._keys:
            raise ValueError(f"ShardWriter: key {key!r} written twice")
        if not members:
            raise ValueError(f"ShardWriter: sample {key!r} has no members")
        encoded = {ext: _encode_member(key, ext, value) for ext, value in members.items()}
        if self._tar is None or self._in_shard >= self.max_count:
            self._next_shard()
        for ext, data in encoded.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._in_shard += 1
        self.count += 1

    def _next_shard(self) -> None:
        self._finish_shard()
        path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(_tmp_path(path), "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed in _finish_shard)
        self.shards.append(path)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(_tmp_path(self.shards[-1]), self.shards[-1])
            self._tar = None

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard path."""
        self._finish_shard()
        return list(self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            _tmp_path(self.shards.pop()).unlink(missing_ok=True)
            self._tar = None


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _encode_member(key: str, ext: str, value: bytes | str | Mapping | list) -> bytes:
    if not _EXT.fullmatch(ext):
        raise ValueError(f"ShardWriter: sample {key!r}: bad member extension {ext!r} (lowercase letters and digits)")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Mapping | list):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"ShardWriter: sample {key!r} member {ext!r}: cannot write a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- folder import


@dataclass
class ImportReport:
    """What :func:`import_folder` did.

    Attributes:
        found: images found in the source folder.
        written: samples written.
        shards: the shard files.
        skipped: skipped images by reason (``missing_caption``, ``corrupt_image``, ...).
        reports: the first skip reports.
        unmatched_captions: captions.jsonl entries naming no image of the folder.
    """

    found: int
    written: int
    shards: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    unmatched_captions: int = 0

    def __str__(self) -> str:
        where = str(Path(self.shards[0]).parent) if self.shards else "-"
        lines = [f"imported {self.written} of {self.found} images into {len(self.shards)} shard(s) in {where}"]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
            lines += [f"  {r}" for r in self.reports]
        if self.unmatched_captions:
            lines.append(f"{self.unmatched_captions} caption(s) in captions.jsonl name no image")
        return "\n".join(lines)


def import_folder(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    captions: str = "auto",
    max_per_shard: int = 1000,
    image_size: int | None = None,
    *,
    prefix: str = "shard",
    allow_missing_caption: bool = False,
    quiet: bool = False,
) -> ImportReport:
    """Import a folder of images with captions into img2dataset-layout shards.

    Images (png, jpg, jpeg, webp, bmp; any depth) are taken in sorted relative-path order. Captions come from a
    sidecar ``name.txt`` next to each image, or from a ``captions.jsonl`` of ``{"file": relative path, "caption":
    str}`` lines. Keys derive from relative paths (``a/b c.png`` -> ``a_b_c``; ``_1``, ``_2``, ... on clashes).
    PNG, JPEG and WebP bytes are copied unchanged, BMP is re-encoded as PNG; with ``image_size`` images are
    downscaled so that the shorter side is at most that (PNG stays PNG, the rest become JPEG quality 95).
    The ``.json`` member holds key, source path, sizes and the SHA-256 of the source file.

    Args:
        src_dir: the image folder.
        out_dir: where shards go.
        captions: ``"auto"`` (captions.jsonl when the folder has one, else sidecars), ``"sidecar"``, ``"jsonl"``
            (``src_dir/captions.jsonl``) or the path of a jsonl file.
        max_per_shard: samples per shard.
        image_size: downscale bound for the shorter side; None keeps sizes.
        prefix: shard name prefix.
        allow_missing_caption: write images without a caption (empty ``.txt``) instead of skipping them.
        quiet: no progress bar (one is shown for large folders otherwise).

    Returns:
        An :class:`ImportReport`.

    Raises:
        DataError: ``src_dir`` is not a folder, or captions.jsonl is malformed (naming file and line).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"import_folder: {src} is not a folder")
    images = sorted(
        (p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMPORT_EXTS),
        key=lambda p: p.relative_to(src).as_posix(),
    )
    table = _caption_table(src, captions)
    counter = SkipCounter(label="file")
    used_keys: set[str] = set()
    with ShardWriter(out_dir, prefix=prefix, max_count=max_per_shard) as writer:
        show = not quiet and len(images) >= PROGRESS_MIN_IMAGES
        with progress_bar(f"importing {src.name}", total=len(images), enabled=show) as advance:
            for path in images:
                rel = path.relative_to(src).as_posix()
                sample = _import_one(path, rel, table, image_size, allow_missing_caption, counter)
                if sample is not None:
                    key = _unique_key(rel, used_keys)
                    sample["json"] = {"key": key, **sample["json"]}
                    writer.write(key, sample)
                advance(1)
    unmatched = 0 if table is None else len(set(table) - {p.relative_to(src).as_posix() for p in images})
    return ImportReport(
        found=len(images),
        written=writer.count,
        shards=[str(p) for p in writer.shards],
        skipped=dict(counter.counts),
        reports=list(counter.reports),
        unmatched_captions=unmatched,
    )


def _import_one(
    path: Path,
    rel: str,
    table: dict[str, str] | None,
    image_size: int | None,
    allow_missing_caption: bool,
    counter: SkipCounter,
) -> dict[str, Any] | None:
    """The members of one sample (key filled in by the caller), or None when skipped (counted)."""
    try:
        caption = table.get(rel) if table is not None else _sidecar_caption(path)
    except UnicodeDecodeError as exc:
        counter.skip("bad_caption", rel, "-", f"{path.with_suffix('.txt').name} is not UTF-8: {exc}")
        return None
    if not caption and not allow_missing_caption:
        counter.skip("missing_caption", rel, "-")
        return None
    data = path.read_bytes()
    try:
        image = load_image(data)
    except ImageError as exc:
        counter.skip(exc.reason, rel, "-", str(exc))
        return None
    encoded, ext = _encode_image(image, data, path.suffix.lower(), image_size)
    meta = {
        "source": rel,
        "width": 0,
        "height": 0,
        "original_width": image.width,
        "original_height": image.height,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    meta["width"], meta["height"] = Image.open(io.BytesIO(encoded)).size
    return {ext: encoded, "txt": caption or "", "json": meta}


def _encode_image(image: Image.Image, data: bytes, suffix: str, image_size: int | None) -> tuple[bytes, str]:
    """(bytes, extension) to store: the original bytes when possible, else a re-encoding."""
    if image_size is None and suffix in KEEP_AS_IS:
        return data, KEEP_AS_IS[suffix]
    if image_size is not None:
        image = resize_shorter(image, image_size)
    out = io.BytesIO()
    if suffix in (".png", ".bmp"):
        image.save(out, format="PNG")
        return out.getvalue(), "png"
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "jpg"


def _sidecar_caption(image_path: Path) -> str | None:
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    return sidecar.read_bytes().decode("utf-8").strip() or None


def _caption_table(src: Path, captions: str) -> dict[str, str] | None:
    """relative path -> caption from a captions.jsonl, or None for sidecar captions."""
    default = src / "captions.jsonl"
    if captions == "sidecar" or (captions == "auto" and not default.is_file()):
        return None
    path = default if captions in ("auto", "jsonl") else Path(captions)
    if not path.is_file():
        raise DataError(f"import_folder: captions file {path} not found")
    table: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, caption = entry["file"], entry["caption"]
            if not isinstance(name, str) or not isinstance(caption, str):
                raise TypeError("'file' and 'caption' must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f'{path}:{line_no}: expected {{"file": str, "caption": str}}: {exc}') from exc
        rel = PurePosixPath(os.path.normpath(name).replace(os.sep, "/")).as_posix()
        if rel in table:
            raise DataError(f"{path}:{line_no}: file {name!r} has a caption already")
        table[rel] = caption.strip()
    return table


def _unique_key(rel: str, used: set[str]) -> str:
    """A shard key from a relative path: non key characters become '_'; clashes get a numeric suffix."""
    stem = rel.rsplit(".", 1)[0]
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "image"
    key, n = base, 0
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key
