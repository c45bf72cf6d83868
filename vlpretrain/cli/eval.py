"""`vlpretrain eval TASK ...`: evaluators that write metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Evaluate checkpoints; every evaluator writes metrics.json.", no_args_is_help=True)
console = Console()


def _print_and_write(metrics: dict[str, float], out: Path | None) -> None:
    table = Table("metric", "value")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")


@app.command("tokenizer")
def tokenizer(
    checkpoint: Path = typer.Option(Path("runs/demo/tokenizer"), help="A lavit-tokenizer checkpoint or run folder."),
    data: Path = typer.Option(Path("runs/demo/data"), help="A shapes-world folder (or any folder of split shards)."),
    split: str = typer.Option("test", help="Split folder under --data."),
    limit: int | None = typer.Option(None, min=1, help="At most this many images."),
    out: Path | None = typer.Option(None, help="metrics.json path (default: CHECKPOINT/eval_tokenizer.json)."),
) -> None:
    """Tokens per image, keep ratio, codebook usage/perplexity, reconstruction cosine, complexity correlation."""
    from vlpretrain.data.shards import read_records
    from vlpretrain.eval.tokenizer_stats import run
    from vlpretrain.lavit.api import Tokenizer

    tok = Tokenizer.from_pretrained(checkpoint)
    images, records = read_records(str(data / split), limit=limit)
    has_objects = all("objects" in r for r in records)
    metrics = run(tok, images, records if has_objects else None, progress=True)
    _print_and_write(metrics, out or checkpoint / "eval_tokenizer.json")


def _metrics_path(out: Path) -> Path:
    """``out``, or ``out/metrics.json`` when it is a folder (or a path without suffix)."""
    return out / "metrics.json" if out.is_dir() or not out.suffix else out


def _write_metrics(metrics: dict[str, float], out: Path) -> None:
    """Print the table and write ``out``; a folder (or a path without suffix) gets ``metrics.json`` inside."""
    _print_and_write(metrics, _metrics_path(out))


def _beside(out: Path, name: str) -> Path:
    """A file written next to the metrics file ``out`` names (predictions.json, sample grids)."""
    return _metrics_path(out).parent / name


def _check_mode(predictions: Path | None, checkpoint: Path | None, images: Path | None) -> None:
    """Exactly one of --predictions (score a file) and --checkpoint (run a model); a model run needs --images."""
    from vlpretrain.errors import UserError

    if (predictions is None) == (checkpoint is None):
        raise UserError("give exactly one of --predictions (score a results file) or --checkpoint (run a model)")
    if checkpoint is not None and images is None:
        raise UserError("--images: the folder of the benchmark's image files is needed with --checkpoint")


allow_missing_option = typer.Option(
    False, "--allow-missing", help="Skip and count items without a prediction or image file (not comparable)."
)
model_option = typer.Option(None, help="A lavit-lm folder to run on the benchmark (instead of --predictions).")
images_option = typer.Option(None, help="With --checkpoint: the folder of the benchmark's image files.")
tokenizer_option = typer.Option(None, help="With --checkpoint: its lavit-tokenizer (default: the one it records).")
limit_option = typer.Option(None, min=1, help="With --checkpoint: the first N items only (a subset: not comparable).")
batch_size_option = typer.Option(16, min=1, help="With --checkpoint: items per batch (the results do not change).")


@app.command("captions")
def captions(
    predictions: Path | None = typer.Option(None, help='Results JSON to score: [{"image_id", "caption"}, ...].'),
    annotations: Path = typer.Option(
        ..., "--annotations", "--data", help="References: a COCO captions file or a Karpathy-split dataset_*.json."
    ),
    format: str = typer.Option("auto", help="coco, karpathy or auto (by the file's shape)."),
    split: str = typer.Option("test", help="The Karpathy split to read (karpathy format only)."),
    checkpoint: Path | None = model_option,
    images: Path | None = images_option,
    tokenizer: Path | None = tokenizer_option,
    limit: int | None = limit_option,
    batch_size: int = batch_size_option,
    beams: int = typer.Option(2, min=1, help="With --checkpoint: beam width."),
    min_new_tokens: int = typer.Option(8, min=0, help="With --checkpoint: fewest new tokens."),
    max_new_tokens: int = typer.Option(36, min=1, help="With --checkpoint: most new tokens."),
    metric_names: str = typer.Option(
        "bleu,meteor,rouge,cider", "--metrics", help="Comma-separated: bleu, meteor, rouge, cider (METEOR is slow)."
    ),
    allow_missing: bool = allow_missing_option,
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr with the PTB tokenizer (pycocoevalcap; Java). SPICE is not computed.

    Scores --predictions, or captions the images with --checkpoint (writing predictions.json beside metrics.json).
    """
    from vlpretrain.errors import UserError
    from vlpretrain.eval.captioning import SPICE_NOTE, run

    _check_mode(predictions, checkpoint, images)
    if format not in ("auto", "coco", "karpathy"):
        raise UserError(f"--format: '{format}' is not one of coco, karpathy, auto")
    names = [name.strip() for name in metric_names.split(",") if name.strip()]
    if predictions is not None:
        metrics = run(predictions, annotations, format, split, names, allow_missing)
    else:
        from vlpretrain.cli.lavit_lm import _pipeline
        from vlpretrain.eval import run_captioning
        from vlpretrain.eval.run_common import TextSettings

        settings = TextSettings(batch_size, beams, min_new_tokens, max_new_tokens)
        pipe = _pipeline(checkpoint, tokenizer)
        metrics = run_captioning.run(pipe, annotations, images, format, split, limit, settings, allow_missing,
                                     _beside(out, "predictions.json"), True, names)  # fmt: skip
    console.print(f"[dim]{SPICE_NOTE}[/dim]")
    _write_metrics(metrics, out)


