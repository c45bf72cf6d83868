"""LaVIT tokenizer encode speed: kept-rows-only merger vs the official dense merger over all N rows.

Measures images/s of the merger + quantiser part of ``DynamicTokenizer.tokenize`` (the frozen encoder's features are
computed once, outside the timing, since both forms share them) at the tiny preset and at a mid configuration
(D = 384, 6 heads, merger depth 4, N = 256, batch 16), in fp32 and bf16. The keep masks are fixed per batch with
a kept fraction of 1/3 (the training target), so both forms do exactly the same tokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.common import Report, Table, time_calls
from vlpretrain.lavit.merger import TokenMerger

NAME = "tokenizer"


@dataclass(frozen=True)
class Case:
    name: str
    dim: int
    heads: int
    depth: int
    patches: int
    batch: int


CASES = (Case("tiny preset", 128, 4, 2, 64, 64), Case("mid", 384, 6, 4, 256, 16))


def _inputs(case: Case, rho: float = 1 / 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, case.patches, case.dim, generator=g)
    keep = (torch.rand(case.batch, case.patches, generator=g) < rho).float()
    return x, keep


def _encoder(merger: TokenMerger, x: torch.Tensor, keep: torch.Tensor, dense: bool, dtype: str):
    """A no-argument call running the merger once in ``dtype`` (fp32, or bf16 autocast)."""

    @torch.no_grad()
    def call() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            merger(x, keep, dense=dense)

    return call


def run(quick: bool = False) -> Report:
    """Median images/s of each form, precision and case."""
    warmup, repeats = (1, 2) if quick else (2, 7)
    table = Table(
        f"token merger on kept rows vs dense (median of {repeats})",
        ["config", "dtype", "dense img/s", "kept img/s", "speed-up"],
        text_columns=2,
    )
    notes = []
    for case in CASES:
        torch.manual_seed(0)
        merger = TokenMerger(case.dim, case.depth, case.heads, 4 * case.dim).eval()
        x, keep = _inputs(case)
        for dtype in ("fp32", "bf16"):
            rates = {dense: case.batch / time_calls(_encoder(merger, x, keep, dense, dtype), warmup, repeats).median
                     for dense in (True, False)}  # fmt: skip
            table.add(
                case.name, dtype, f"{rates[True]:,.0f}", f"{rates[False]:,.0f}", f"{rates[False] / rates[True]:.2f}x"
            )
    notes.append(
        "Merger only (the part that differs), on random features with a fixed keep mask of density 1/3; the dense "
        "form is the official algorithm (all N rows, policy softmax), the kept form computes only kept rows with "
        "padding masks and scaled_dot_product_attention. Both give the same kept tokens (tests/test_lavit_merger.py)."
    )
    return Report(NAME, "LaVIT token merger (`tokenizer`)", table, notes)
