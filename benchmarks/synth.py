"""Writing the shapes world: images/s and MB/s of ``write_shapes_world`` (render, PNG encode, tar shards).

Requirement: at least 1000 images/s at 64 px with 2 workers on a 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Report, Table, time_calls
from vlpretrain.data.synth_write import write_shapes_world
from vlpretrain.data.synthetic import SynthConfig

NAME = "synth"
REQUIRED_IMAGES_PER_S = 1000.0
EVAL_IMAGES = 16  # per val and test split: the splits exist, but the train split is what is measured


@dataclass(frozen=True)
class Case:
    image_size: int
    workers: int
    train_images: int


CASES = (Case(64, 1, 4000), Case(64, 2, 4000), Case(128, 2, 2000), Case(224, 2, 1000))


def _config(case: Case, scale: float) -> SynthConfig:
    return SynthConfig(
        image_size=case.image_size,
        num_train=max(int(case.train_images * scale), 64),
        num_val=EVAL_IMAGES,
        num_test=EVAL_IMAGES,
        docs_train=0,
        docs_val=0,
        docs_test=0,
    )


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the pool's workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(quick: bool = False) -> Report:
    """Time each case (median of repeats after one warm-up run) into a temporary folder."""
    warmup, repeats, scale = (0, 1, 0.125) if quick else (1, 3, 1.0)
    table = Table(
        f"shapes world: write pair shards (median of {repeats})",
        ["image px", "workers", "images", "s", "images/s", "MB/s", "KB/image", "CPU ms/image"],
        text_columns=0,
    )
    rates: dict[Case, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        out = Path(tmp) / "world"
        for case in CASES:
            cfg = _config(case, scale)
            images = sum(cfg.count(split) for split in ("train", "val", "test"))
            cpu: list[float] = []

            def write(cfg: SynthConfig = cfg, workers: int = case.workers, cpu: list[float] = cpu) -> None:
                start = _cpu_seconds()
                write_shapes_world(cfg, out, workers=workers, progress=False)
                cpu.append(_cpu_seconds() - start)

            timing = time_calls(write, warmup, repeats, before=lambda: shutil.rmtree(out, ignore_errors=True))
            cpu_ms = 1e3 * statistics.median(cpu[warmup:]) / images
            size = _folder_bytes(out)
            rates[case] = images / timing.median
            table.add(
                str(case.image_size),
                str(case.workers),
                str(images),
                f"{timing.median:.2f}",
                f"{rates[case]:,.0f}",
                f"{size / 1e6 / timing.median:.1f}",
                f"{size / 1e3 / images:.1f}",
                f"{cpu_ms:.2f}",
            )
    target = rates[CASES[1]]
    verdict = "met" if target >= REQUIRED_IMAGES_PER_S else "NOT met"
    notes = [
        f"Requirement >= {REQUIRED_IMAGES_PER_S:,.0f} images/s at 64 px with 2 workers: {verdict} ({target:,.0f}).",
        "Each run renders the images, encodes them as PNG and writes img2dataset tar shards (png, caption txt, "
        f"json record) for train plus {EVAL_IMAGES} val and {EVAL_IMAGES} test images, no interleaved documents, "
        "into a temporary folder (the OS page cache; no fsync). MB/s counts the bytes written.",
        "CPU ms/image sums user and system time of the writer and its worker processes: unlike images/s it barely "
        "moves when other work shares the cores, and 1000 x cores / (CPU ms/image) bounds images/s on idle cores.",
    ]
    return Report(NAME, "Shapes-world writing (`synth`)", table, notes)
