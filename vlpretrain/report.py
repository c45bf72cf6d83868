"""The demo's HTML report: one self-contained page (``report.html``) built from a demo run folder.

Sections (HTML ids): ``metrics`` (a table per stage), ``complexity`` (token count against object count on the test
split), ``keep-masks`` (which patches the tokenizer keeps), ``samples`` (captions and VQA answers next to the ground
truth), ``reconstructions`` and ``text-to-image`` (the detokenizer's and the LM's pictures), ``training`` (loss
curves) and ``data`` (a sample grid). Images are inlined as base64 PNG data URIs and plots as inline SVG, so the page
can be mailed or archived alone. A missing piece (a stage not run yet, a file absent) shows a visible
"not available: <reason>" note in its section instead of failing the report.

>>> write_report("runs/demo")                      # -> runs/demo/report.html
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

from vlpretrain.report_svg import line_plot, scatter_plot

# the demo stages that run the shared training loop
TRAINING_STAGES = ("tokenizer", "detokenizer", "lm_understand", "lm")


class NotAvailable(Exception):
    """A report section cannot be filled; the message says why (shown on the page)."""


@dataclass
class TestTokens:
    """The demo tokenizer's output on the first test images: object counts, token counts, keep masks [B, N]."""

    images: list[Any]
    objects: list[int]
    tokens: list[int]
    masks: Any


@dataclass
class RunView:
    """What the report reads from a run folder, loaded on demand (the tokenisation is done at most once)."""

    run_dir: Path
    limit: int = 200
    _tokens: TestTokens | NotAvailable | None = field(default=None, repr=False)

    def stage_metrics(self) -> dict[str, dict[str, Any]]:
        """Each finished stage's numbers: its ``done.json`` (fresher than ``metrics.json``, which the demo writes
        after its last stage), else the entry of ``metrics.json``."""
        top = self.run_dir / "metrics.json"
        metrics: dict[str, Any] = json.loads(top.read_text()) if top.is_file() else {}
        for done in sorted(self.run_dir.glob("*/done.json")):
            metrics[done.parent.name] = json.loads(done.read_text())
        return metrics

    def test_tokens(self) -> TestTokens:
        """Tokenise up to ``limit`` test images with the run's tokenizer (cached; raises :class:`NotAvailable`)."""
        if self._tokens is None:
            try:
                self._tokens = _tokenize_test(self.run_dir, self.limit)
            except NotAvailable as missing:
                self._tokens = missing
        if isinstance(self._tokens, NotAvailable):
            raise self._tokens
        return self._tokens


def _tokenize_test(run_dir: Path, limit: int) -> TestTokens:
    import torch

    from vlpretrain.data.shards import read_records
    from vlpretrain.lavit.api import Tokenizer

    tokenizer_dir, test_dir = run_dir / "tokenizer", run_dir / "data" / "test"
    if not (tokenizer_dir / "done.json").is_file():
        raise NotAvailable(f"the tokenizer stage has not finished (no {tokenizer_dir / 'done.json'})")
    if not any(test_dir.glob("*.tar")):
        raise NotAvailable(f"no test shards in {test_dir}")
    images, records = read_records(str(test_dir), limit=limit)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    with torch.inference_mode():
        ids, masks = tokenizer.encode_with_masks(images)
    objects = [len(r.get("objects", [])) for r in records]
    return TestTokens(images, objects, [len(s) for s in ids], masks)


def data_uri(image: Image.Image | str | Path) -> str:
    """A ``data:image/png;base64,...`` URI of a PIL image or an image file (re-encoded as PNG)."""
    pil = image if isinstance(image, Image.Image) else Image.open(image)
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Image.Image | str | Path, alt: str, css: str = "figure") -> str:
    return f'<img class="{css}" alt="{escape(alt)}" src="{data_uri(image)}">'


def _file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise NotAvailable(f"{what} not found ({path})")
    return path


def _value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return escape(str(value))


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        rows += _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]
    return rows


def note(reason: str) -> str:
    """The visible placeholder of a missing piece."""
    return f'<p class="na">not available: {escape(reason)}</p>'


def _stage_names() -> list[str]:
    from vlpretrain.demo import STAGES

    return [s.name for s in STAGES if s.name != "report"]


def metrics_section(view: RunView) -> str:
    """A key/value table per demo stage; stages without results get a note."""
    metrics = view.stage_metrics()
    names = _stage_names()
    parts = []
    for stage in names + [s for s in metrics if s not in names and s != "report"]:
        parts.append(f"<h3>{escape(stage)}</h3>")
        if stage not in metrics:
            parts.append(note(f"stage '{stage}' has not run (no {view.run_dir / stage / 'done.json'})"))
            continue
        rows = "".join(f"<tr><td>{escape(k)}</td><td>{_value(v)}</td></tr>" for k, v in _flatten(metrics[stage]))
        parts.append(f'<table class="metrics"><tr><th>metric</th><th>value</th></tr>{rows}</table>')
    return "\n".join(parts)


