"""`vlpretrain libra ...`: Libra's text tokenizer folder, captions, answers and the shapes-world evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Libra: captions, answers, evaluation and the demo's text tokenizer.", no_args_is_help=True)


@app.callback()
def _libra() -> None:
    """Libra: captions, answers, evaluation and the demo's text tokenizer."""


@app.command("text-tokenizer")
def text_tokenizer(
    out_dir: Path = typer.Argument(..., help="Folder to write (tokenizer.json + tokenizer_config.json)."),
    spec: str = typer.Option("shapes-world-libra", help="The built-in tokenizer, or a local tokenizer folder."),
) -> None:
    """Write the text tokenizer the demo's text LM and Libra share (words + Vicuna template + newline)."""
    from vlpretrain.libra.text import save_text_tokenizer

    print(save_text_tokenizer(spec, out_dir))


@app.command("caption")
def caption(
    images: list[Path] = typer.Argument(..., help="Image files."),
    checkpoint: Path = typer.Option(..., help="A libra-pretrain or libra-instruct run or checkpoint folder."),
    max_new_tokens: int = typer.Option(64, min=1, help="Longest caption in tokens."),
) -> None:
    """Caption images; prints [{"image", "caption"}] as JSON."""
    from vlpretrain.libra.pipeline import LibraPipeline

    _check_files(images)
    pipe = LibraPipeline.from_pretrained(checkpoint)
    texts = pipe.caption([str(p) for p in images], max_new_tokens=max_new_tokens)
    print(json.dumps([{"image": str(p), "caption": t} for p, t in zip(images, texts, strict=True)], indent=2))


@app.command("ask")
def ask(
    image: Path = typer.Argument(..., help="An image file."),
    question: str = typer.Argument(..., help="The question."),
    checkpoint: Path = typer.Option(..., help="A libra-instruct run or checkpoint folder."),
    max_new_tokens: int = typer.Option(8, min=1, help="Longest answer in tokens."),
) -> None:
    """Answer a question about an image (Vicuna-v1 prompt); prints the answer."""
    from vlpretrain.errors import UserError
    from vlpretrain.libra.pipeline import LibraPipeline

    _check_files([image])
    if not question.strip():
        raise UserError("question: empty")
    pipe = LibraPipeline.from_pretrained(checkpoint)
    print(pipe.ask([str(image)], [question], max_new_tokens=max_new_tokens)[0])


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(..., help="A libra-pretrain or libra-instruct run or checkpoint folder."),
    data: Path = typer.Option(Path("runs/demo/data/test"), help="Held-out shapes-world shards."),
    limit: int = typer.Option(200, min=1, help="At most this many images."),
    captions: bool = typer.Option(True, help="Caption attribute F1."),
    vqa: bool = typer.Option(True, help="VQA accuracy (every question of the records)."),
    text_lm: Path | None = typer.Option(None, help="A text-lm folder: also check text-only identity with it."),
    out: Path | None = typer.Option(None, help="Folder for metrics.json and samples.json."),
) -> None:
    """Caption attribute F1, VQA accuracy and (with --text-lm) the text-only identity; prints metrics as JSON."""
    from vlpretrain.libra.evaluate import run

    metrics = run(checkpoint, data, limit=limit, captions=captions, vqa=vqa, text_lm=text_lm, out=out)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _check_files(paths: list[Path]) -> None:
    from vlpretrain.errors import UserError

    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such image file")


def convert(
    official_dir: Path = typer.Argument(..., help="Official Libra folder (HF LibraForCausalLM: config.json, weights)."),
    out_dir: Path = typer.Argument(..., help="Output folder (config.json + model.safetensors + text_tokenizer/)."),
    tokenizer: str = typer.Option("", help="A libra-tokenizer folder to record (its sizes must match)."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32, bfloat16 or float16."),
) -> None:
    """Convert Libra's LM (routed LLaMA, experts, bridges, image embeddings and heads) into a libra-instruct folder."""
    from vlpretrain.libra.convert import conversion_summary, convert_libra

    print(conversion_summary(convert_libra(official_dir, out_dir, tokenizer=tokenizer, dtype=dtype)))
