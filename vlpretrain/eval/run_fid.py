"""Text-to-image FID of LaVIT's unified LM on a captions benchmark: draw one image per caption, compare the drawings
with the real images (:func:`vlpretrain.eval.fid.fid`).

Shape letters: B images in a batch, S the side of the drawings.

- **Prompts**: the first reference caption of each image of a ``coco`` / ``karpathy`` annotation file, in file order
  (the images found as in :mod:`vlpretrain.eval.run_captioning`). LaVIT's published FID draws 30k captions of COCO
  val2014 at random; pass such a file (or ``limit``) to get close to that protocol.
- **Drawings**: LM -> visual codes -> detokenizer pixels [B, 3, S, S]. Prompt ``i`` samples its codes from seed
  ``seed + i``; the detokenizer's noise of a batch is seeded by ``seed`` + the index of the batch's first prompt. The
  result is fixed for a given seed and batch size.
- **Real images**: decoded and resized (bicubic) to S x S, as the tokenizer resizes its input.
- **Features**: Inception v3 (``fid``, the published metric) when ``inception_weights`` names torch-fidelity's
  weights file; otherwise the LM's own frozen tokenizer ViT (``fid_lavit_tokenizer_vit``, with ``fid_note``
  saying it is **not comparable to published FID**).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from vlpretrain.core.image import as_pil, resize, to_pil, to_tensor
from vlpretrain.errors import UserError
from vlpretrain.eval.captioning import CaptionFormat, load_references
from vlpretrain.eval.fid import NOT_COMPARABLE, fid
from vlpretrain.eval.run_captioning import find_benchmark_images
from vlpretrain.eval.run_common import write_json
from vlpretrain.progress import progress_bar

if TYPE_CHECKING:
    from vlpretrain.lavit.generate import SamplingConfig
    from vlpretrain.lavit.pipeline import Pipeline

EXTRACTOR_NAME = "lavit tokenizer vit"  # key fid_lavit_tokenizer_vit
SHOWN = 16  # real | drawn pairs in the sample grid


def _real_batches(paths: list[Path], side: int, batch_size: int, advance: Callable[[int], None],
                  shown: list[Tensor]) -> Iterator[Tensor]:  # fmt: skip
    """Real images [B, 3, S, S] in [0, 1]; the first :data:`SHOWN` are kept in ``shown``."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images_B3SS = torch.stack([to_tensor(resize(as_pil(p), side)) for p in chunk])
        shown += list(images_B3SS[: max(0, SHOWN - len(shown))])
        advance(len(chunk))
        yield images_B3SS


def _drawn_batches(pipe: Pipeline, prompts: list[str], sampling: SamplingConfig | None, seed: int, steps: int | None,
                   batch_size: int, advance: Callable[[int], None], rows: list[dict[str, Any]],
                   shown: list[Tensor]) -> Iterator[Tensor]:  # fmt: skip
    """Drawings [B, 3, S, S] in [0, 1], one per prompt; appends ``{"seed", "tokens"}`` per prompt to ``rows``."""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        try:
            out = pipe.generate(chunk, sampling=sampling, seed=seed + start, batch_size=len(chunk), decoder_steps=steps)
        except ValueError as err:  # a prompt past the context, a drawing without visual tokens
            raise UserError(str(err)) from err
        assert out.images is not None  # the caller checked that a detokenizer is loaded
        rows += [{"seed": seed + start + i, "tokens": len(codes)} for i, codes in enumerate(out.codes)]
        shown += list(out.images[: max(0, SHOWN - len(shown))])
        advance(len(chunk))
        yield out.images.float()


def run(
    pipe: Pipeline,
    annotations: str | Path,
    images: str | Path,
    format: CaptionFormat = "auto",
    split: str = "test",
    limit: int | None = None,
    inception_weights: str | Path | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 16,
    allow_missing: bool = False,
    predictions_path: str | Path | None = None,
    grid_path: str | Path | None = None,
    progress: bool = False,
) -> dict[str, float | str]:
    """The Fréchet distance between the benchmark's images and the LM's drawings of their captions.

    Args:
        pipe: a LaVIT LM pipeline with a detokenizer.
        annotations, images, format, split, limit, allow_missing: as :func:`vlpretrain.eval.run_captioning.run`.
        inception_weights: torch-fidelity's Inception file; None = the tokenizer's ViT (not comparable).
        sampling: LM sampling settings (None = LaVIT's defaults); ``steps``: detokenizer DDIM steps (None = its own).
        seed: see the module docstring; ``batch_size``: prompts per batch.
        predictions_path: where to write ``[{"image_id", "caption", "seed", "tokens"}]``; None = not written.
        grid_path: where to write a PNG of the first 16 real | drawn pairs; None = not written.
        progress: show a progress bar (real images, then drawings).

    Returns:
        ``fid`` or ``fid_lavit_tokenizer_vit`` (+ ``fid_note``), ``real_images``, ``fake_images``, ``tokens_mean``
        (visual tokens per drawing) and ``missing_images``.
    """
    if pipe.detokenizer is None:
        raise UserError("text-to-image FID needs a detokenizer: pass --detokenizer DIR (the LM records none)")
    references = load_references(annotations, format, split)
    found, skipped = find_benchmark_images(annotations, images, format, split, limit, allow_missing)
    prompts = [references[str(im.image_id)][0] for im, _ in found]
    extractor = None if inception_weights is not None else pipe.images.model.encoder
    rows: list[dict[str, Any]] = []
    real_shown: list[Tensor] = []
    drawn_shown: list[Tensor] = []
    with progress_bar("fid: real, then drawn", total=2 * len(found), enabled=progress) as advance:
        real = _real_batches([p for _, p in found], pipe.detokenizer.image_size, batch_size, advance, real_shown)
        drawn = _drawn_batches(pipe, prompts, sampling, seed, steps, batch_size, advance, rows, drawn_shown)
        try:
            metrics: dict[str, float | str] = dict(fid(real, drawn, extractor, EXTRACTOR_NAME, inception_weights))
        except ValueError as err:  # fewer than 2 images per set
            raise UserError(f"{annotations}: {err}") from err
    if extractor is not None:
        metrics["fid_note"] = NOT_COMPARABLE.format(name="the LM's frozen tokenizer ViT")
    rows = [{"image_id": im.image_id, "caption": text} | row for (im, _), text, row in zip(found, prompts, rows,
                                                                                           strict=True)]  # fmt: skip
    write_json(predictions_path, rows)
    if grid_path is not None:
        _write_grid(real_shown, drawn_shown, Path(grid_path))
    tokens = sum(r["tokens"] for r in rows) / len(rows)
    return metrics | {"tokens_mean": tokens, "missing_images": float(skipped)}


def _write_grid(real: list[Tensor], drawn: list[Tensor], path: Path) -> None:
    from vlpretrain.eval.reconstruction import pairs_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    pairs_grid([np.asarray(to_pil(x)) for x in real], [np.asarray(to_pil(x)) for x in drawn]).save(path)


__all__ = ["EXTRACTOR_NAME", "run"]
