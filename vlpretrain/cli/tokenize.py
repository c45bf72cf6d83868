"""`vlpretrain tokenize IMAGE... --checkpoint DIR [--visualize out.png]`: LaVIT visual token ids of images."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def tokenize(
    images: list[Path] = typer.Argument(..., help="Image files (any size or mode Pillow reads)."),
    checkpoint: Path = typer.Option(Path("runs/demo/tokenizer"), help="A lavit-tokenizer checkpoint or run folder."),
    visualize: Path | None = typer.Option(None, help="Write a PNG with each image's keep mask."),
    mode: str = typer.Option("deterministic", help="Keep decisions: deterministic (p_keep > 0.5) or sample."),
) -> None:
    """Print the visual token ids and count of each image as JSON."""
    from vlpretrain.errors import UserError
    from vlpretrain.lavit.api import Tokenizer, overlay_grid

    if mode not in ("deterministic", "sample"):
        raise UserError(f"--mode: '{mode}' is not 'deterministic' or 'sample'")
    for path in images:
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
    tok = Tokenizer.from_pretrained(checkpoint)
    tok.model.cfg.eval_keep = mode
    try:
        ids, masks = tok.encode_with_masks([str(p) for p in images])
    except ValueError as err:  # an image Pillow cannot use: name it
        raise UserError(str(err)) from err
    rows = [{"image": str(p), "tokens": len(s), "ids": s.tolist()} for p, s in zip(images, ids, strict=True)]
    print(json.dumps(rows))
    if visualize is not None:
        overlay_grid([str(p) for p in images], masks).save(visualize)