def complexity_section(view: RunView) -> str:
    """Token count against object count: per-image scatter from a fresh tokenisation, means per object count
    (falling back to the tokenizer stage's ``tokens_at_K_objects`` when the tokenizer cannot be run)."""
    stats = view.stage_metrics().get("tokenizer", {})
    head = ""
    if "spearman_objects_tokens" in stats:
        head = f"<p>Spearman correlation of object and token counts: {_value(stats['spearman_objects_tokens'])}</p>"
    try:
        tok = view.test_tokens()
    except NotAvailable as missing:
        means = [(float(k.split("_")[2]), v) for k, v in stats.items() if k.startswith("tokens_at_")]
        if not means:
            raise NotAvailable(f"{missing}; no tokens_at_K_objects in the tokenizer metrics either") from None
        plot = scatter_plot([], means, "Tokens per image vs objects (means)", "objects in the image", "tokens")
        return head + plot + note(f"per-image scatter: {missing}")
    by_count: dict[int, list[int]] = {}
    for k, n in zip(tok.objects, tok.tokens, strict=True):
        by_count.setdefault(k, []).append(n)
    means = [(float(k), sum(v) / len(v)) for k, v in sorted(by_count.items())]
    points = [(float(k), float(n)) for k, n in zip(tok.objects, tok.tokens, strict=True)]
    title = f"Tokens per image vs objects ({len(points)} test images)"
    rows = "".join(f"<tr><td>{int(k)}</td><td>{len(by_count[int(k)])}</td><td>{m:.2f}</td></tr>" for k, m in means)
    table = f'<table class="metrics"><tr><th>objects</th><th>images</th><th>mean tokens</th></tr>{rows}</table>'
    return head + scatter_plot(points, means, title, "objects in the image", "tokens") + table


def keep_masks_section(view: RunView, count: int = 16) -> str:
    """Keep-mask overlays (dropped patches darkened, kept ones outlined) of the first test images."""
    from vlpretrain.lavit.api import overlay_grid

    tok = view.test_tokens()
    n = min(count, len(tok.images))
    sheet = overlay_grid(tok.images[:n], tok.masks[:n], columns=8)
    caption = "<p>Kept patches outlined in yellow, dropped patches darkened; the count is the image's tokens.</p>"
    return caption + _img(sheet, "keep-mask overlays of test images")


def _thumbnails(view: RunView, count: int) -> list[Any]:
    from vlpretrain.data.shards import read_records

    test_dir = view.run_dir / "data" / "test"
    return read_records(str(test_dir), limit=count)[0] if any(test_dir.glob("*.tar")) else []


def samples_section(view: RunView) -> str:
    """Captions and VQA answers of the LM next to the ground truth, with the test image they belong to (the
    evaluation reads the test split in order, so the k-th caption is of the k-th test image)."""
    samples = json.loads(_file(view.run_dir / "lm" / "eval" / "samples.json", "LM samples").read_text())
    captions, answers = samples.get("captions", []), samples.get("answers", [])
    needed = max([len(captions)] + [a.get("image", 0) + 1 for a in answers])
    thumbs = _thumbnails(view, needed)

    def thumb(i: int) -> str:
        return _img(Image.fromarray(thumbs[i]), f"test image {i}", "thumb") if i < len(thumbs) else "(no image)"

    parts = ["<h3>Captions</h3>"] if captions else [note("samples.json holds no captions")]
    if captions:
        rows = "".join(f"<tr><td>{thumb(i)}</td><td>{escape(str(c.get('truth')))}</td>"
                       f"<td>{escape(str(c.get('generated')))}</td></tr>" for i, c in enumerate(captions))  # fmt: skip
        parts.append(f'<table class="samples"><tr><th>image</th><th>ground truth</th><th>generated</th></tr>{rows}'
                     "</table>")  # fmt: skip
    parts.append("<h3>Visual question answering</h3>" if answers else note("samples.json holds no VQA answers"))
    if answers:
        rows = "".join(
            f"<tr><td>{thumb(a.get('image', 0))}</td><td>{escape(str(a.get('question')))}</td>"
            f"<td>{escape(str(a.get('truth')))}</td><td>{escape(str(a.get('answer')))}</td>"
            f"<td>{'✓' if _same_answer(a) else '✗'}</td></tr>"
            for a in answers
        )
        parts.append('<table class="samples"><tr><th>image</th><th>question</th><th>ground truth</th>'
                     f"<th>prediction</th><th></th></tr>{rows}</table>")  # fmt: skip
    if not thumbs:
        parts.append(note(f"thumbnails: no test shards in {view.run_dir / 'data' / 'test'}"))
    return "\n".join(parts)


def _same_answer(row: dict[str, Any]) -> bool:
    from vlpretrain.eval.lm_quality import normalize_answer

    return normalize_answer(str(row.get("answer", ""))) == normalize_answer(str(row.get("truth", "")))


def reconstructions_section(view: RunView) -> str:
    """The detokenizer's grid of test images: original | reconstruction pairs."""
    grid = _file(view.run_dir / "detokenizer" / "reconstructions.png", "the detokenizer's reconstruction grid")
    return "<p>Pairs of test images: original (left) | redrawn from its visual tokens (right).</p>" + _img(
        grid, "original and reconstructed test images"
    )


