"""The `vlpretrain` command line: a thin layer over the library (typer).

Each command group lives in its own module of this package and only parses arguments, calls the library and prints.
Errors caused by the user's input (bad arguments, config keys, missing files, unreadable data) print one line and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from typer._click import exceptions as click_errors  # typer vendors click; pinned version

from vlpretrain import __version__
from vlpretrain.cli.convert import app as convert_app
from vlpretrain.cli.data import app as data_app
from vlpretrain.cli.eval import app as eval_app
from vlpretrain.cli.lavit_lm import ask, caption, eval_lm, generate
from vlpretrain.cli.lcl import encode_images, eval_lcl
from vlpretrain.cli.libra import app as libra_app
from vlpretrain.cli.reconstruct import reconstruct
from vlpretrain.cli.serve import serve
from vlpretrain.cli.tokenize import tokenize
from vlpretrain.cli.train import train
from vlpretrain.errors import TrainingDiverged

app = typer.Typer(
    name="vlpretrain",
    help="Pretrain, run and evaluate vision-language models (LaVIT, LCL, Libra).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
app.command("train")(train)
app.command("tokenize")(tokenize)
app.command("reconstruct")(reconstruct)
app.command("serve")(serve)
app.command("caption")(caption)
app.command("ask")(ask)
app.command("generate")(generate)
eval_app.command("lm")(eval_lm)
eval_app.command("lcl")(eval_lcl)
app.command("encode-images")(encode_images)
app.add_typer(eval_app, name="eval")
app.add_typer(convert_app, name="convert")
app.add_typer(libra_app, name="libra")


def _version(value: bool) -> None:
    if value:
        print(f"vlpretrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Pretrain, run and evaluate vision-language models (LaVIT, LCL, Libra)."""


@app.command("demo")
def demo(
    out: str = typer.Option("runs/demo", help="Run folder; finished stages in it are reused."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes: checks every stage runs, in about a minute."),
) -> None:
    """Run the end-to-end demo on the built-in shapes world (what `make demo` runs)."""
    from vlpretrain.demo import FULL, SMOKE, run_demo

    run_demo(out, SMOKE if smoke else FULL)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from vlpretrain.configs import ConfigError
    from vlpretrain.data.errors import DataError
    from vlpretrain.errors import UserError

    return (UserError, ConfigError, DataError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command and turn user errors into one line on stderr and exit status 2."""
    try:
        code = app(args=argv, prog_name="vlpretrain", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as err:  # a bare group: show its help
        err.show()
        sys.exit(0)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
    except click_errors.ClickException as err:  # bad arguments: usage errors, missing options, bad values
        print(f"error: {err.format_message()}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except _user_error_types() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)
