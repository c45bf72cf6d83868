"""`vlpretrain data ...`: synthesise, import, inspect data sets; train and evaluate the shapes-world judge."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vlpretrain.cli.common import config_options, load_synth_config, quiet_option
from vlpretrain.errors import UserError

app = typer.Typer(
    help="Make, import and inspect data sets; train and evaluate the shapes-world judge.", no_args_is_help=True
)
console = Console()


@app.command("synth")
def synth(
    out: Path = typer.Argument(..., help="Output folder for shards, documents and stats.json."),
    preset: str = typer.Option("demo", help="Shapes-world preset: tiny, demo or large."),
    config: Path | None = config_options.config,
    set_: list[str] = config_options.set_,
    workers: int = typer.Option(2, min=1, help="Generator processes."),
    quiet: bool = quiet_option,
) -> None:
    """Generate the shapes-world data set (images, captions, QA, interleaved documents)."""
    from vlpretrain.data.synth_write import write_shapes_world

    cfg = load_synth_config(preset, config, set_)
    stats = write_shapes_world(cfg, out, workers=workers, progress=not quiet)
    table = Table("split", "images", "shards", "docs", "doc images")
    for split, s in stats["splits"].items():
        table.add_row(split, str(s["images"]), str(len(s["shards"])), str(s["docs"]), str(s["doc_images"]))
    if not quiet:
        console.print(table)
        console.print(f"wrote {out} in {stats['seconds']:.1f} s")


@app.command("inspect")
def inspect(
    path: str = typer.Argument(..., help="Shards: a folder, a glob, a brace range or a pipe: URL."),
    grid: Path | None = typer.Option(None, help="Write a sample grid PNG here."),
    samples: int = typer.Option(16, min=1, help="Images in the grid."),
) -> None:
    """Counts, caption-length statistics and a sample grid of a shard set."""
    from vlpretrain.data.inspect import inspect_shards

    stats = inspect_shards(path, grid_png=grid, n_grid=samples)
    console.print_json(json.dumps(stats))


@app.command("import-folder")
def import_folder(
    src: Path = typer.Argument(..., help="Folder of images with sidecar .txt captions or a captions.jsonl."),
    out: Path = typer.Argument(..., help="Output folder for the shards."),
    max_per_shard: int = typer.Option(1000, min=1, help="Samples per shard."),
    allow_missing_caption: bool = typer.Option(False, help="Keep images without a caption (empty text)."),
    quiet: bool = quiet_option,
) -> None:
    """Turn an image folder with captions into webdataset shards (img2dataset layout)."""
    from vlpretrain.data.folder import import_folder as run_import

    if not src.is_dir():
        raise NotADirectoryError(f"not a folder: {src}")
    report = run_import(src, out, max_per_shard=max_per_shard, allow_missing_caption=allow_missing_caption, quiet=quiet)
    console.print(report)


@app.command("train-judge")
def train_judge(
    out: Path = typer.Argument(..., help="Folder to write the judge checkpoint to."),
    data: Path | None = typer.Option(None, help="A shapes-world folder: train for its geometry (stats.json)."),
    preset: str = typer.Option("default", help="Judge preset."),
    steps: int | None = typer.Option(None, min=1, help="Training steps (default: the preset's)."),
    quiet: bool = quiet_option,
) -> None:
    """Train the shapes-world judge, the classifier that scores generated images and captions."""
    from vlpretrain.configs import get_preset
    from vlpretrain.data.judge import save_judge
    from vlpretrain.data.judge import train_judge as run_train

    synth = load_synth_config("demo", None, []) if data is None else _synth_config_of(data)
    judge = run_train(get_preset("judge", preset), synth, steps=steps, progress=not quiet)
    save_judge(judge, out)
    console.print(f"judge written to {out}")


@app.command("train-encoder")
def train_encoder(
    out: Path = typer.Argument(..., help="The weights file to write (.safetensors; its config goes next to it)."),
    data: Path | None = typer.Option(None, help="A shapes-world folder: train for its geometry (stats.json)."),
    preset: str = typer.Option("tiny", help="demo-encoder preset."),
    config: Path | None = config_options.config,
    set_: list[str] = config_options.set_,
    quiet: bool = quiet_option,
) -> None:
    """Pretrain the demo's frozen ViT (what the tokenizer reads) on the shapes world; prints its patch accuracies."""
    from vlpretrain.configs import load_config
    from vlpretrain.lavit.demo_encoder import DemoEncoderConfig, pretrain_demo_encoder, save_demo_encoder

    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the demo encoder is saved as .safetensors")
    cfg = load_config(DemoEncoderConfig, "demo-encoder", config, set_, preset=preset)
    synth = load_synth_config("demo", None, []) if data is None else _synth_config_of(data)
    vit, metrics = pretrain_demo_encoder(cfg, synth, progress=not quiet)
    save_demo_encoder(vit, out, metrics)
    console.print_json(json.dumps(metrics))
    console.print(f"encoder written to {out}")


@app.command("eval-judge")
def eval_judge(
    judge_dir: Path = typer.Argument(..., help="Judge checkpoint folder."),
    data: Path = typer.Argument(..., help="A shapes-world folder."),
    split: str = typer.Option("test", help="Split to evaluate on."),
    limit: int | None = typer.Option(None, min=1, help="At most this many images."),
    out: Path | None = typer.Option(None, help="Write the metrics as JSON here."),
) -> None:
    """Per-attribute accuracy of the judge on real shapes-world images."""
    from vlpretrain.data.judge import evaluate_judge, load_judge
    from vlpretrain.data.shards import read_records

    judge = load_judge(judge_dir)
    images, records = read_records(str(data / split), limit=limit)
    metrics = evaluate_judge(judge, images, records)
    table = Table("attribute", "accuracy")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    if out is not None:
        out.write_text(json.dumps(metrics, indent=2) + "\n")


def _synth_config_of(data: Path):
    from vlpretrain.configs import from_dict
    from vlpretrain.data.synthetic import SynthConfig

    stats_file = data / "stats.json"
    if not stats_file.is_file():
        raise FileNotFoundError(f"{stats_file} not found: is {data} a shapes-world folder?")
    return from_dict(SynthConfig, json.loads(stats_file.read_text())["config"])
