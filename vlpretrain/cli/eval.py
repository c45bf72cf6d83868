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
