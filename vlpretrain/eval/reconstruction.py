"""Reconstruction quality of the detokenizer on the shapes world, read by the judge.

``eval_reconstruction(detok, images, records, judge) -> {name: value}`` (:func:`reconstruct_images` then
:func:`score_reconstructions`): every image goes image -> tokens -> image; the judge reads the objects of the
original and of its reconstruction, and :func:`attribute_match` scores whether they agree on the object count and
the multisets of colours and shapes. ``agree_mean`` (the mean of the three) is the
issue's quality bar (>= 0.70 for the tiny preset). ``truth_*`` score the reconstruction against the ground truth of
the scene records, and ``judge_*`` the original against it (the judge's own ceiling).

:func:`run` is the whole evaluation from folders (checkpoint, shards, judge), writing a sample grid.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlpretrain.core.image import to_pil
from vlpretrain.data.judge import Judge, attribute_match, objects_from_record
from vlpretrain.lavit.detokenizer_api import Detokenizer, side_by_side
from vlpretrain.progress import progress_bar

ATTRIBUTES = ("count", "colors", "shapes")


def _as_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, S, S] in [0, 1] -> B uint8 [S, S, 3] arrays (the judge's and the data's image form)."""
    return [np.asarray(to_pil(x)) for x in images]


def reconstruct_images(
    detok: Detokenizer,
    images: Sequence[np.ndarray],
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """image -> tokens -> image for every image; returns (uint8 [S, S, 3] reconstructions, statistics).

    Statistics: ``tokens_mean``, ``images``, ``images_per_s`` and ``empty_sequences`` (images whose tokenizer kept
    no patch: there is nothing to decode, so a grey image stands in and is scored as a failure).
    """
    generator = torch.Generator().manual_seed(seed)
    side = detok.image_size
    blank = np.full((side, side, 3), 128, np.uint8)
    recon: list[np.ndarray] = []
    tokens = empty = 0
    start = time.perf_counter()
    with progress_bar("reconstruct", total=len(images), enabled=progress) as advance:
        for first in range(0, len(images), batch_size):
            ids = detok.encode(images[first : first + batch_size])
            tokens += sum(len(s) for s in ids)
            kept = [s for s in ids if len(s)]
            decoded = (
                detok.decode(kept, guidance_scale, steps, generator=generator, batch_size=batch_size) if kept else []
            )
            out = iter(_as_uint8(decoded))
            recon += [next(out) if len(s) else blank for s in ids]
            empty += len(ids) - len(kept)
            advance(len(ids))
    n = max(len(images), 1)
    stats = {"tokens_mean": tokens / n, "empty_sequences": float(empty), "images": float(len(images)),
             "images_per_s": len(images) / max(time.perf_counter() - start, 1e-9)}  # fmt: skip
    return recon, stats


def score_reconstructions(
    originals: Sequence[np.ndarray],
    reconstructions: Sequence[np.ndarray],
    records: Sequence[dict[str, Any]] | None,
    judge: Judge,
) -> dict[str, float]:
    """The judge's agreement between originals and reconstructions (see the module docstring for the keys)."""
    side = reconstructions[0].shape[0]
    originals = [np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC)) for im in originals]
    read_orig, read_rec = judge.read(originals), judge.read(list(reconstructions))
    totals: Counter[str] = Counter()
    for i, (orig, rec) in enumerate(zip(read_orig, read_rec, strict=True)):
        totals.update({f"agree_{k}": int(v) for k, v in attribute_match(rec, orig).items()})
        if records is not None:
            truth = objects_from_record(records[i])
            totals.update({f"truth_{k}": int(v) for k, v in attribute_match(rec, truth).items()})
            totals.update({f"judge_{k}": int(v) for k, v in attribute_match(orig, truth).items()})
    n = len(originals)
    metrics: dict[str, float] = {}
    for prefix in ("agree", "truth", "judge") if records is not None else ("agree",):
        metrics |= {f"{prefix}_{k}": totals[f"{prefix}_{k}"] / n for k in ATTRIBUTES}
        metrics[f"{prefix}_mean"] = sum(metrics[f"{prefix}_{k}"] for k in ATTRIBUTES) / len(ATTRIBUTES)
    return metrics


def eval_reconstruction(
    detok: Detokenizer,
    images: Sequence[np.ndarray],
    records: Sequence[dict[str, Any]] | None,
    judge: Judge,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """Attribute agreement between originals and their reconstructions, as read by the judge.

    Args:
        detok: the detokenizer (with its tokenizer).
        images: uint8 [H, W, 3] arrays (held-out shapes-world images).
        records: their scene records (``Scene.record()``) for the ``truth_*`` and ``judge_*`` scores; None = skip.
        judge: the shapes-world judge.
        steps, guidance_scale: sampling settings (None = the checkpoint's).
        seed: seed of the initial noise of the whole evaluation.
        batch_size: images per batch.
        progress: show a progress bar.

    Returns:
        ``agree_{count,colors,shapes,mean}`` (fraction of images where the judge reads the same from both), with
        records ``truth_*`` (reconstruction vs the record) and ``judge_*`` (original vs the record), and the
        statistics of :func:`reconstruct_images`.
    """
    if not len(images):
        raise ValueError("eval_reconstruction: no images")
    if records is not None and len(records) != len(images):
        raise ValueError(f"eval_reconstruction: {len(images)} images but {len(records)} records")
    recon, stats = reconstruct_images(detok, images, steps, guidance_scale, seed, batch_size, progress)
    return score_reconstructions(images, recon, records, judge) | stats


def pairs_grid(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], columns: int = 4) -> Image.Image:
    """original | reconstruction pairs in a grid (``columns`` pairs per row)."""
    tiles = [side_by_side(o, torch.from_numpy(r.copy()).permute(2, 0, 1).float() / 255.0)
             for o, r in zip(originals, reconstructions, strict=True)]  # fmt: skip
    w, h = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + 8), rows * (h + 8)), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (w + 8), (i // columns) * (h + 8)))
    return sheet


def run(
    checkpoint: str | Path,
    data: str | Path,
    judge_dir: str | Path,
    limit: int = 200,
    steps: int | None = None,
    guidance_scale: float | None = None,
    grid: str | Path | None = None,
    bf16: bool = True,
) -> dict[str, float]:
    """The evaluation from folders: a detokenizer checkpoint, held-out shards (e.g. ``runs/demo/data/test``) and a
    saved judge; writes a grid of the first 16 pairs to ``grid`` when given."""
    from vlpretrain.data.judge import load_judge
    from vlpretrain.data.shards import read_records

    detok = Detokenizer.from_pretrained(checkpoint, bf16=bf16)
    images, records = read_records(str(data), limit=limit)
    recon, stats = reconstruct_images(detok, images, steps, guidance_scale, progress=True)
    if grid is not None:
        pairs_grid(images[:16], recon[:16]).save(grid)
    return score_reconstructions(images, recon, records, load_judge(judge_dir)) | stats


__all__ = ["eval_reconstruction", "pairs_grid", "reconstruct_images", "run", "score_reconstructions"]
