"""Inline SVG plots for the demo report: line plots (loss curves) and a scatter with per-x means.

Pure string building, no plotting library: the report page must stay one self-contained file. Coordinates: data
``(x, y)`` map to pixels inside a margin box; y grows upwards on the page as in any plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 58, 16, 30, 42

Point = tuple[float, float]


@dataclass(frozen=True)
class _Axes:
    """The data ranges and the pixel box they map to."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    width: int
    height: int

    def px(self, x: float, y: float) -> Point:
        """Pixel position of the data point ``(x, y)``."""
        inner_w = self.width - _MARGIN_LEFT - _MARGIN_RIGHT
        inner_h = self.height - _MARGIN_TOP - _MARGIN_BOTTOM
        fx = (x - self.x_lo) / (self.x_hi - self.x_lo)
        fy = (y - self.y_lo) / (self.y_hi - self.y_lo)
        return _MARGIN_LEFT + fx * inner_w, self.height - _MARGIN_BOTTOM - fy * inner_h


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values inside ``[lo, hi]``, at most ``count + 1`` (steps of 1, 2 or 5 times a power of ten)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _axes_for(points: Sequence[Point], width: int, height: int, y_from_zero: bool = False) -> _Axes:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = (min(0.0, min(ys)) if y_from_zero else min(ys)), max(ys)
    pad_x = (x_hi - x_lo) * 0.03 or 0.5
    pad_y = (y_hi - y_lo) * 0.06 or abs(y_hi) * 0.1 or 1.0
    return _Axes(x_lo - pad_x, x_hi + pad_x, y_lo - (0 if y_from_zero and y_lo == 0 else pad_y), y_hi + pad_y,
                 width, height)  # fmt: skip


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.1e}"


def _frame(ax: _Axes, title: str, x_label: str, y_label: str) -> list[str]:
    """The plot box, tick marks with labels, axis labels and title as SVG elements."""
    left, bottom = _MARGIN_LEFT, ax.height - _MARGIN_BOTTOM
    right, top = ax.width - _MARGIN_RIGHT, _MARGIN_TOP
    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#fff" stroke="#888"/>']
    for x in nice_ticks(ax.x_lo, ax.x_hi):
        px = ax.px(x, ax.y_lo)[0]
        parts.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" stroke="#888"/>')
        parts.append(f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">{_fmt(x)}</text>')
    for y in nice_ticks(ax.y_lo, ax.y_hi):
        py = ax.px(ax.x_lo, y)[1]
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 5}" y="{py + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    parts.append(f'<text x="{mid_x}" y="{ax.height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14,{mid_y}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
    parts.append(f'<text x="{mid_x}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>')
    return parts


def _svg(ax: _Axes, parts: list[str], label: str) -> str:
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{ax.width}" height="{ax.height}" '
        f'viewBox="0 0 {ax.width} {ax.height}" role="img" aria-label="{escape(label)}" font-family="sans-serif" '
        f'font-size="11">\n{body}\n</svg>'
    )


def _finite(points: Sequence[Point]) -> list[Point]:
    return [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def line_plot(series: Mapping[str, Sequence[Point]], title: str, x_label: str, y_label: str, width: int = 520,
              height: int = 280) -> str:  # fmt: skip
    """An SVG line plot of one or more named series of ``(x, y)`` points (non-finite points are dropped).

    Raises:
        ValueError: when no series has a finite point.
    """
    clean = {name: _finite(points) for name, points in series.items()}
    clean = {name: points for name, points in clean.items() if points}
    if not clean:
        raise ValueError(f"line plot {title!r}: no finite points")
    ax = _axes_for([p for points in clean.values() for p in points], width, height)
    parts = _frame(ax, title, x_label, y_label)
    for i, (name, points) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (ax.px(*p) for p in points))
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.6" points="{path}"/>')
        if len(points) == 1:
            cx, cy = ax.px(*points[0])
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>')
        legend_y = _MARGIN_TOP + 14 + 14 * i
        parts.append(f'<text x="{width - _MARGIN_RIGHT - 6}" y="{legend_y}" text-anchor="end" fill="{colour}">'
                     f"{escape(name)}</text>")  # fmt: skip
    return _svg(ax, parts, title)


def scatter_plot(points: Sequence[Point], means: Sequence[Point], title: str, x_label: str, y_label: str,
                 width: int = 520, height: int = 300, jitter: float = 0.25) -> str:  # fmt: skip
    """An SVG scatter of ``points`` (x spread deterministically by up to ``jitter`` so that integer x values do not
    stack) with the ``means`` drawn as a line with markers over it. Either may be empty, not both.

    Raises:
        ValueError: when there is nothing finite to draw.
    """
    dots, line = _finite(points), sorted(_finite(means))
    if not dots and not line:
        raise ValueError(f"scatter plot {title!r}: no finite points")
    ax = _axes_for(dots + line, width, height, y_from_zero=True)
    parts = _frame(ax, title, x_label, y_label)
    for i, (x, y) in enumerate(dots):
        offset = jitter * (((i * 0.618034) % 1.0) * 2 - 1)  # golden-ratio sequence: even spread, reproducible
        cx, cy = ax.px(x + offset, y)
        parts.append(f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{PALETTE[0]}" '
                     f'fill-opacity="0.45"/>')  # fmt: skip
    if line:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (ax.px(*p) for p in line))
        parts.append(f'<polyline class="mean" fill="none" stroke="{PALETTE[1]}" stroke-width="2" points="{path}"/>')
        for x, y in line:
            cx, cy = ax.px(x, y)
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{PALETTE[1]}"><title>{_fmt(x)}: '
                         f"{_fmt(y)}</title></circle>")  # fmt: skip
        parts.append(f'<text x="{width - _MARGIN_RIGHT - 6}" y="{_MARGIN_TOP + 14}" text-anchor="end" '
                     f'fill="{PALETTE[1]}">mean</text>')  # fmt: skip
    return _svg(ax, parts, title)


__all__ = ["PALETTE", "line_plot", "nice_ticks", "scatter_plot"]
