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


def _write_metrics(metrics: dict[str, float], out: Path) -> None:
    """Print the table and write ``out``; a folder (or a path without suffix) gets ``metrics.json`` inside."""
    _print_and_write(metrics, out / "metrics.json" if out.is_dir() or not out.suffix else out)


allow_missing_option = typer.Option(
    False, "--allow-missing", help="Score only the predicted items when some have no prediction (not comparable)."
)


@app.command("captions")
def captions(
    predictions: Path = typer.Option(..., help='Results JSON: [{"image_id", "caption"}, ...].'),
    annotations: Path = typer.Option(..., help="References: a COCO captions file or a Karpathy-split dataset_*.json."),
    format: str = typer.Option("auto", help="coco, karpathy or auto (by the file's shape)."),
    split: str = typer.Option("test", help="The Karpathy split to read (karpathy format only)."),
    allow_missing: bool = allow_missing_option,
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr with the PTB tokenizer (pycocoevalcap; Java). SPICE is not computed."""
    from vlpretrain.errors import UserError
    from vlpretrain.eval.captioning import SPICE_NOTE, run

    if format not in ("auto", "coco", "karpathy"):
        raise UserError(f"--format: '{format}' is not one of coco, karpathy, auto")
    metrics = run(predictions, annotations, format, split, allow_missing=allow_missing)  # type: ignore[arg-type]
    console.print(f"[dim]{SPICE_NOTE}[/dim]")
    _write_metrics(metrics, out)


@app.command("vqa")
def vqa(
    predictions: Path = typer.Option(..., help='Results JSON: [{"question_id", "answer"}, ...].'),
    questions: Path = typer.Option(..., help="VQAv2 / OK-VQA questions JSON ({'questions': [...]})."),
    annotations: Path = typer.Option(..., help="VQAv2 / OK-VQA annotations JSON ({'annotations': [...]})."),
    allow_missing: bool = allow_missing_option,
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """VQAv2 / OK-VQA accuracy: official answer normalisation, min(matches/3, 1) over annotator subsets."""
    from vlpretrain.eval.vqa import run

    _write_metrics(run(predictions, questions, annotations, allow_missing), out)


@app.command("gqa")
def gqa(
    predictions: Path = typer.Option(
        ..., help='Results JSON: [{"questionId", "prediction"}] or [{"question_id", "answer"}].'
    ),
    questions: Path = typer.Option(..., help="GQA balanced questions JSON ({qid: {'answer', 'types', ...}})."),
    normalize: bool = typer.Option(False, "--normalize", help="Apply the VQAv2 answer normalisation to both sides."),
    allow_missing: bool = allow_missing_option,
    out: Path = typer.Option(Path("metrics.json"), help="metrics.json path (or a folder to write it into)."),
) -> None:
    """GQA accuracy: exact match (as the official script), per structural type too."""
    from vlpretrain.eval.vqa import run_gqa

    _write_metrics(run_gqa(predictions, questions, normalize, allow_missing), out)


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