def text_to_image_section(view: RunView) -> str:
    """The LM's drawings of test captions, with the prompts in grid order when ``samples.json`` has them."""
    eval_dir = view.run_dir / "lm" / "eval"
    grid = _file(eval_dir / "t2i.png", "the text-to-image grid")
    prompts: list[str] = []
    if (eval_dir / "samples.json").is_file():
        prompts = [p for p in json.loads((eval_dir / "samples.json").read_text()).get("prompts", []) if p]
    thumbs = _thumbnails(view, 1)
    if thumbs:  # tiles are drawn at the test images' size: list only the prompts the grid shows
        side = thumbs[0].shape[0]
        with Image.open(grid) as im:
            prompts = prompts[: (im.width // side) * (im.height // side)]
    listing = "".join(f"<li>{escape(p)}</li>" for p in prompts)
    text = f"<ol>{listing}</ol>" if prompts else note("prompts: samples.json lists none")
    intro = ("<p>Images drawn from test captions (row by row, 8 per row; each the best of the evaluation's drawings "
             "of its caption, <code>t2i_single_*</code> above scores the first drawing alone); the prompts in the "
             "same order:</p>")  # fmt: skip
    return intro + _img(grid, "images generated from test captions") + text


def _loss_series(log: Path) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run still writing its log: the last line may be cut short
                break
            raise ValueError(f"{log}: line {i + 1} is not JSON") from None
        for key, value in record.items():
            if key.endswith("loss") and isinstance(value, int | float) and "step" in record:
                series.setdefault(key, []).append((float(record["step"]), float(value)))
    return series


def training_section(view: RunView) -> str:
    """Loss curves (train ``loss``, ``val_loss`` and any other ``*loss``) of every stage with a ``metrics.jsonl``."""
    logs = {p.parent.name: p for p in sorted(view.run_dir.glob("*/metrics.jsonl"))}
    parts = []
    for stage in list(TRAINING_STAGES) + [s for s in logs if s not in TRAINING_STAGES]:
        if stage not in logs:
            parts.append(f"<h3>{escape(stage)}</h3>" + note(f"no training log ({view.run_dir / stage}/metrics.jsonl)"))
            continue
        series = _loss_series(logs[stage])
        if not any(math.isfinite(y) for points in series.values() for _, y in points):
            parts.append(f"<h3>{escape(stage)}</h3>" + note(f"{logs[stage]} holds no finite loss values"))
            continue
        parts.append(f'<div class="plot">{line_plot(series, f"{stage} loss", "step", "loss")}</div>')
    return "\n".join(parts)


def data_section(view: RunView) -> str:
    """The sample grid of the training data (written by the data stage's inspection)."""
    return _img(_file(view.run_dir / "data" / "grid.png", "the data sample grid"), "training data samples")


SECTIONS: list[tuple[str, str, Callable[[RunView], str]]] = [
    ("metrics", "Metrics", metrics_section),
    ("complexity", "Token count against image complexity", complexity_section),
    ("keep-masks", "Keep masks", keep_masks_section),
    ("samples", "Caption and VQA samples", samples_section),
    ("reconstructions", "Reconstructions", reconstructions_section),
    ("text-to-image", "Text to image", text_to_image_section),
    ("training", "Training curves", training_section),
    ("data", "Data", data_section),
]

_CSS = """
body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; padding: 0 1em; color: #222; }
nav a { margin-right: 1em; } section { border-top: 1px solid #ccc; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: middle; }
table.metrics { display: inline-table; margin-right: 1.5em; vertical-align: top; }
img.figure { max-width: 100%; image-rendering: pixelated; } img.thumb { width: 64px; image-rendering: pixelated; }
div.plot { display: inline-block; margin: 0 1em 1em 0; } .na { color: #a33; font-style: italic; }
"""


def _render(section_id: str, title: str, build: Callable[[RunView], str], view: RunView) -> str:
    try:
        body = build(view)
    except NotAvailable as missing:
        body = note(str(missing))
    except Exception as err:  # noqa: BLE001 - a broken piece must not cost the rest of the report; shown on the page
        body = note(f"{section_id} failed: {type(err).__name__}: {err}")
    return f'<section id="{section_id}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def write_report(run_dir: str | Path, out: str | Path | None = None, limit: int = 200) -> Path:
    """Write the demo report of ``run_dir`` to ``out`` (default ``run_dir/report.html``); returns its path.

    Args:
        run_dir: a demo run folder (``vlpretrain demo --out``), finished or not.
        out: where to write the page.
        limit: test images tokenised for the complexity plot (the first 16 also give the keep masks).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"demo run folder not found: {run_dir}")
    view = RunView(run_dir, limit)
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in SECTIONS)
    body = "\n".join(_render(sid, title, build, view) for sid, title, build in SECTIONS)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>vlpretrain demo report</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>vlpretrain demo report</h1>\n"
        f"<p>Run folder: <code>{escape(str(run_dir.resolve()))}</code></p>\n"
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )
    path = Path(out) if out is not None else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


__all__ = ["NotAvailable", "RunView", "SECTIONS", "TestTokens", "data_uri", "note", "write_report"]
