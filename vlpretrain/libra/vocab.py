"""Libra's id layout: text ids, then per codebook stream the visual codes, ``<boi>`` and ``<eoi>``.

An input sequence carries C streams of ids [C, B, L] (C = 2 codebooks officially). Text positions hold the same text
id in every stream; an image position holds, in stream c, ``T + code_c`` (T = the LM's text vocabulary, 32000 for
LLaMA), and ``<boi>`` = T + K, ``<eoi>`` = T + K + 1 in every stream (K = 512 codes per codebook, so 32512 and 32513
officially). A position is an image position iff its id is >= T; ``<boi>`` and ``<eoi>`` are image positions.
Each stream's vision head predicts K + 2 classes (the codes, ``<boi>``, ``<eoi>``): class = id - T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VisualVocab:
    """Sizes of the id space.

    Args:
        text_size: T, rows of the LM's text embedding.
        codebook_size: K, codes per codebook (2 ** bits).
        num_codebooks: C, id streams.
    """

    text_size: int
    codebook_size: int
    num_codebooks: int

    @property
    def boi(self) -> int:
        """Id of ``<boi>`` (T + K)."""
        return self.text_size + self.codebook_size

    @property
    def eoi(self) -> int:
        """Id of ``<eoi>`` (T + K + 1)."""
        return self.text_size + self.codebook_size + 1

    @property
    def head_size(self) -> int:
        """Classes of one vision head: K codes + ``<boi>`` + ``<eoi>``."""
        return self.codebook_size + 2

    def is_visual(self, ids: Tensor) -> Tensor:
        """Boolean mask of image positions (ids >= T), same shape as ``ids``."""
        return ids >= self.text_size

    def image_ids(self, codes_BCN: Tensor) -> Tensor:
        """Ids of whole images ``<boi> codes <eoi>``: codes [B, C, N] -> [C, B, N + 2]."""
        if codes_BCN.ndim != 3 or codes_BCN.shape[1] != self.num_codebooks:
            raise ValueError(f"image_ids: expected codes [B, {self.num_codebooks}, N], got {tuple(codes_BCN.shape)}")
        if codes_BCN.numel() and (codes_BCN.min() < 0 or codes_BCN.max() >= self.codebook_size):
            raise ValueError(f"image_ids: codes must be in [0, {self.codebook_size})")
        ids_CBN = codes_BCN.transpose(0, 1) + self.text_size
        boi = torch.full_like(ids_CBN[..., :1], self.boi)
        eoi = torch.full_like(ids_CBN[..., :1], self.eoi)
        return torch.cat([boi, ids_CBN, eoi], dim=-1)

    def codes_of(self, ids_CBL: Tensor) -> Tensor:
        """Inverse of :meth:`image_ids` at code positions: ids -> code (or class for ``<boi>``/``<eoi>``)."""
        return ids_CBL - self.text_size


__all__ = ["VisualVocab"]
