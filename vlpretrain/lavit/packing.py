"""Packing variable-length samples into fixed-length rows, with document masking.

Samples are placed by first-fit decreasing into rows of ``row_len`` tokens. Packed samples must not see each other:
every sample's position ids restart at 0, and HF LLaMA (transformers >= 4.47, here 5.23) turns position ids that
restart inside a row into a block-diagonal causal mask when no 2-D attention mask is given
(``masking_utils.find_packed_sequence_indices``), so one ``position_ids`` tensor gives both the per-sample rotary
positions and the document mask. The padding at the end of a row is its own pseudo-document (positions 0, 1, ...)
with no targets. ``tests/test_lavit_lm_packing.py`` checks that a packed row gives the logits of the samples run one
by one.

Shape letters: R rows, L row length, S continuous visual slots in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlpretrain.lavit.sequences import VISUAL_SLOT, Sample

IGNORE = -100
KIND_CODES = {"pad": 0, "understand": 1, "generate": 2, "text": 3}


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to at most ``capacity`` (every length must be <= capacity).

    Longest first, each into the first bin with room: at most 11/9 of the optimal number of bins (+ 1).
    """
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be in 1..{capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(i)
        room[target] -= lengths[i]
    return bins


def pack_samples(samples: Sequence[Sample], row_len: int, pad_id: int) -> dict[str, Any]:
    """Pack samples into rows of ``row_len`` tokens (longer samples are cut to ``row_len``).

    Returns:
        ``input_ids`` [R, L] (``pad_id`` at slots and padding), ``labels`` [R, L] (the token id where it is a
        target, else :data:`IGNORE`; unshifted: position t is predicted from t - 1), ``position_ids`` [R, L],
        ``kinds`` [R, L] (:data:`KIND_CODES` of the token's sample), ``slot_row``/``slot_col`` [S] (where the
        continuous visual tokens go) with ``slot_image``/``slot_rank`` [S] (which image's k-th merged token), and
        the counts ``tokens`` (non-padding), ``truncated`` (samples cut).
    """
    cut = [s if len(s) <= row_len else s.truncated(row_len) for s in samples]
    bins = first_fit_decreasing([len(s) for s in cut], row_len)
    rows = max(len(bins), 1)
    input_ids = torch.full((rows, row_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, row_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((rows, row_len), dtype=torch.long)
    kinds = torch.zeros((rows, row_len), dtype=torch.long)
    slots: list[tuple[int, int, int, int]] = []  # (row, col, image, rank)
    for r, members in enumerate(bins):
        col = 0
        for i in sorted(members):  # in batch order inside a row: rows are reproducible and easy to read
            s = cut[i]
            n = len(s)
            ids = torch.tensor(s.ids, dtype=torch.long)
            is_slot = ids == VISUAL_SLOT
            input_ids[r, col : col + n] = torch.where(is_slot, pad_id, ids)
            labels[r, col : col + n] = torch.where(torch.tensor(s.targets), ids, IGNORE)
            positions[r, col : col + n] = torch.arange(n)
            kinds[r, col : col + n] = KIND_CODES[s.kind]
            slots += [(r, col + int(c), s.image, k) for k, c in enumerate(is_slot.nonzero().flatten().tolist())]
            col += n
        positions[r, col:] = torch.arange(row_len - col)
    slot_t = torch.tensor(slots, dtype=torch.long).reshape(-1, 4)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "kinds": kinds,
        "slot_row": slot_t[:, 0],
        "slot_col": slot_t[:, 1],
        "slot_image": slot_t[:, 2],
        "slot_rank": slot_t[:, 3],
        "tokens": sum(len(s) for s in cut),
        "truncated": sum(len(s) > row_len for s in samples),
    }


def padding_waste(packed: dict[str, Any]) -> float:
    """Fraction of the packed rows' positions that hold padding."""
    capacity = packed["input_ids"].numel()
    return 1.0 - packed["tokens"] / max(capacity, 1)
