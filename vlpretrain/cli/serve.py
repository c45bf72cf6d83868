"""`vlpretrain serve --checkpoint DIR`: the local web UI (caption, ask, tokenise, generate) in a browser."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def serve(
    checkpoint: Path = typer.Option(
        Path("runs/demo"), help="A run folder (lm/, tokenizer/, detokenizer/) or a lavit-lm folder."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (the loopback: this machine only)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port to listen on."),
) -> None:
    """Serve the web UI at http://HOST:PORT until interrupted (Ctrl-C); models load once, requests run one by one."""
    from vlpretrain.web.server import is_loopback, launch

    if not is_loopback(host):
        print(f"warning: serving on {host}: other machines on the network can use this UI", file=sys.stderr)
    launch(checkpoint, host, port, block=True)
