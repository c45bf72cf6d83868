"""Rank-0 logging for training: ``metrics.jsonl``, optional TensorBoard, and a live progress bar.

Every other rank gets the same object with everything switched off, so the loop never branches on rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vlpretrain.errors import UserError
from vlpretrain.progress import make_progress


def print0(*args: Any, is_main: bool = True) -> None:
    """print on rank 0 only."""
    if is_main:
        print(*args, flush=True)


class MetricsLogger:
    """Append metric records to ``out_dir/metrics.jsonl`` (and TensorBoard) and drive the progress bar.

    Args:
        out_dir: the run folder.
        total_steps: the run length, for the bar and ETA.
        enabled: False on non-zero ranks.
        progress: show the bar.
        tensorboard: also write TensorBoard events under ``out_dir/tensorboard``.
        resume_step: drop records beyond this step (written after the checkpoint a resume starts from).
    """

    def __init__(self, out_dir: Path, total_steps: int, enabled: bool, progress: bool, tensorboard: bool,
                 resume_step: int = 0) -> None:  # fmt: skip
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._bar = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise UserError("log.tensorboard: needs the 'tensorboard' package (pip install tensorboard)") from err
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if progress:
            self._bar = make_progress("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[speed]}")
            self._bar.start()
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=resume_step, loss="-", lr="-", speed=""
            )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Write one record (``step`` added) to the log and TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def update_bar(self, step: int, loss: float | None, lr: float, speed: str) -> None:
        """Move the bar to ``step`` with the latest loss, learning rate and throughput."""
        if self._bar is not None:
            shown = "-" if loss is None else f"{loss:.4f}"
            self._bar.update(self._task, completed=step, loss=shown, lr=f"{lr:.2e}", speed=speed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()
