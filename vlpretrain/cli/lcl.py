"""LCL commands: ``convert lcl`` (official checkpoint), ``encode-images`` (feature export), ``eval lcl``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vlpretrain.cli.common import config_options, quiet_option


def convert_lcl(
    official: Path = typer.Argument(..., help="Official open_clip-format checkpoint (.pt), e.g. LCL_ViT-B-16_laion."),
    out_dir: Path = typer.Argument(..., help="Output folder (config.json + model.safetensors)."),
    preset: str = typer.Option("paper", help="lcl preset the checkpoint must match (paper = ViT-B/16, 224 px)."),
    set_: list[str] = config_options.set_,
    dtype: str = typer.Option("float32", help="Storage dtype: float32, bfloat16 or float16."),
) -> None:
    """Convert an official LCL checkpoint (visual, text, pool_project, lm_head, logit_scale)."""
    from vlpretrain.lcl.convert import conversion_summary, convert_official, converter_config

    print(conversion_summary(convert_official(official, out_dir, converter_config(preset, set_), dtype)))


def encode_images(
    checkpoint: Path = typer.Argument(..., help="An lcl run folder, checkpoint or converted folder."),
    images: str = typer.Argument(..., help="Image folder, image file, or pair shards (.tar spec or shard folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: features file + index.json."),
    kind: str = typer.Option("embedding", help="embedding (pooled, normalised), patches (encoder) or tokens (LM)."),
    format: str = typer.Option("safetensors", "--format", help="safetensors or npy."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    quiet: bool = quiet_option,
) -> None:
    """Export LCL image features with a JSON index of their rows (key and source of each image)."""
    from vlpretrain.errors import UserError
    from vlpretrain.lcl.encode import FORMATS, KINDS, encode_images, write_features
    from vlpretrain.train.pretrained import load_task

    if kind not in KINDS or format not in FORMATS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)} and --format one of {', '.join(FORMATS)}")
    task, _ = load_task(checkpoint, expect_task="lcl")
    feats, rows, skipped = encode_images(task, images, kind, batch_size, progress=not quiet)  # type: ignore[arg-type]
    meta = {"checkpoint": str(checkpoint), "kind": kind, "images": images, "skipped": skipped}
    index = write_features(feats, rows, out, format, meta)
    print(f"{len(rows)} images -> {out / ('features.' + format)} {list(feats.shape)}; index {index}"
          + (f"; skipped {skipped}" if skipped else ""))  # fmt: skip


def eval_lcl(
    checkpoint: Path = typer.Argument(..., help="An lcl run folder, checkpoint or converted folder."),
    data: Path | None = typer.Option(None, help="A shapes-world folder: evaluation images are drawn like its own."),
    train_images: int = typer.Option(2000, min=1, help="Probe training images per set (scenes, single objects)."),
    test_images: int = typer.Option(1000, min=1, help="Test images per set."),
    epochs: int = typer.Option(20, min=1, help="Probe training epochs."),
    out: Path | None = typer.Option(None, help="metrics.json path (default: CHECKPOINT/eval_lcl.json)."),
) -> None:
    """Shapes-world attentive probes (object count; colour, shape, size), zero-shot classification, retrieval."""
    from vlpretrain.eval.probe import ProbeConfig
    from vlpretrain.lcl.evaluate import PROBE_LR, evaluate, read_synth_config, synth_eval_sets
    from vlpretrain.train.pretrained import load_task

    task, _ = load_task(checkpoint, expect_task="lcl")
    sets = synth_eval_sets(train_images, test_images, read_synth_config(data) if data else None)
    metrics = evaluate(task, sets, config=ProbeConfig(kind="attentive", epochs=epochs, lr=PROBE_LR))
    target = out or (checkpoint / "eval_lcl.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(metrics, indent=2) + "\n")
    width = max(map(len, metrics))
    print("\n".join(f"{key:<{width}}  {value:.4f}" for key, value in metrics.items()))
    print(f"written to {target}")


__all__ = ["convert_lcl", "encode_images", "eval_lcl"]
