"""Data errors and the skip counter the readers share.

Readers never crash on one bad sample: they skip it and count it by reason (``truncated_shard``,
``missing_caption``, ``corrupt_image``, ...), keeping the first few reports so that a user can find the culprit.
In strict mode the first problem raises a :class:`DataError` instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from vlpretrain.errors import UserError

MAX_REPORTS = 5


class DataError(UserError):
    """A data file is wrong: unreadable, truncated, malformed, or a sample in it is.

    Args:
        message: what is wrong; names the shard or file, the key or line, and the reason.
        reason: a short machine-readable category (``"missing_caption"``), used by skip counters.
        located: the message already names source and key (a strict :class:`SkipCounter` report), so callers
            re-raise it rather than wrap it.
    """

    def __init__(self, message: str, reason: str | None = None, located: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.located = located

    def __reduce__(self):  # keep the attributes across process boundaries (DataLoader workers)
        return (type(self), (str(self), self.reason, self.located))


def format_report(source: str, key: str, reason: str, detail: str = "", label: str = "shard") -> str:
    """One line naming a skipped sample: ``"shard=..., key=..., reason=..."`` plus an optional detail."""
    line = f"{label}={source}, key={key}, reason={reason}"
    return f"{line} ({detail})" if detail else line


class SkipCounter:
    """Counts skipped samples by reason and keeps the first reports.

    Besides running totals it keeps the *pending* counts and reports since the last :meth:`drain`, so that a
    worker can ship deltas along with each batch.

    Args:
        strict: raise a :class:`DataError` on the first problem instead of counting it.
        label: what a source is called in reports (``"shard"`` for tar shards, ``"file"`` for documents).
        max_reports: how many report lines to keep.
    """

    def __init__(self, strict: bool = False, label: str = "shard", max_reports: int = MAX_REPORTS) -> None:
        self.strict = strict
        self.label = label
        self.max_reports = max_reports
        self.counts: Counter[str] = Counter()
        self.reports: list[str] = []
        self._pending: Counter[str] = Counter()
        self._pending_reports: list[str] = []

    def skip(self, reason: str, source: str, key: str, detail: str = "") -> None:
        """Record one skipped sample (or raise in strict mode).

        Args:
            reason: short category, e.g. ``"corrupt_image"``.
            source: the shard URL or file the sample came from.
            key: the sample key, line or row (``"-"`` when the whole source is at fault).
            detail: optional free text (the underlying exception message).

        Raises:
            DataError: in strict mode, naming source, key and reason.
        """
        report = format_report(source, key, reason, detail, self.label)
        if self.strict:
            raise DataError(report, reason=reason, located=True)
        self.counts[reason] += 1
        self._pending[reason] += 1
        if len(self.reports) < self.max_reports:
            self.reports.append(report)
            self._pending_reports.append(report)

    @property
    def pending(self) -> bool:
        """Whether anything was recorded since the previous drain."""
        return bool(self._pending)

    def drain(self) -> tuple[dict[str, int], list[str]]:
        """Counts and reports recorded since the previous drain; resets them (totals are kept)."""
        delta, reports = dict(self._pending), list(self._pending_reports)
        self._pending.clear()
        self._pending_reports.clear()
        return delta, reports

    def update(self, counts: Mapping[str, int], reports: Iterable[str] = ()) -> None:
        """Add counts and reports collected elsewhere (another worker) to the totals."""
        self.counts.update({k: int(v) for k, v in counts.items() if v})
        for report in reports:
            if len(self.reports) >= self.max_reports:
                break
            self.reports.append(report)

    @property
    def total(self) -> int:
        """Number of skipped samples over all reasons."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """A few lines: total, counts by reason, the first reports."""
        if not self.counts:
            return "skipped: none"
        by_reason = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        lines = [f"skipped {self.total}: {by_reason}"] + [f"  {r}" for r in self.reports]
        return "\n".join(lines)
