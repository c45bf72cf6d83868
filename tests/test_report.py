"""The demo report on a fake run folder (nothing trained): every section, inlined images, SVG plots, notes for
missing pieces; and the page rendered by headless Chromium when it is installed."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlpretrain.report import SECTIONS, write_report
from vlpretrain.report_svg import line_plot, nice_ticks, scatter_plot

SECTION_IDS = ["metrics", "complexity", "keep-masks", "samples", "reconstructions", "text-to-image", "training", "data"]
TEST_IMAGES = 12


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (4, 4, size[0] // 2, size[1] // 2))  # not a single colour
    image.save(path)


def _json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo run folder as the stages leave it, without judge and encoder stages and without a detokenizer log;
    the tokenizer is a random-weight checkpoint, the test split a real (small) shapes-world shard."""
    from vlpretrain.data.synth_write import write_shapes_world
    from vlpretrain.data.synthetic import SynthConfig
    from vlpretrain.lavit.tokenizer import TokenizerConfig
    from vlpretrain.lavit.tokenizer_task import LavitTokenizerTask
    from vlpretrain.train.pretrained import save_task

    run = tmp_path_factory.mktemp("run")
    fields = dict(num_train=4, num_val=4, num_test=TEST_IMAGES, docs_train=1, docs_val=1, docs_test=1)
    write_shapes_world(SynthConfig(**fields), run / "data", workers=1, progress=False)
    _png(run / "data" / "grid.png", (256, 128), (10, 120, 200))
    _json(run / "data" / "done.json", {"images": {"train": 4, "test": TEST_IMAGES}, "seconds": 0.5})
    torch.manual_seed(0)
    cfg = TokenizerConfig(codebook_size=64)
    save_task(LavitTokenizerTask(cfg), "lavit-tokenizer", cfg, run / "tokenizer")
    _json(run / "tokenizer" / "done.json", {"tokens_mean": 21.5, "rec_cos": 0.9, "spearman_objects_tokens": 0.61,
                                            "tokens_at_1_objects": 12.0, "tokens_at_3_objects": 30.0})  # fmt: skip
    _jsonl(run / "tokenizer" / "metrics.jsonl", [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 21)])
    _png(run / "detokenizer" / "reconstructions.png", (528, 72), (200, 30, 30))
    _json(run / "detokenizer" / "done.json", {"agree_mean": 0.7})
    lm = run / "lm"
    _json(lm / "done.json", {"caption_attr_f1": 0.85, "vqa_accuracy": 0.75, "t2i_prompt_match": float("nan")})
    _jsonl(lm / "metrics.jsonl", [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5, "val_loss": float("nan")},
                                  {"step": 20, "val_loss": 2.7}, {"step": 30, "loss": 2.0}])  # fmt: skip
    _json(lm / "eval" / "samples.json", {
        "captions": [{"truth": "a red circle <b>", "generated": "a red square"}, {"truth": "two", "generated": "two"}],
        "answers": [{"image": 1, "question": "what colour?", "answer": "Red.", "truth": "red"}],
        "prompts": ["prompt zero", "prompt one", "prompt two"],
    })  # fmt: skip
    _png(lm / "eval" / "t2i.png", (128, 64), (0, 160, 60))  # two 64-px drawings: the third prompt is not shown
    return run


def _section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, f"section {section_id} missing"
    return match.group(1)


def test_report_has_every_section_with_inlined_images_and_plots(fake_run: Path, tmp_path: Path) -> None:
    path = write_report(fake_run, out=tmp_path / "report.html")
    html = path.read_text()
    assert [sid for sid, _, _ in SECTIONS] == SECTION_IDS
    assert re.findall(r'<section id="([\w-]+)">', html) == SECTION_IDS
    assert "<script" not in html and "<link" not in html and "http://" not in html.replace('"http://www.w3.org', "")
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    for src in sources:  # every inlined image decodes
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for sid in ("keep-masks", "reconstructions", "text-to-image", "data"):
        assert "data:image/png;base64," in _section(html, sid) and "not available" not in _section(html, sid)

    complexity = _section(html, "complexity")
    assert complexity.count('class="point"') == TEST_IMAGES and 'class="mean"' in complexity and "0.61" in complexity
    training = _section(html, "training")
    assert training.count("<svg") == 2 and "tokenizer loss" in training and "lm loss" in training
    assert "val_loss" in training  # the finite val_loss record makes its own series
    assert "not available: no training log" in training and "detokenizer/metrics.jsonl" in training

    samples = _section(html, "samples")
    assert "a red circle &lt;b&gt;" in samples and "a red square" in samples and "what colour?" in samples
    assert samples.count('class="thumb"') == 3 and "✓" in samples  # "Red." matches "red" after normalisation
    t2i = _section(html, "text-to-image")
    assert "prompt one" in t2i and "prompt two" not in t2i

    metrics = _section(html, "metrics")
    assert "caption_attr_f1" in metrics and "0.85" in metrics and "nan" in metrics
    assert "not available: stage &#x27;judge&#x27; has not run" in metrics and "encoder" in metrics


def test_report_of_an_empty_run_folder_is_all_notes(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    html = write_report(tmp_path / "run").read_text()
    assert (tmp_path / "run" / "report.html").is_file()
    for sid in SECTION_IDS:
        assert "not available:" in _section(html, sid), sid
    assert "<img" not in html and "the tokenizer stage has not finished" in _section(html, "keep-masks")
    with pytest.raises(FileNotFoundError, match="missing"):
        write_report(tmp_path / "missing")


def test_complexity_falls_back_to_the_tokenizer_metrics(tmp_path: Path) -> None:
    _json(tmp_path / "tokenizer" / "done.json", {"tokens_at_1_objects": 10.0, "tokens_at_2_objects": 14.0})
    complexity = _section(write_report(tmp_path).read_text(), "complexity")
    assert "<svg" in complexity and 'class="point"' not in complexity and complexity.count("<circle") == 2
    assert "not available: per-image scatter" in complexity


def test_svg_helpers() -> None:
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3, 47) == [10, 20, 30, 40]
    svg = line_plot({"loss": [(1, 2.0), (2, float("inf")), (3, 1.0)]}, "t", "step", "loss")
    assert svg.startswith("<svg") and svg.count(",") - svg.count("translate(") == 2  # two finite points
    with pytest.raises(ValueError, match="no finite points"):
        line_plot({"loss": [(1, float("nan"))]}, "empty", "x", "y")
    assert scatter_plot([(1, 5.0), (1, 7.0)], [(1, 6.0)], "s", "x", "y").count('class="point"') == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH: `make report-deps` (root, Debian) installs it")
def test_report_renders_in_headless_chromium(fake_run: Path, tmp_path: Path) -> None:
    report = write_report(fake_run, out=tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000",
               report.resolve().as_uri()]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, "the screenshot is (nearly) a single colour"
    counts = {colour: n for n, colour in colours}
    for colour in ((200, 30, 30), (0, 160, 60)):  # the inlined reconstruction and text-to-image PNGs were drawn
        assert counts.get(colour, 0) > 1000, f"no rendered image of colour {colour} in the screenshot"
