"""`vlpretrain convert ...`: official checkpoints -> folders that vlpretrain loads."""

from __future__ import annotations

from pathlib import Path

import typer

from vlpretrain.cli.common import config_options
from vlpretrain.cli.lcl import convert_lcl
from vlpretrain.cli.libra import convert as convert_libra

app = typer.Typer(help="Convert official checkpoints into vlpretrain folders.", no_args_is_help=True)


@app.callback()
def _convert() -> None:
    """Convert official checkpoints into vlpretrain folders."""


@app.command("lavit-tokenizer")
def lavit_tokenizer(
    official_dir: Path = typer.Argument(..., help="Official LaVIT checkpoint folder (holding visual_tokenizer/)."),
    out_dir: Path = typer.Argument(..., help="Output folder (config.json + model.safetensors)."),
    preset: str = typer.Option("paper", help="lavit-tokenizer preset the files must match."),
    set_: list[str] = config_options.set_,
) -> None:
    """Convert LaVIT's visual tokenizer (EVA encoder, selector, merger, codebook, feature decoder)."""
    from vlpretrain.lavit.convert import conversion_summary, convert_tokenizer, converter_config

    out = convert_tokenizer(official_dir, out_dir, converter_config(preset, set_))
    print(conversion_summary(out))


@app.command("lavit-detokenizer")
def lavit_detokenizer(
    official_dir: Path = typer.Argument(
        ..., help="Official LaVIT checkpoint folder (pixel_decoding/, visual_tokenizer/)."
    ),
    out_dir: Path = typer.Argument(..., help="Output folder (config.json + model.safetensors)."),
    highres: bool = typer.Option(False, "--highres", help="Convert highres_pixel_decoding/ (SDXL-style, 1024 px)."),
    tokenizer: str = typer.Option("", help="The converted lavit-tokenizer folder to record as its tokenizer."),
    pool_heads: int = typer.Option(16, min=1, help="Heads of the high-res attention pool (not in the files)."),
) -> None:
    """Convert LaVIT's diffusion decoder (UNet, VAE, scheduler, unet_proj from the tokenizer's decoder file)."""
    from vlpretrain.lavit.convert_detokenizer import conversion_summary, convert_detokenizer

    variant = "highres" if highres else "lowres"
    out = convert_detokenizer(official_dir, out_dir, variant, tokenizer=tokenizer, pool_heads=pool_heads)
    print(conversion_summary(out))


@app.command("lavit-lm")
def lavit_lm(
    official_dir: Path = typer.Argument(..., help="Official LaVIT checkpoint folder (holding language_model/)."),
    out_dir: Path = typer.Argument(..., help="Output folder (config.json + model.safetensors + text_tokenizer/)."),
    tokenizer: str = typer.Option("", help="The converted lavit-tokenizer folder to record as its tokenizer."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32, bfloat16 or float16."),
    max_len: int = typer.Option(2048, min=8, help="Context recorded as max_len (the paper's 2048)."),
) -> None:
    """Convert LaVIT's unified LM (the LLaMA with visual vocabulary, and visual_weight.bin's merger + vit_proj)."""
    from vlpretrain.lavit.convert_lm import conversion_summary, convert_lm

    out = convert_lm(official_dir, out_dir, tokenizer=tokenizer, dtype=dtype, max_len=max_len)
    print(conversion_summary(out))


app.command("lcl")(convert_lcl)
app.command("libra")(convert_libra)
