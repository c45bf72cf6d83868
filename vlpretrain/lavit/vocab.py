"""The unified LM's vocabulary: the text vocabulary, then ``[IMG]``, ``[/IMG]`` and one id per visual code.

With the official LLaMA text vocabulary (32000 ids) this gives LaVIT's ids: 0-31999 text, 32000 ``[IMG]``, 32001
``[/IMG]``, 32002-48385 the 16384 codes (``id = code + 32002``), 48386 rows in all. Any other text vocabulary of T
ids keeps the same layout relative to T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VisualVocab:
    """Ids of the image markers and the visual codes after a text vocabulary of ``text_size`` ids.

    Args:
        text_size: T, the number of text ids (ids 0..T-1).
        codebook_size: K, the number of visual codes.
    """

    text_size: int
    codebook_size: int

    def __post_init__(self) -> None:
        if self.text_size < 1 or self.codebook_size < 1:
            raise ValueError(f"vocabulary sizes must be >= 1, got text {self.text_size}, codes {self.codebook_size}")

    @property
    def img_start(self) -> int:
        """Id of ``[IMG]`` (T)."""
        return self.text_size

    @property
    def img_end(self) -> int:
        """Id of ``[/IMG]`` (T + 1)."""
        return self.text_size + 1

    @property
    def code_offset(self) -> int:
        """Id of visual code 0 (T + 2)."""
        return self.text_size + 2

    @property
    def size(self) -> int:
        """Rows of the extended embedding tables: T + 2 + K."""
        return self.text_size + 2 + self.codebook_size

    def code_ids(self, codes: Tensor) -> Tensor:
        """Visual codes (0..K-1) -> LM ids."""
        return codes.long() + self.code_offset

    def codes(self, ids: Tensor) -> Tensor:
        """LM ids of visual codes -> codes (0..K-1); ids outside the visual range raise ValueError."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if len(ids) and (int(ids.min()) < self.code_offset or int(ids.max()) >= self.size):
            raise ValueError(f"ids must be visual codes in [{self.code_offset}, {self.size})")
        return ids - self.code_offset

    def visual_ids(self) -> list[int]:
        """``[IMG]``, ``[/IMG]`` and every code id: what captions and answers must never contain."""
        return list(range(self.text_size, self.size))

    def is_visual(self, ids: Tensor) -> Tensor:
        """Mask of ids that are ``[IMG]``, ``[/IMG]`` or codes (same shape as ``ids``)."""
        return ids >= self.text_size
