"""Progress bars for long work (data generation, training, evaluation), built on rich.

One helper so every command looks the same; it prints nothing when disabled (non-zero ranks, ``--quiet``, tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_progress(extra: str = "") -> Progress:
    """A rich Progress with bar, count, elapsed time and ETA; ``extra`` is a format string of task fields."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if extra:
        columns.append(TextColumn(extra))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, transient=False)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Context manager yielding ``advance(n)``; a no-op bar when ``enabled`` is False."""
    if not enabled:
        yield lambda n=1: None
        return
    with make_progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
