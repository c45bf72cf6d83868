"""`vlpretrain caption`, `ask` and `generate`: LaVIT's unified LM on images and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import typer

checkpoint_option = typer.Option(Path("runs/demo/lm"), help="A lavit-lm checkpoint, run or converted folder.")
tokenizer_option = typer.Option(None, help="Its lavit-tokenizer folder (default: the one its config records).")


def _pipeline(checkpoint: Path, tokenizer: Path | None, detokenizer: Path | None = None):
    from vlpretrain.errors import UserError
    from vlpretrain.lavit.pipeline import Pipeline

    if not checkpoint.exists():
        raise UserError(f"--checkpoint: {checkpoint}: no such folder")
    return Pipeline.from_pretrained(checkpoint, tokenizer=tokenizer, detokenizer=detokenizer)


def _check_images(images: list[Path]) -> None:
    for path in images:
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")


def _run(fn, *args, **kwargs):
    """Call ``fn``; a ValueError (an image Pillow cannot decode, a prompt past the context) becomes one line."""
    from vlpretrain.errors import UserError

    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise UserError(str(err)) from err


def caption(
    images: list[Path] = typer.Argument(..., help="Image files (any size or mode Pillow reads)."),
    checkpoint: Path = checkpoint_option,
    tokenizer: Path | None = tokenizer_option,
    beams: int = typer.Option(2, min=1, help="Beam width."),
    min_new_tokens: int = typer.Option(8, min=0, help="Fewest new tokens."),
    max_new_tokens: int = typer.Option(36, min=1, help="Most new tokens."),
    batch_size: int = typer.Option(16, min=1, help="Images per batch."),
) -> None:
    """Print a caption for each image (JSON: [{"image", "caption"}])."""
    _check_images(images)
    pipe = _pipeline(checkpoint, tokenizer)
    texts = _run(pipe.caption, [str(p) for p in images], batch_size, beams, min_new_tokens, max_new_tokens)
    print(json.dumps([{"image": str(p), "caption": t} for p, t in zip(images, texts, strict=True)]))


def ask(
    image: Path = typer.Argument(..., help="An image file."),
    question: str = typer.Argument(..., help='The question, e.g. "what color is the circle?".'),
    checkpoint: Path = checkpoint_option,
    tokenizer: Path | None = tokenizer_option,
    beams: int = typer.Option(5, min=1, help="Beam width."),
    max_new_tokens: int = typer.Option(10, min=1, help="Most new tokens."),
) -> None:
    """Answer a question about an image (the official prompt "Question: {q} Answer:")."""
    from vlpretrain.errors import UserError

    _check_images([image])
    if not question.strip():
        raise UserError("the question is empty")
    pipe = _pipeline(checkpoint, tokenizer)
    print(_run(pipe.ask, [str(image)], [question], num_beams=beams, max_new_tokens=max_new_tokens)[0])


def generate(
    prompt: str = typer.Argument(..., help='What to draw, e.g. "one object: a large red circle in the center.".'),
    out: Path = typer.Option(..., help="Output folder: image_<i>.png per image (with a detokenizer) + tokens.json."),
    image: Path | None = typer.Option(None, help="An image to put before the text (a multimodal prompt)."),
    seed: int = typer.Option(0, help="Seed (the same seed gives the same tokens and images)."),
    num: int = typer.Option(1, min=1, help="Images to draw (image i uses seed + i)."),
    checkpoint: Path = checkpoint_option,
    tokenizer: Path | None = tokenizer_option,
    detokenizer: Path | None = typer.Option(None, help="A lavit-detokenizer folder (default: the recorded one)."),
    guidance: float | None = typer.Option(None, min=0.0, help="LM guidance (default 4.0; 5.0 with --image)."),
    top_k: int = typer.Option(50, min=0, help="Top-k (0 = off)."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Top-p."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature."),
    min_tokens: int | None = typer.Option(None, min=0, help="Fewest visual tokens (default: 20 per 256 patches)."),
    max_tokens: int | None = typer.Option(None, min=1, help="Most visual tokens (default: 200 per 256 patches)."),
    steps: int | None = typer.Option(None, min=1, help="Detokenizer DDIM steps (default: its own)."),
    candidates: int = typer.Option(
        1, min=1, help="Drawings per image; the one the LM scores highest as a caption of it is kept (needs pixels)."
    ),
) -> None:
    """Draw images from a prompt: visual tokens from the LM, then pixels from the detokenizer."""
    from vlpretrain.core.image import to_pil
    from vlpretrain.errors import UserError
    from vlpretrain.lavit.generate import SamplingConfig

    if not prompt.strip():
        raise UserError("the prompt is empty")
    if image is not None:
        _check_images([image])
    pipe = _pipeline(checkpoint, tokenizer, detokenizer)
    default = 5.0 if image is not None else 4.0
    sampling = _run(SamplingConfig, top_k, top_p, temperature, default if guidance is None else guidance, min_tokens,
                    max_tokens)  # fmt: skip
    images = [str(image) if image is not None else None] * num
    if candidates > 1 and pipe.detokenizer is None:
        raise UserError("--candidates: choosing among drawings needs a detokenizer (pass --detokenizer DIR)")
    result = _run(pipe.generate, [prompt] * num, images, sampling, seed, decoder_steps=steps, candidates=candidates)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, codes in enumerate(result.codes):
        row = {"prompt": prompt, "image": str(image) if image else None, "seed": seed + i, "tokens": len(codes),
               "codes": codes.tolist()}  # fmt: skip
        if result.images is not None:
            to_pil(result.images[i]).save(out / f"image_{i}.png")
            row["output"] = f"image_{i}.png"
        if result.scores is not None:
            row["caption_logprob"] = round(float(result.scores[i]), 4)
        rows.append(row)
    (out / "tokens.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "codes"} for r in rows]))
    if result.images is None:
        typer.echo("no detokenizer configured: wrote the visual tokens only (pass --detokenizer DIR)", err=True)


def eval_lm(
    checkpoint: Path = checkpoint_option,
    data: Path = typer.Option(Path("runs/demo/data"), help="A shapes-world folder (split folders of shards)."),
    split: str = typer.Option("test", help="Split folder under --data."),
    judge: Path | None = typer.Option(Path("runs/demo/judge"), help="The shapes-world judge (text-to-image)."),
    detokenizer: Path | None = typer.Option(None, help="A lavit-detokenizer folder (default: the recorded one)."),
    limit: int = typer.Option(200, min=1, help="Images for captioning and VQA."),
    t2i_limit: int = typer.Option(200, min=1, help="Captions drawn for the text-to-image score."),
    seed: int = typer.Option(0, help="Seed of the drawings."),
    guidance: float = typer.Option(1.5, min=0.0, help="LM guidance of the drawings (the official evaluation's)."),
    top_k: int = typer.Option(300, min=0, help="Top-k of the drawings (the official evaluation's; 0 = off)."),
    candidates: int = typer.Option(4, min=1, help="Drawings per caption; the LM's best caption score is kept."),
    out: Path | None = typer.Option(None, help="Folder for metrics.json, samples.json, t2i.png (default: CHECKPOINT)."),
) -> None:
    """Caption attribute F1, VQA accuracy and text-to-image judge agreement on held-out shapes-world images.

    Text-to-image follows the official evaluation (guidance 1.5, top-k 300, best of 4 drawings); with more than one
    candidate the first drawing alone is scored too (t2i_single_*)."""
    from vlpretrain.eval.lm_quality import run
    from vlpretrain.lavit.generate import SamplingConfig

    if judge is not None and not judge.exists():
        judge = None
    sampling = _run(SamplingConfig, top_k=top_k, guidance_scale=guidance)
    metrics = _run(run, checkpoint, data / split, judge, detokenizer, limit, t2i_limit, seed,
                   out if out is not None else checkpoint, sampling, candidates)  # fmt: skip
    print(json.dumps(metrics, indent=2))
