"""Statistics and a sample grid for a set of pair shards (what ``vlpretrain data inspect`` prints).

Image sizes are read from the image headers, so a scan is fast; the grid images are fully decoded.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlpretrain.core.image import ImageError, load_image
from vlpretrain.data.errors import DataError, SkipCounter
from vlpretrain.data.shards import expand_urls, image_member, read_pair_shard, sample_caption

THUMB_SIZE = 128
CAPTION_LINES = 3
LINE_HEIGHT = 12
MAX_SIZES = 20


def inspect_shards(
    spec: str | Sequence[str],
    grid_png: str | Path | None = None,
    n_grid: int = 16,
    *,
    max_samples: int | None = None,
    require_caption: bool = False,
    max_sizes: int = MAX_SIZES,
) -> dict[str, Any]:
    """Count and describe the samples of a shard set.

    Args:
        spec: shards, see :func:`~vlpretrain.data.shards.expand_urls`.
        grid_png: write a grid of the first ``n_grid`` samples here (thumbnails, first caption words beneath).
        n_grid: images in the grid.
        max_samples: stop after this many samples.
        require_caption: count samples without caption as skipped (``missing_caption``) instead of as samples.
        max_sizes: image sizes listed individually; the rest are summed under ``"other"``.

    Returns:
        JSON-able ``{"shards", "samples", "skipped": {reason: n}, "skip_reports": [...], "caption_words": {"mean",
        "min", "max", "p50", "p95"} | None, "empty_captions", "image_sizes": {"WxH": n}, "distinct_image_sizes",
        "grid_png": str | None}``.
    """
    urls = expand_urls(spec)
    counter = SkipCounter()
    words: list[int] = []
    sizes: Counter[str] = Counter()
    grid: list[tuple[Image.Image, str]] = []
    samples = (sample for url in urls for sample in read_pair_shard(url, counter, require_caption=require_caption))
    for sample in samples:
        if max_samples is not None and len(words) >= max_samples:
            break
        try:
            caption = sample_caption(sample)
            width, height = _header_size(image_member(sample)[1])
            if len(grid) < n_grid and grid_png is not None:
                grid.append((load_image(image_member(sample)[1]), caption))
        except (DataError, ImageError) as exc:
            reason = getattr(exc, "reason", None) or "corrupt_image"
            counter.skip(reason, sample["__shard__"], sample["__key__"], str(exc)[:200])
            continue
        words.append(len(caption.split()))
        sizes[f"{width}x{height}"] += 1
    if grid_png is not None:
        draw_grid(grid, grid_png)
    return {
        "shards": len(urls),
        "samples": len(words),
        "skipped": dict(sorted(counter.counts.items())),
        "skip_reports": list(counter.reports),
        "caption_words": _word_stats(words),
        "empty_captions": sum(n == 0 for n in words),
        "image_sizes": _top_sizes(sizes, max_sizes),
        "distinct_image_sizes": len(sizes),
        "grid_png": None if grid_png is None else str(grid_png),
    }


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header only; raises ImageError when the header is unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image header: {exc}", reason="corrupt_image") from exc


def _word_stats(words: list[int]) -> dict[str, float] | None:
    if not words:
        return None
    counts = np.asarray(words, dtype=np.float64)
    return {
        "mean": round(float(counts.mean()), 3),
        "min": int(counts.min()),
        "max": int(counts.max()),
        "p50": float(np.percentile(counts, 50)),
        "p95": float(np.percentile(counts, 95)),
    }


def _top_sizes(sizes: Counter[str], limit: int) -> dict[str, int]:
    ranked = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    top = dict(ranked[:limit])
    rest = sum(n for _, n in ranked[limit:])
    if rest:
        top["other"] = rest
    return top


def draw_grid(samples: Sequence[tuple[Image.Image, str]], path: str | Path, thumb_size: int = THUMB_SIZE) -> Path:
    """Write a PNG grid of thumbnails, each with the first words of its caption beneath.

    Args:
        samples: (RGB image, caption) pairs.
        path: output PNG.
        thumb_size: thumbnail box side; images keep their aspect ratio inside it.

    Returns:
        The path written.
    """
    n = max(1, len(samples))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_w, cell_h = thumb_size + 8, thumb_size + 8 + CAPTION_LINES * LINE_HEIGHT
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(samples):
        x0, y0 = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        thumb = image.copy()
        thumb.thumbnail((thumb_size, thumb_size), Image.Resampling.BICUBIC)
        sheet.paste(thumb, (x0 + (thumb_size - thumb.width) // 2, y0 + (thumb_size - thumb.height) // 2))
        for j, line in enumerate(_wrap(draw, font, caption, thumb_size)):
            draw.text((x0, y0 + thumb_size + 2 + j * LINE_HEIGHT), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def _wrap(draw: ImageDraw.ImageDraw, font: Any, text: str, width: int) -> list[str]:
    """The first words of ``text`` wrapped to ``width`` pixels in at most CAPTION_LINES lines ("..." if cut)."""
    lines: list[str] = []
    current = ""
    words = text.split()
    for n, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not current:
            current = candidate
            continue
        lines.append(current)
        current = word
        if len(lines) == CAPTION_LINES:
            lines[-1] = lines[-1] + (" ..." if n < len(words) else "")
            return lines
    if current:
        lines.append(current)
    return lines
