"""Shared pieces of the benchmarks: the machine line, a timer with warm-up and repeats, and the doc writer.

Each benchmark returns a :class:`Report`; :func:`publish` prints it as a rich table and rewrites only that
benchmark's section of ``docs/benchmarks.md``, the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table as RichTable

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DOC_INTRO = """# Benchmarks

Measured numbers of the engine on the machine named in each section. Run all of them with `make bench`
(`python -m benchmarks`), or one with `python -m benchmarks NAME` (`python -m benchmarks --list` names them).
Each run prints a table and rewrites only its own section below, between `<!-- bench:NAME -->` markers, with the
exact command, the machine and the date; `--quick` runs a smoke-test size and leaves this file alone.
"""


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls (warm-up calls excluded)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, before: Callable[[], None] | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Args:
        fn: the work to time.
        warmup: untimed calls first (caches, allocator, lazy initialisation).
        repeats: timed calls; report :attr:`Timing.median`.
        before: untimed preparation before every call (e.g. clearing an output folder).
    """
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    samples = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        if i >= warmup:
            samples.append(seconds)
    return Timing(samples)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the hardware and software the numbers were measured with."""
    parts = [f"{cpu_model()}, {cores()} cores", f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.insert(1, torch.cuda.get_device_name())
    parts.append(f"Python {platform.python_version()}, {platform.system()}")
    return "; ".join(parts)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average: other work on the machine slows every number here (-1 where unknown)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command() -> str:
    """The command line this process was started with, as a user would type it."""
    return " ".join(["python -m benchmarks", *sys.argv[1:]])


@dataclass
class Table:
    """A result table: the first ``text_columns`` columns are labels, the rest right-aligned numbers."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    text_columns: int = 1

    def add(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table '{self.title}': row has {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def to_rich(self) -> RichTable:
        table = RichTable(title=self.title)
        for i, name in enumerate(self.columns):
            table.add_column(name, justify="left" if i < self.text_columns else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def to_markdown(self) -> str:
        align = [":--" if i < self.text_columns else "--:" for i in range(len(self.columns))]
        lines = [self.columns, align, *self.rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


@dataclass
class Report:
    """What one benchmark measured: a heading, a table and notes (markdown) printed and written under it."""

    name: str
    heading: str
    table: Table
    notes: list[str] = field(default_factory=list)


@dataclass
class Conditions:
    """When a benchmark ran and how busy the machine was: other work on the cores slows every number."""

    started: str = field(default_factory=now)
    load_at_start: float = field(default_factory=load_average)
    load_at_end: float = -1.0

    def finish(self) -> None:
        self.load_at_end = load_average()

    @property
    def busy(self) -> bool:
        return max(self.load_at_start, self.load_at_end) >= 0.75 * cores()

    def describe(self) -> str:
        text = f"{self.started}; 1-minute load average {self.load_at_start:.1f} at start, {self.load_at_end:.1f} at end"
        if self.busy:
            text += f" (busy for {cores()} cores: these numbers understate the machine; rerun when it is idle)"
        return text


def to_markdown(report: Report, conditions: Conditions) -> str:
    """The doc section of ``report``: heading, command, machine, date and load, table, notes."""
    header = f"Command: `{command()}`  \nMachine: {machine()}  \nDate: {conditions.describe()}"
    notes = "\n".join(f"- {note}" for note in report.notes)
    return f"## {report.heading}\n\n{header}\n\n{report.table.to_markdown()}\n\n{notes}\n".rstrip() + "\n"


def update_section(name: str, body: str, path: Path = DOC) -> None:
    """Replace the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in ``path`` with ``body``.

    The file (with :data:`DOC_INTRO`) or the section (at the end) is created when missing; everything outside the
    section is left as it is.
    """
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else DOC_INTRO
    section = f"{start}\n{body.strip()}\n{end}"
    i, j = text.find(start), text.find(end)
    if i < 0 and j < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    elif i < 0 or j < i:
        raise ValueError(f"{path}: markers of section '{name}' are unpaired or out of order ({start} ... {end})")
    else:
        text = text[:i] + section + text[j + len(end) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(report: Report, conditions: Conditions, write_doc: bool) -> None:
    """Print ``report`` and, when ``write_doc``, rewrite its section of docs/benchmarks.md."""
    conditions.finish()
    console = Console()
    if not console.is_terminal:  # piped or logged: room for the whole table instead of rich's 80 columns
        console = Console(width=120)
    console.print(report.table.to_rich())
    for note in [*report.notes, f"Date: {conditions.describe()}"]:
        console.print(f"  {note}", markup=False, highlight=False)
    if write_doc:
        update_section(report.name, to_markdown(report, conditions))
        console.print(f"  updated section '{report.name}' of {DOC}", markup=False, highlight=False)
