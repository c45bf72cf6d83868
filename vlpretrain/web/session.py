"""The models behind the web UI: which folders a ``--checkpoint`` names, and one loaded pipeline for all requests.

``--checkpoint`` is either a run folder of stage folders (``vlpretrain demo`` writes ``lm/``, ``tokenizer/`` and
``detokenizer/`` side by side) or a ``lavit-lm`` folder, whose config records its tokenizer and detokenizer. A stage
folder without a finished checkpoint is left out (no detokenizer: generation shows visual tokens only).

Loading never raises: a missing or unusable checkpoint becomes :attr:`Session.error`, shown in the page, and every
request tries again, so a page opened before ``make demo`` finished starts working once the folders are there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlpretrain.errors import UserError

if TYPE_CHECKING:
    from vlpretrain.lavit.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPaths:
    """The folders to load: the unified LM, and its tokenizer / detokenizer (None: the ones its config records)."""

    lm: Path
    tokenizer: Path | None = None
    detokenizer: Path | None = None


def _has_checkpoint(folder: Path) -> bool:
    from vlpretrain.train.pretrained import resolve_checkpoint

    try:
        resolve_checkpoint(folder)
    except UserError:
        return False
    return True


def resolve_paths(checkpoint: str | Path) -> CheckpointPaths:
    """The folders behind ``checkpoint`` (a run folder with stage folders, or a ``lavit-lm`` folder).

    Raises:
        UserError: the folder does not exist, or its ``lm`` stage has no checkpoint yet.
    """
    root = Path(checkpoint)
    if not root.is_dir():
        raise UserError(f"checkpoint {root}: no such folder (build one with `make demo`, then pass --checkpoint)")
    if not (root / "lm").is_dir():
        return CheckpointPaths(root)
    if not _has_checkpoint(root / "lm"):
        raise UserError(f"checkpoint {root}: {root / 'lm'} holds no trained model yet (is the demo still running?)")
    stage = {name: root / name if _has_checkpoint(root / name) else None for name in ("tokenizer", "detokenizer")}
    return CheckpointPaths(root / "lm", stage["tokenizer"], stage["detokenizer"])


def _load_error_types() -> tuple[type[BaseException], ...]:
    from vlpretrain.configs import ConfigError
    from vlpretrain.data.errors import DataError

    return (UserError, ConfigError, DataError, OSError, ValueError, KeyError)


class Session:
    """The pipeline every request shares; the queue serves one request at a time, so it needs no lock.

    Args:
        checkpoint: a run folder or a ``lavit-lm`` folder (see the module docstring).
        device: where the models run.
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.error: str | None = None
        self.loads = 0  # successful loads: stays 1 however many requests are served
        self._pipeline: Pipeline | None = None

    def load(self) -> bool:
        """Load the models (once); on failure keep the reason in :attr:`error` and return False."""
        if self._pipeline is not None:
            return True
        try:
            paths = resolve_paths(self.checkpoint)
            from vlpretrain.lavit.pipeline import Pipeline  # torch and friends: only once there is something to load

            self._pipeline = Pipeline.from_pretrained(paths.lm, paths.tokenizer, paths.detokenizer, self.device)
        except _load_error_types() as err:
            self.error = str(err)
            log.warning("vlpretrain serve: no model loaded: %s", err)
            return False
        self.error, self.loads = None, self.loads + 1
        return True

    @property
    def pipeline(self) -> Pipeline:
        """The loaded pipeline (loading it now if an earlier try failed).

        Raises:
            UserError: it still cannot be loaded; the message says why.
        """
        if not self.load():
            raise UserError(f"no model loaded: {self.error}")
        assert self._pipeline is not None
        return self._pipeline

    @property
    def default_steps(self) -> int:
        """The detokenizer's own number of DDIM steps (25 when none is loaded)."""
        pipe = self._pipeline
        return pipe.detokenizer.model.cfg.sample_steps if pipe is not None and pipe.detokenizer is not None else 25

    def status(self) -> str:
        """One line of Markdown for the top of the page: what is loaded, or why nothing is (it does not load)."""
        pipe = self._pipeline
        if pipe is None:
            return f"**No model loaded.** {self.error or 'Nothing was loaded yet.'}"
        tok = pipe.images.model
        detok = pipe.detokenizer
        drawing = (f"detokenizer: {detok.image_size}px images in {detok.model.cfg.sample_steps} DDIM steps"
                   if detok is not None else "no detokenizer: generation shows visual tokens only")  # fmt: skip
        return (f"Loaded `{self.checkpoint}` on {self.device}: tokenizer {tok.num_patches} patches of a "
                f"{tok.encoder.image_size}px image, codebook {tok.cfg.codebook_size}; {drawing}.")  # fmt: skip


__all__ = ["CheckpointPaths", "Session", "resolve_paths"]