@app.command("vqa")
def vqa(
    predictions: Path | None = typer.Option(None, help='Results JSON to score: [{"question_id", "answer"}, ...].'),
    questions: Path = typer.Option(
        ..., "--questions", "--data", help="VQAv2 / OK-VQA questions JSON ({'questions': [...]})."
    ),
    annotations: Path = typer.Option(..., help="VQAv2 / OK-VQA annotations JSON ({'annotations': [...]})."),
    checkpoint: Path | None = model_option,
    images: Path | None = images_option,
    image_pattern: str | None = typer.Option(
        None, help="Image file name under --images: fields {image_id}, {split} (default: COCO's, else {image_id}.jpg)."
    ),
    split: str | None = typer.Option(None, help="{split} of the pattern (default: the questions' data_subtype)."),
    tokenizer: Path | None = tokenizer_option,
    limit: int | None = limit_option,
    batch_size: int = batch_size_option,
    beams: int = typer.Option(5, min=1, help="With --checkpoint: beam width."),
    max_new_tokens: int = typer.Option(10, min=1, help="With --checkpoint: most new tokens."),
    allow_missing: bool = allow_missing_option,
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """VQAv2 / OK-VQA accuracy: official answer normalisation, min(matches/3, 1) over annotator subsets.

    Scores --predictions, or answers the questions with --checkpoint (writing predictions.json beside metrics.json).
    """
    from vlpretrain.eval.vqa import run

    _check_mode(predictions, checkpoint, images)
    if predictions is not None:
        metrics = run(predictions, questions, annotations, allow_missing)
    else:
        from vlpretrain.cli.lavit_lm import _pipeline
        from vlpretrain.eval.run_common import TextSettings
        from vlpretrain.eval.run_vqa import run_vqa

        settings = TextSettings(batch_size, beams, 1, max_new_tokens)
        metrics = run_vqa(_pipeline(checkpoint, tokenizer), questions, annotations, images, image_pattern, split,
                          limit, settings, allow_missing, _beside(out, "predictions.json"), progress=True)  # fmt: skip
    _write_metrics(metrics, out)


@app.command("gqa")
def gqa(
    predictions: Path | None = typer.Option(
        None, help='Results JSON to score: [{"questionId", "prediction"}] or [{"question_id", "answer"}].'
    ),
    questions: Path = typer.Option(
        ..., "--questions", "--data", help="GQA balanced questions JSON ({qid: {'answer', 'types', ...}})."
    ),
    normalize: bool = typer.Option(False, "--normalize", help="Apply the VQAv2 answer normalisation to both sides."),
    checkpoint: Path | None = model_option,
    images: Path | None = images_option,
    image_pattern: str = typer.Option("{imageId}.jpg", help="Image file name under --images (field {imageId})."),
    tokenizer: Path | None = tokenizer_option,
    limit: int | None = limit_option,
    batch_size: int = batch_size_option,
    beams: int = typer.Option(5, min=1, help="With --checkpoint: beam width."),
    max_new_tokens: int = typer.Option(10, min=1, help="With --checkpoint: most new tokens."),
    allow_missing: bool = allow_missing_option,
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """GQA accuracy: exact match (as the official script), per structural type too.

    Scores --predictions, or answers the questions with --checkpoint (writing predictions.json beside metrics.json).
    """
    from vlpretrain.eval.vqa import run_gqa

    _check_mode(predictions, checkpoint, images)
    if predictions is not None:
        metrics = run_gqa(predictions, questions, normalize, allow_missing)
    else:
        from vlpretrain.cli.lavit_lm import _pipeline
        from vlpretrain.eval.run_common import TextSettings
        from vlpretrain.eval.run_vqa import run_gqa as run_model

        settings = TextSettings(batch_size, beams, 1, max_new_tokens)
        metrics = run_model(_pipeline(checkpoint, tokenizer), questions, images, image_pattern, limit, settings,
                            normalize, allow_missing, _beside(out, "predictions.json"), progress=True)  # fmt: skip
    _write_metrics(metrics, out)


@app.command("retrieval")
def retrieval(
    embeddings: Path = typer.Option(
        ..., help="A .pt or .safetensors file: image_embeddings [I, D], text_embeddings [T, D], text_to_image [T]."
    ),
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """Image-text retrieval recall@1/5/10 in both directions (cosine similarity, ties count against)."""
    from vlpretrain.eval.retrieval import run

    _write_metrics(run(embeddings), out)


@app.command("fid")
def fid(
    checkpoint: Path = typer.Option(Path("runs/demo/lm"), help="A lavit-lm folder: draws one image per caption."),
    data: Path = typer.Option(
        ..., "--data", "--annotations", help="Captions: a COCO captions file or a Karpathy-split dataset_*.json."
    ),
    images: Path = typer.Option(..., help="The folder of the real image files."),
    format: str = typer.Option("auto", help="coco, karpathy or auto (by the file's shape)."),
    split: str = typer.Option("test", help="The Karpathy split to read (karpathy format only)."),
    detokenizer: Path | None = typer.Option(None, help="A lavit-detokenizer folder (default: the LM's recorded one)."),
    tokenizer: Path | None = tokenizer_option,
    inception_weights: Path | None = typer.Option(
        None, help="torch-fidelity's pt_inception-2015-12-05-6726825d.pth: the published FID (else a labelled ViT FID)."
    ),
    limit: int | None = typer.Option(None, min=1, help="The first N images only."),
    seed: int = typer.Option(0, help="Seed of the drawings (fixed result for a seed and batch size)."),
    guidance: float | None = typer.Option(None, min=0.0, help="LM guidance (default 4.0)."),
    min_tokens: int | None = typer.Option(None, min=1, help="Fewest visual tokens (default: 20 per 256 patches)."),
    max_tokens: int | None = typer.Option(None, min=1, help="Most visual tokens (default: 200 per 256 patches)."),
    steps: int | None = typer.Option(None, min=1, help="Detokenizer DDIM steps (default: its own)."),
    batch_size: int = typer.Option(16, min=1, help="Prompts per batch."),
    allow_missing: bool = allow_missing_option,
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """Text-to-image FID: the LM draws each image's first caption; drawings vs real images (torchmetrics).

    Writes predictions.json (prompt, seed, tokens per drawing) and fid_pairs.png (real | drawn) beside metrics.json.
    """
    from vlpretrain.cli.lavit_lm import _pipeline, _run
    from vlpretrain.errors import UserError
    from vlpretrain.eval.run_fid import run
    from vlpretrain.lavit.generate import SamplingConfig

    if format not in ("auto", "coco", "karpathy"):
        raise UserError(f"--format: '{format}' is not one of coco, karpathy, auto")
    sampling = _run(SamplingConfig, guidance_scale=4.0 if guidance is None else guidance, min_tokens=min_tokens,
                    max_tokens=max_tokens)  # fmt: skip
    pipe = _pipeline(checkpoint, tokenizer, detokenizer)
    metrics = run(pipe, data, images, format, split, limit, inception_weights, sampling, seed, steps,
                  batch_size, allow_missing, _beside(out, "predictions.json"), _beside(out, "fid_pairs.png"),
                  progress=True)  # fmt: skip
    _write_metrics(metrics, out)


@app.command("reconstruction")
def reconstruction(
    checkpoint: Path = typer.Option(Path("runs/demo/detokenizer"), help="A lavit-detokenizer checkpoint or run."),
    data: Path = typer.Option(Path("runs/demo/data"), help="A shapes-world folder (split folders of shards)."),
    split: str = typer.Option("test", help="Split folder under --data."),
    judge: Path = typer.Option(Path("runs/demo/judge"), help="The shapes-world judge that reads the images."),
    limit: int = typer.Option(200, min=1, help="At most this many images."),
    steps: int | None = typer.Option(None, min=1, help="DDIM steps (default: the checkpoint's)."),
    guidance: float | None = typer.Option(None, min=0.0, help="Classifier-free guidance scale (default: its own)."),
    bf16: bool = typer.Option(False, "--bf16", help="Run the UNet under bf16 autocast (faster on CPUs)."),
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """Detokenizer reconstructions read by the judge: agree_* (original vs reconstruction), truth_*, judge_*.

    Writes reconstruction.png (the first 16 original | reconstruction pairs) beside metrics.json.
    """
    from vlpretrain.data.judge import load_judge
    from vlpretrain.errors import UserError
    from vlpretrain.eval.reconstruction import run

    if not checkpoint.exists():
        raise UserError(f"--checkpoint: {checkpoint}: no such folder")
    if not (data / split).is_dir():
        raise UserError(f"--data: {data / split}: no such folder (a shapes-world split)")
    load_judge(judge)  # fail before the long part when the judge is not there
    grid = _beside(out, "reconstruction.png")
    grid.parent.mkdir(parents=True, exist_ok=True)
    metrics = run(checkpoint, data / split, judge, limit, steps, guidance, grid, bf16)
    speed = metrics.pop("images_per_s")  # timing is not a result: metrics.json stays identical across runs
    console.print(f"[dim]{speed:.2f} images/s[/dim]")
    _write_metrics(metrics, out)
