"""Webdataset pair shards (img2dataset layout) with exact resume.

A shard is a tar file whose members come in consecutive runs sharing a key: ``{key}.jpg|jpeg|png|webp`` (the
image), ``{key}.txt`` (the caption) and ``{key}.json`` (metadata). A raw *sample* is the dict
``{"__key__": str, "__shard__": url, "jpg"|"png"|...: bytes, "txt": bytes, "json": bytes, ...}`` (every member's
bytes, undecoded). Bad samples are skipped and counted, never fatal (see :mod:`vlpretrain.data.errors`).

Streaming and resume, shared by every dataset built on :class:`SourceStreamDataset`:

- Work is split over ``slots = world_size * num_workers``: by source (slot s reads sources s, s + slots, ...) when
  there are at least as many sources as slots, else by item (every slot reads every source and keeps the items
  whose in-source index % slots == s). Each item is seen exactly once per epoch.
- With shuffling on, the source list is shuffled per epoch (seed, epoch) and items pass through a shuffle buffer
  seeded by (seed, epoch, slot, source position) that is flushed at the end of every source. So a stream position
  is ``(epoch, index of the source in this slot's list, items emitted from it)``: resuming re-reads one source,
  replays its buffer and drops that many items without decoding them.
- Batching happens inside the dataset; each yielded item is ``{"batch", "data_state", "skipped", "skip_reports"}``
  (:class:`StreamProtocol`). :class:`DataStream` wraps the DataLoader, follows the positions of the batches it hands
  out and the worker round-robin, and resumes so that the following batches are exactly those of an uninterrupted
  stream.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import random
import re
import signal
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlpretrain.core.image import load_image, resize, to_tensor
from vlpretrain.data.errors import DataError, SkipCounter

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Exceptions from a decode function that mean "this sample is corrupt": skip and count it.
DECODE_ERRORS = (DataError, UnidentifiedImageError, OSError, ValueError)
STATE_VERSION = 1
Position = tuple[int, int, int]  # (epoch, source index in the slot's list, items emitted from that source)
T = TypeVar("T")

_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")
_PIPE_EXIT_TIMEOUT_S = 10.0
_SKIPPED = object()


# --------------------------------------------------------------------------------------------------- shard URLs


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard specification into a list of URLs (local paths or ``pipe:CMD``).

    A string spec may join several parts with ``::`` or ``,`` (commas inside braces belong to the braces; a
    ``pipe:`` part is never split at commas, so join several pipes with ``::``). Each part is brace-expanded
    (``shard-{000000..000009}.tar``, ``{a,b}.tar``), then a local part is globbed (``data/*.tar``; ``**``
    recurses) or, when it is a folder, stands for the ``*.tar`` files in it. A list spec gives the parts directly.

    Args:
        spec: the specification.

    Returns:
        URLs in spec order (glob matches sorted).

    Raises:
        DataError: naming the spec or path when a part matches no file, a path does not exist, a remote URL is not
            wrapped in ``pipe:``, braces are unbalanced or a shard is listed twice.
    """
    if isinstance(spec, str | os.PathLike):
        parts = _split_spec(os.fspath(spec))
    else:
        parts = [os.fspath(p).strip() for p in spec]
    if not parts or not all(parts):
        raise DataError(f"shard spec {spec!r} names no shard")
    urls = [url for part in parts for expanded in braceexpand(part) for url in _resolve_url(expanded, part)]
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise DataError(f"shard spec {spec!r} lists {url} more than once")
        seen.add(url)
    return urls


