"""One training step of ``text-lm`` through the real engine: step time, tokens/s and MFU, in fp32 and bf16.

A run is built exactly as ``vlpretrain train`` builds it (:func:`vlpretrain.train.loop.setup` on a small shapes-world
data set); batches are fetched before timing, so the numbers cover forward, backward, clipping and the AdamW update
(:func:`vlpretrain.train.loop.train_step`) and not data loading. Tokens are the step's loss targets (caption tokens,
padding excluded); MFU = ``task.flops_per_target()`` x tokens/s / the measured matmul peak of the same dtype.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks.common import Report, Table, Timing, time_calls
from vlpretrain.data.synth_write import write_shapes_world
from vlpretrain.data.synthetic import SynthConfig
from vlpretrain.train.config import DataConfig, LogConfig, TrainConfig
from vlpretrain.train.distributed import init_distributed
from vlpretrain.train.flops import measure_peak_flops
from vlpretrain.train.loop import Run, setup, train_step

NAME = "train_step"
MID_MODEL = {
    "llm": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8},
    "max_len": 128,
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """A model to time: a ``text-lm`` preset plus overrides, its batch size and how many steps to time."""

    name: str
    preset: str
    batch_size: int
    warmup: int
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)


CASES = (
    Case("tiny", "tiny", batch_size=32, warmup=5, steps=20),
    Case("small", "small", batch_size=32, warmup=2, steps=8),
    Case("mid", "tiny", batch_size=16, warmup=1, steps=4, overrides=MID_MODEL),
)


def _write_data(root: Path) -> Path:
    cfg = SynthConfig(num_train=512, num_val=8, num_test=8, docs_train=0, docs_val=0, docs_test=0, shard_size=256)
    write_shapes_world(cfg, root, workers=1, progress=False)
    return root / "train"


def _build(case: Case, precision: Literal["fp32", "bf16"], data: Path, out: Path, steps: int) -> Run:
    cfg = TrainConfig(
        task="text-lm",
        model_preset=case.preset,
        model=case.overrides,
        data=DataConfig(train=str(data), batch_size=case.batch_size),
        precision=precision,
        steps=steps,
        log=LogConfig(progress=False, peak_tflops=1.0),  # the peak is measured once here, not per run
        out_dir=str(out),
    )
    return setup(cfg, init_distributed(), resume=False)


@dataclass
class Measurement:
    """What one (case, precision) run measured."""

    case: Case
    precision: Literal["fp32", "bf16"]
    params: int
    rows: int
    seq: int
    targets_per_step: float
    flops_per_target: float
    timing: Timing

    def row(self, peak: float) -> list[str]:
        """The table row, with MFU against ``peak`` FLOP/s."""
        tok_per_s = self.targets_per_step / self.timing.median
        fill = self.targets_per_step / (self.rows * (self.seq - 1))
        return [
            self.case.name,
            self.precision,
            f"{self.params / 1e6:.2f}M",
            f"{self.rows} x {self.seq}",
            f"{100 * fill:.0f}%",
            f"{1e3 * self.timing.median:,.0f}",
            f"{1e3 * self.timing.min:,.0f}-{1e3 * self.timing.max:,.0f}",
            f"{tok_per_s:,.0f}",
            f"{100 * self.flops_per_target * tok_per_s / peak:.2f}",
        ]


def _measure(case: Case, precision: Literal["fp32", "bf16"], data: Path, out: Path, quick: bool) -> Measurement:
    """Time ``case`` in ``precision``: warm-up steps, then timed steps on batches fetched beforehand."""
    warmup, steps = (1, 2) if quick else (case.warmup, case.steps)
    run = _build(case, precision, data, out, warmup + steps)
    stream = iter(run.stream)
    batches = [next(stream) for _ in range(warmup + steps)]
    feed = iter(batches)
    timing = time_calls(lambda: train_step(run, [next(feed)]), warmup=warmup, repeats=steps)
    rows, seq = batches[0]["input_ids"].shape  # (B, T)
    return Measurement(
        case,
        precision,
        params=sum(p.numel() for p in run.task.parameters()),
        rows=rows,
        seq=seq,
        targets_per_step=statistics.mean(run.task.num_targets(b) for b in batches[warmup:]),
        flops_per_target=run.task.flops_per_target(),
        timing=timing,
    )


def _peaks(device: str) -> dict[str, float]:
    """Matmul FLOP/s per dtype, measured now (``measure_peak_flops`` caches its answer; clear it first)."""
    measure_peak_flops.cache_clear()
    return {name: measure_peak_flops(dtype, device) for name, dtype in DTYPES.items()}


def run(quick: bool = False) -> Report:
    """Time every case in fp32 and bf16; the matmul peaks are measured before and after, and the best kept."""
    device = init_distributed().device.type
    peaks_before = _peaks(device)
    measurements = []
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        data = _write_data(Path(tmp) / "data")
        for case in CASES:
            for precision in DTYPES:
                measurements.append(_measure(case, precision, data, Path(tmp) / f"{case.name}-{precision}", quick))
                gc.collect()  # free the last run's model and optimizer before building the next
    peaks = {name: max(value, peaks_before[name]) for name, value in _peaks(device).items()}  # load only lowers it
    table = Table(
        "text-lm train step (median after warm-up)",
        ["model", "dtype", "params", "batch x seq", "fill", "step ms", "min-max ms", "tok/s", "MFU %"],
        text_columns=2,
    )
    for m in measurements:
        table.add(*m.row(peaks[m.precision]))
    steps = "1 warm-up + 2 timed" if quick else ", ".join(f"{c.name} {c.warmup} + {c.steps}" for c in CASES)
    notes = [
        "Matmul peak (`measure_peak_flops`: 1024 x 1024, best of 5, the better of before and after the runs): "
        + ", ".join(f"{name} {value / 1e12:.3f} TFLOP/s" for name, value in peaks.items())
        + "; MFU divides by the peak of the row's dtype.",
        f"Steps (warm-up + timed): {steps}. 'min-max ms' are the fastest and slowest timed steps.",
        "tok/s counts loss targets (caption tokens, no padding); 'fill' is their share of the B x (T - 1) "
        "positions the model computes, so MFU counts useful work only.",
        "mid = the tiny preset with llm hidden 512, intermediate 1376, 4 layers, 8 heads, max_len 128.",
    ]
    return Report(NAME, "text-lm training step (`train_step`)", table, notes)
