"""`vlpretrain reconstruct IMAGE... --checkpoint DIR --out DIR`: image -> LaVIT tokens -> image, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def reconstruct(
    images: list[Path] = typer.Argument(..., help="Image files (any size or mode Pillow reads)."),
    checkpoint: Path = typer.Option(Path("runs/demo/detokenizer"), help="A lavit-detokenizer checkpoint or run."),
    out: Path = typer.Option(..., help="Output folder: one original|reconstruction PNG per image + tokens.json."),
    tokenizer: Path | None = typer.Option(None, help="The paired lavit-tokenizer folder (default: the recorded one)."),
    steps: int | None = typer.Option(None, min=1, help="DDIM steps (default: the checkpoint's)."),
    guidance: float | None = typer.Option(None, min=0.0, help="Classifier-free guidance scale (1 = off)."),
    seed: int = typer.Option(0, help="Seed of the initial noise (the same seed gives the same images)."),
    batch_size: int = typer.Option(16, min=1, help="Images per sampling batch."),
    bf16: bool = typer.Option(False, "--bf16", help="Run the UNet under bf16 autocast (faster on CPUs)."),
) -> None:
    """Redraw images from their visual tokens; writes OUT/<name>.png (original | reconstruction) and tokens.json."""
    from vlpretrain.errors import UserError
    from vlpretrain.lavit.detokenizer_api import Detokenizer, side_by_side

    for path in images:
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
    if not checkpoint.exists():
        raise UserError(f"--checkpoint: {checkpoint}: no such folder")
    detok = Detokenizer.from_pretrained(checkpoint, tokenizer=tokenizer, bf16=bf16)
    try:
        ids = detok.encode([str(p) for p in images])
    except ValueError as err:  # an image Pillow cannot use: name it
        raise UserError(str(err)) from err
    for path, seq in zip(images, ids, strict=True):
        if len(seq) == 0:
            raise UserError(f"{path}: the tokenizer kept no patch of this image, so there is nothing to decode")
    recon = detok.decode(ids, guidance_scale=guidance, steps=steps, seed=seed, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    rows, used = [], set()
    for i, (path, seq, image) in enumerate(zip(images, ids, recon, strict=True)):
        name = path.stem if path.stem not in used else f"{path.stem}_{i}"
        used.add(name)
        side_by_side(str(path), image).save(out / f"{name}.png")
        rows.append({"image": str(path), "tokens": len(seq), "output": f"{name}.png"})
    (out / "tokens.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows))