def braceexpand(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``a{1..3}`` -> a1 a2 a3, ``{01..03}`` keeps the zero padding, ``{x,y}z`` -> xz yz.

    Nested braces are expanded; a brace with one alternative and no range (``{x}``) stays literal, as in bash.

    Raises:
        DataError: unbalanced braces.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise DataError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return [pattern]
    end = _matching_brace(pattern, start)
    prefix, body, suffix = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    rest = braceexpand(suffix)
    numeric = _RANGE.fullmatch(body)
    if numeric:
        return [prefix + value + tail for value in _numeric_range(*numeric.groups()) for tail in rest]
    alternatives = _split_top_level(body, ",")
    if len(alternatives) < 2:
        return [prefix + "{" + body + "}" + tail for tail in rest]
    return [prefix + value + tail for alt in alternatives for value in braceexpand(alt) for tail in rest]


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return i
    raise DataError(f"unbalanced '{{' in shard pattern {pattern!r}")


def _numeric_range(first: str, last: str) -> list[str]:
    def padded(s: str) -> bool:
        digits = s.lstrip("-")
        return len(digits) > 1 and digits.startswith("0")

    width = max(len(first), len(last)) if padded(first) or padded(last) else 0
    lo, hi = int(first), int(last)
    step = 1 if hi >= lo else -1
    return [str(i).zfill(width) for i in range(lo, hi + step, step)]


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside braces."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _split_spec(spec: str) -> list[str]:
    parts: list[str] = []
    for piece in spec.split("::"):
        piece = piece.strip()
        if piece:
            parts.extend([piece] if piece.startswith("pipe:") else _split_top_level(piece, ","))
    return [p.strip() for p in parts if p.strip()]


def _resolve_url(url: str, part: str) -> list[str]:
    if url.startswith("pipe:"):
        if not url[5:].strip():
            raise DataError(f"shard spec {part!r}: empty pipe: command")
        return [url]
    url = url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:")
    if "://" in url:
        raise DataError(
            f"shard {url}: remote URLs are streamed through a command, e.g. 'pipe:aws s3 cp {url} -' "
            f"or 'pipe:curl -sSfL {url}'"
        )
    if _GLOB_CHARS.search(url):
        matches = sorted(p for p in glob.glob(url, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"shard spec {part!r} matches no file")
        return matches
    if os.path.isdir(url):
        tars = sorted(str(p) for p in Path(url).glob("*.tar"))
        if not tars:
            raise DataError(f"shard folder {url} holds no .tar file")
        return tars
    if not os.path.isfile(url):
        raise DataError(f"shard {url} not found" + (f" (from spec {part!r})" if part != url else ""))
    return [url]


# --------------------------------------------------------------------------------------------- reading one tar


class _Truncated(Exception):
    """The tar stream ended early; ``member`` is the member being read, None when it broke between members."""

    def __init__(self, member: str | None, detail: str) -> None:
        super().__init__(detail)
        self.member = member


@contextlib.contextmanager
def open_url(url: str) -> Iterator[BinaryIO]:
    """Open a shard URL for streaming reads: a local path, or ``pipe:CMD`` (the command's stdout)."""
    if not url.startswith("pipe:"):
        with open(url, "rb") as f:
            yield f
        return
    # A session of its own, so that a stuck command can be killed with every process it started.
    proc = subprocess.Popen(
        url[5:], shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()  # a command still writing gets SIGPIPE
        try:
            proc.wait(timeout=_PIPE_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular-file member, in order; raises :class:`_Truncated` when the tar ends early."""
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        member = None
        try:
            for info in archive:
                if not info.isfile():
                    continue
                member = info.name
                data = archive.extractfile(info).read()
                member = None
                yield info.name, data
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise _Truncated(member, str(exc)) from exc
        # tarfile ends quietly on a partial or missing header; a complete archive ends with a full zero block.
        if archive.fileobj.tell() - archive.offset < tarfile.BLOCKSIZE:
            raise _Truncated(None, "no end-of-archive marker")


def _split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/000123.jpg"`` -> ``("dir/000123", "jpg")``: the key ends at the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _iter_groups(url: str) -> Iterator[tuple[str, dict[str, bytes], str | None, str]]:
    """(key, members, problem, detail) per run of consecutive members sharing a key; problems are reasons."""
    key, members, problem = None, {}, None
    try:
        with open_url(url) as stream:
            for name, data in _iter_members(stream):
                split = _split_member_name(name)
                if split is None:
                    yield name, {}, "bad_member_name", ""
                    continue
                if split[0] != key:
                    if key is not None:
                        yield key, members, problem, ""
                    key, members, problem = split[0], {}, None
                if split[1] in members:
                    problem = "duplicate_member"
                members[split[1]] = data
    except _Truncated as exc:
        broken = _split_member_name(exc.member) if exc.member else None
        victim = broken[0] if broken else key
        if key is not None and victim != key:
            yield key, members, problem, ""  # complete: a member of the next key had started
        yield victim or "-", {}, "truncated_shard", str(exc)
        return
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        yield "-", {}, "unreadable_shard", str(exc)
        return
    if key is not None:
        yield key, members, problem, ""


def _check_members(members: Mapping[str, bytes], require_caption: bool) -> str | None:
    images = [ext for ext in IMAGE_EXTS if ext in members]
    if not images:
        return "missing_image"
    if len(images) > 1:
        return "multiple_images"
    if require_caption and not members.get("txt", b"").strip():
        return "missing_caption"
    return None


def read_pair_shard(
    url: str,
    counter: SkipCounter,
    require_caption: bool = True,
    keep: Callable[[int], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream the raw samples of one shard, skipping and counting bad ones.

    Args:
        url: a local path or ``pipe:CMD``.
        counter: where skipped samples are counted (raises instead when strict).
        require_caption: a sample without a non-empty ``.txt`` is skipped (``missing_caption``).
        keep: ``keep(i)`` says whether this reader owns the i-th key group of the shard (splitting by sample);
            problems of groups it does not own are neither reported nor counted.

    Yields:
        ``{"__key__", "__shard__", <ext>: bytes, ...}``.
    """
    for index, (key, members, problem, detail) in enumerate(_iter_groups(url)):
        if keep is not None and not keep(index):
            continue
        problem = problem or _check_members(members, require_caption)
        if problem:
            counter.skip(problem, url, key, detail)
            continue
        yield {"__key__": key, "__shard__": url, **members}


def image_member(sample: Mapping[str, Any]) -> tuple[str, bytes]:
    """The (extension, bytes) of the sample's image member."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise DataError(f"shard={sample.get('__shard__')}, key={sample.get('__key__')}: no image", reason="missing_image")


# ------------------------------------------------------------------------------------------- decode helpers


def decode_pair(sample: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Default decode for pair samples: image to a square tensor, caption and metadata parsed.

    Args:
        sample: a raw sample from :func:`read_pair_shard`.
        image_size: output side; the image is resized (bicubic, aspect ratio not kept) to image_size x image_size.

    Returns:
        ``{"image": float [3, image_size, image_size] in [0, 1], "caption": str, "meta": dict, "key": str}``.

    Raises:
        ImageError: corrupt, too small or too large image (a ``ValueError`` with a ``reason``).
        DataError: caption not UTF-8 (``bad_caption``) or metadata not a JSON object (``bad_metadata``).
    """
    _, data = image_member(sample)
    image = resize(load_image(data), image_size)
    return {
        "image": to_tensor(image),
        "caption": sample_caption(sample),
        "meta": sample_meta(sample),
        "key": sample["__key__"],
    }


def sample_caption(sample: Mapping[str, Any]) -> str:
    """The sample's caption (``""`` when it has none); raises :class:`DataError` when it is not UTF-8."""
    try:
        return sample.get("txt", b"").decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"key={sample.get('__key__')}: caption is not UTF-8: {exc}", reason="bad_caption") from exc


def sample_meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's parsed ``.json`` member (``{}`` when absent); raises :class:`DataError` when malformed."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except ValueError as exc:
        raise DataError(f"key={sample.get('__key__')}: bad metadata JSON: {exc}", reason="bad_metadata") from exc
    if not isinstance(meta, dict):
        raise DataError(f"key={sample.get('__key__')}: metadata is not a JSON object", reason="bad_metadata")
    return meta


def collate_pairs(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch :func:`decode_pair` outputs: ``{"image": float [B, 3, H, W], "caption", "meta", "key": lists}``."""
    return {
        "image": torch.stack([ex["image"] for ex in examples]),
        "caption": [ex["caption"] for ex in examples],
        "meta": [ex["meta"] for ex in examples],
        "key": [ex["key"] for ex in examples],
    }


def read_records(
    spec: str | Sequence[str], limit: int | None = None, counter: SkipCounter | None = None
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Every image and metadata record of a shard set, in order (for evaluation on small splits).

    Args:
        spec: shards, see :func:`expand_urls`.
        limit: stop after this many samples.
        counter: collects skipped samples (corrupt images, missing or bad metadata).

    Returns:
        (images as uint8 [H, W, 3] arrays, the parsed ``.json`` records), aligned.
    """
    counter = counter if counter is not None else SkipCounter()
    images: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    for url in expand_urls(spec):
        for sample in read_pair_shard(url, counter, require_caption=False):
            if limit is not None and len(records) >= limit:
                return images, records
            try:
                if "json" not in sample:
                    raise DataError("no .json member", reason="missing_metadata")
                record = sample_meta(sample)
                image = np.asarray(load_image(image_member(sample)[1]))
            except (DataError, ValueError) as exc:
                counter.skip(getattr(exc, "reason", None) or "corrupt_image", url, sample["__key__"], str(exc))
                continue
            images.append(image)
            records.append(record)
    return images, records


# ------------------------------------------------------------------------------------------ stream protocol


@runtime_checkable
class StreamProtocol(Protocol):
    """What :class:`DataStream` needs from an iterable dataset.

    Iterating yields whole batches as ``{"batch": collated, "data_state": {"slot_role": int, "epoch": int,
    "shard": int, "offset": int}, "skipped": {reason: count since the previous batch}, "skip_reports": [str]}``
    (``skip_reports`` optional). In a DataLoader worker ``w`` of ``W`` the dataset plays role
    ``(w + rotation) % W``; ``data_state`` is that role's position after the batch's last item.
    ``load_state_dict({"positions": {role: (epoch, shard, offset)}, "rotation": int, "epoch": int, "emit_tail":
    bool})`` makes the next iteration start each role just after its position (roles without one start at
    ``epoch``); with ``emit_tail``, a finite stream may end with an item whose ``"batch"`` is None, carrying the
    skips that followed its last batch.
    """

    rank: int
    world_size: int

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream through a buffer of ``size`` items; the buffer is flushed (shuffled) when the stream ends."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        out, buffer[j] = buffer[j], item
        yield out
    rng.shuffle(buffer)
    yield from buffer


def _owned(index: int, slot: int, slots: int) -> bool:
    return index % slots == slot


def _reason_of(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if reason:
        return reason
    return "corrupt_image" if isinstance(exc, UnidentifiedImageError | OSError) else "decode_error"


def _as_position(value: Sequence[int], role: int) -> Position:
    if len(value) != 3 or any(int(v) < 0 for v in value):
        raise DataError(f"data state: position of role {role} must be 3 non-negative ints, got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


# --------------------------------------------------------------------------------------------- the datasets


class SourceStreamDataset(IterableDataset):
    """Base of the resumable streaming datasets: sources (shards, files) -> items -> shuffle -> decode -> batches.

    Subclasses implement :meth:`read_source` (raw items of one source) and :meth:`item_origin`; they may override
    :meth:`decode_item`. See the module docstring for splitting, shuffling and positions.

    Args:
        sources: ordered source URLs or paths.
        decode: maps a raw item to a training example; a :data:`DECODE_ERRORS` exception skips and counts the item.
            None keeps raw items.
        batch_size: items per yielded batch.
        collate: maps a list of examples to a batch (default: the list itself).
        shuffle_buffer: shuffle buffer size; 0 turns shuffling (sources and items) off.
        seed: shuffling seed.
        infinite: loop over epochs forever (training); else one epoch (``epoch``) per iteration.
        drop_last: in finite mode, drop a final incomplete batch.
        rank: this process's rank (default: torch.distributed's, else 0).
        world_size: number of ranks (default: torch.distributed's, else 1).
        strict: raise a DataError on the first bad item instead of skipping it.
        resume: role -> (epoch, source index, offset) to start from (see :meth:`load_state_dict`).
        rotation: DataLoader worker w plays role (w + rotation) % num_workers.
        epoch: the epoch of roles without a resume position.
    """

    source_label = "shard"

    def __init__(
        self,
        sources: Sequence[str],
        decode: Callable[[Any], Any] | None = None,
        *,
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
        super().__init__()
        if not sources:
            raise DataError(f"{type(self).__name__}: no sources")
        if batch_size < 1 or shuffle_buffer < 0 or epoch < 0:
            raise DataError(
                f"{type(self).__name__}: batch_size >= 1, shuffle_buffer >= 0 and epoch >= 0 needed, "
                f"got {batch_size}, {shuffle_buffer}, {epoch}"
            )
        self.sources = list(sources)
        self.decode, self.collate = decode, collate
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.infinite, self.drop_last, self.strict = infinite, drop_last, strict
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.epoch, self.rotation = epoch, rotation
        self.emit_tail = False
        self.resume: dict[int, Position] = {}
        if resume:
            self.load_state_dict({"positions": resume, "rotation": rotation, "epoch": epoch})

    # ---- hooks for subclasses
    def read_source(self, source: str, counter: SkipCounter, keep: Callable[[int], bool] | None) -> Iterator[Any]:
        """Raw items of one source, skipping (and counting) bad ones; ``keep(i)``: whether this slot owns item i."""
        raise NotImplementedError

    def item_origin(self, item: Any) -> tuple[str, str]:
        """(source, key) of a raw item, for skip reports."""
        raise NotImplementedError

    def decode_item(self, item: Any, counter: SkipCounter) -> Any:
        """Raw item -> example; raising one of :data:`DECODE_ERRORS` skips the item."""
        return item if self.decode is None else self.decode(item)

    # ---- state
    def set_epoch(self, epoch: int) -> None:
        """Epoch for the next iteration of roles without a resume position (finite mode: reshuffles)."""
        self.epoch = epoch

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: ``{"positions": {role: (epoch, shard, offset)}, "rotation": int, "epoch": int, "emit_tail": bool}``.

        Every key is optional; role keys may be ints or their strings (JSON). See :class:`StreamProtocol`.
        """
        positions = state.get("positions", {})
        self.resume = {int(role): _as_position(pos, int(role)) for role, pos in positions.items()}
        self.rotation = int(state.get("rotation", 0))
        self.epoch = int(state.get("epoch", self.epoch))
        self.emit_tail = bool(state.get("emit_tail", False))

    # ---- iteration
    def sources_for_slot(self, epoch: int, slot: int, slots: int) -> tuple[list[str], Callable[[int], bool] | None]:
        """This slot's sources for ``epoch`` and its item filter (None: every item of those sources is its own)."""
        order = list(self.sources)
        if self.shuffle_buffer > 0:
            random.Random(f"sources:{self.seed}:{epoch}").shuffle(order)
        if len(order) >= slots:
            return order[slot::slots], None
        return order, functools.partial(_owned, slot=slot, slots=slots)

    def worker_role(self) -> tuple[int, int]:
        """(role, number of roles) of the calling process: one role per DataLoader worker, rotated."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.rotation) % info.num_workers, info.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        role, roles = self.worker_role()
        slot, slots = self.rank * roles + role, self.world_size * roles
        counter = SkipCounter(self.strict, self.source_label)
        position = start = self.resume.get(role, (self.epoch, 0, 0))
        batch: list[Any] = []
        last_good_epoch = start[0]
        for item, position in self._positions(slot, slots, start, counter):
            if position[0] >= last_good_epoch + 2:
                raise DataError(
                    f"{type(self).__name__}: slot {slot} of {slots} decoded no item in a whole epoch "
                    f"({position[0] - 1}); every item is bad?\n{counter.summary()}"
                )
            example = self._decode_or_skip(item, counter)
            if example is _SKIPPED:
                continue
            last_good_epoch = position[0]
            batch.append(example)
            if len(batch) == self.batch_size:
                yield self._emit(batch, role, position, counter)
                batch = []
        if batch and not self.drop_last:
            yield self._emit(batch, role, position, counter)
        elif counter.pending and self.emit_tail:
            yield self._emit(None, role, position, counter)  # the skips after the last batch

    def _positions(
        self, slot: int, slots: int, start: Position, counter: SkipCounter
    ) -> Iterator[tuple[Any, Position]]:
        """Raw items of this slot with the position after each, from ``start`` on."""
        epoch, first, offset = start
        fresh = False  # the start epoch may legitimately have nothing left
        while True:
            sources, keep = self.sources_for_slot(epoch, slot, slots)
            if first > 0 and first >= len(sources):
                raise DataError(
                    f"{type(self).__name__}: resume position {start} is past the {len(sources)} sources "
                    f"of slot {slot}; did the data or the number of workers change?"
                )
            emitted = 0
            for index in range(first, len(sources)):
                n = 0
                for n, item in enumerate(self._source_items(sources[index], counter, keep, epoch, slot, index), 1):
                    if n <= offset:
                        if n == offset:
                            counter.drain()  # what the replayed part skipped was counted before the checkpoint
                        continue
                    emitted += 1
                    yield item, (epoch, index, n)
                if n < offset:
                    raise DataError(
                        f"{type(self).__name__}: {self.source_label} {sources[index]} has {n} items "
                        f"but the resume position needs {offset}; did it change?"
                    )
                offset = 0
            if not self.infinite:
                return
            if fresh and emitted == 0:
                raise DataError(
                    f"{type(self).__name__}: slot {slot} of {slots} got no item in epoch {epoch}: "
                    f"fewer items than ranks x workers, or every item is bad?\n{counter.summary()}"
                )
            epoch, first, fresh = epoch + 1, 0, True

    def _source_items(
        self, source: str, counter: SkipCounter, keep: Callable[[int], bool] | None, epoch: int, slot: int, index: int
    ) -> Iterator[Any]:
        items = self.read_source(source, counter, keep)
        if self.shuffle_buffer > 0:
            rng = random.Random(f"buffer:{self.seed}:{epoch}:{slot}:{index}")
            items = shuffle_buffer(items, self.shuffle_buffer, rng)
        return items

    def _decode_or_skip(self, item: Any, counter: SkipCounter) -> Any:
        try:
            return self.decode_item(item, counter)
        except DECODE_ERRORS as exc:
            if getattr(exc, "located", False):  # a strict counter's report from inside decode
                raise
            source, key = self.item_origin(item)
            counter.skip(_reason_of(exc), source, key, str(exc)[:300])
            return _SKIPPED

    def _emit(self, batch: list[Any] | None, role: int, position: Position, counter: SkipCounter) -> dict[str, Any]:
        skipped, reports = counter.drain()
        epoch, shard, offset = position
        return {
            "batch": None if batch is None else self.collate(batch),
            "data_state": {"slot_role": role, "epoch": epoch, "shard": shard, "offset": offset},
            "skipped": skipped,
            "skip_reports": reports,
        }


class PairShardDataset(SourceStreamDataset):
    """Image-caption pairs from webdataset shards (img2dataset layout), batched, shuffled, resumable.

    Args:
        urls: shard spec, see :func:`expand_urls`.
        decode: raw sample -> example, e.g. ``functools.partial(decode_pair, image_size=224)``; None keeps raw
            samples. Must be picklable when DataLoader workers are spawned rather than forked.
        require_caption: skip samples without a non-empty caption (``missing_caption``).
        **see** :class:`SourceStreamDataset` for the other (keyword-only) arguments.
    """

    source_label = "shard"

    def __init__(
        self,
        urls: str | Sequence[str],
        decode: Callable[[dict[str, Any]], Any] | None = None,
        *,
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
        require_caption: bool = True,
    ) -> None:
        super().__init__(
            expand_urls(urls),
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
        self.require_caption = require_caption

    def read_source(self, source: str, counter: SkipCounter, keep: Callable[[int], bool] | None) -> Iterator[Any]:
        return read_pair_shard(source, counter, self.require_caption, keep)

    def item_origin(self, item: Mapping[str, Any]) -> tuple[str, str]:
        return item["__shard__"], item["__key__"]


# ------------------------------------------------------------------------------------------------ DataStream


class DataStream:
    """The training loop's view of a :class:`StreamProtocol` dataset: batches in, exact-resume state out.

    Iterating yields the collated batches of a ``DataLoader(dataset, batch_size=None, num_workers=W)``. The stream
    follows the position of each batch it hands out, which worker role comes next in the DataLoader's
    round-robin, and the skip counts; ``state_dict()`` is plain JSON. A stream built with ``state=`` (or after
    ``load_state_dict``) yields exactly the batches an uninterrupted stream would have yielded next. Iterating
    again continues where the previous iteration stopped; after a finite pass, the next one is the next epoch.

    Args:
        dataset: e.g. a :class:`PairShardDataset`; its rank and world size must match the saved state's.
        num_workers: DataLoader worker processes (0: in this process).
        state: a previous :meth:`state_dict` to resume from.
        pin_memory: DataLoader ``pin_memory``.
        prefetch_factor: DataLoader ``prefetch_factor`` (batches per worker; None: the default).
        multiprocessing_context: DataLoader ``multiprocessing_context``.
    """

    def __init__(
        self,
        dataset: StreamProtocol,
        num_workers: int = 0,
        state: Mapping[str, Any] | None = None,
        *,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: Any = None,
    ) -> None:
        if num_workers < 0:
            raise DataError(f"DataStream: num_workers must be >= 0, got {num_workers}")
        self.dataset, self.num_workers = dataset, num_workers
        self._loader_args = {"pin_memory": pin_memory, "multiprocessing_context": multiprocessing_context}
        if num_workers > 0 and prefetch_factor is not None:
            self._loader_args["prefetch_factor"] = prefetch_factor
        self.positions: dict[int, Position] = {}
        self.next_role = 0
        self.epoch = int(getattr(dataset, "epoch", 0))
        self.batches = 0
        self.skips = SkipCounter()
        if state is not None:
            self.load_state_dict(state)

    @property
    def roles(self) -> int:
        """Number of worker roles (1 without workers)."""
        return max(1, self.num_workers)

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped items by reason, over everything this stream (and the streams it resumes) handed out."""
        return dict(self.skips.counts)

    def __iter__(self) -> Iterator[Any]:
        self.dataset.load_state_dict(
            {"positions": dict(self.positions), "rotation": self.next_role, "epoch": self.epoch, "emit_tail": True}
        )
        # A private generator: the DataLoader draws its workers' base seed from it instead of from the global RNG,
        # so starting (or resuming) a stream never shifts the training RNG (dropout, Gumbel noise) of the run.
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(0),
            **self._loader_args,
        )
        batches = iter(loader)
        try:
            for item in batches:
                self._observe(item)
                if item["batch"] is not None:
                    yield item["batch"]
        finally:
            # Shut the workers down now. Left to the garbage collector (a worker's exception keeps the DataLoader
            # iterator alive through its traceback), the iterator's queues can be finalised first, and then each
            # worker takes 5 s to notice the shutdown. The method is private, hence the guard.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self.positions, self.next_role, self.epoch = {}, 0, self.epoch + 1

    def _observe(self, item: Mapping[str, Any]) -> None:
        state = item["data_state"]
        role = int(state["slot_role"])
        self.positions[role] = (int(state["epoch"]), int(state["shard"]), int(state["offset"]))
        self.next_role = (role + 1) % self.roles
        self.batches += item["batch"] is not None
        self.skips.update(item.get("skipped", {}), item.get("skip_reports", []))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able resume state (positions per worker role, next role, epoch, skip counts)."""
        return {
            "version": STATE_VERSION,
            "dataset": type(self.dataset).__name__,
            "rank": int(self.dataset.rank),
            "world_size": int(self.dataset.world_size),
            "num_workers": self.num_workers,
            "epoch": self.epoch,
            "next_role": self.next_role,
            "batches": self.batches,
            "positions": {str(role): list(pos) for role, pos in sorted(self.positions.items())},
            "skipped": dict(sorted(self.skips.counts.items())),
            "skip_reports": list(self.skips.reports),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the dataset class, rank, world size and num_workers must match."""
        expected = {
            "version": STATE_VERSION,
            "dataset": type(self.dataset).__name__,
            "rank": int(self.dataset.rank),
            "world_size": int(self.dataset.world_size),
            "num_workers": self.num_workers,
        }
        for field, value in expected.items():
            if state.get(field) != value:
                raise DataError(
                    f"data state: field '{field}' is {state.get(field)!r} but this stream has {value!r}; "
                    "exact resume needs the same data set, ranks and workers"
                )
        self.positions = {int(r): _as_position(p, int(r)) for r, p in state.get("positions", {}).items()}
        self.next_role = int(state.get("next_role", 0)) % self.roles
        self.epoch = int(state.get("epoch", 0))
        self.batches = int(state.get("batches", 0))
        self.skips = SkipCounter()
        self.skips.update(state.get("skipped", {}), state.get("skip_reports", []))

    def skip_report(self) -> str:
        """Counts of skipped items by reason and the first reports, as a few lines of text."""
        return self.skips.summary()
