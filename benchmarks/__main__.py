"""``python -m benchmarks [NAME ...] [--quick] [--list]``: run benchmarks (all by default), print their tables and
rewrite their sections of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from benchmarks import detokenizer, lm, synth, tokenizer, train_step
from benchmarks.common import DOC, Conditions, Report, publish

BENCHMARKS: dict[str, Callable[[bool], Report]] = {
    synth.NAME: synth.run,
    train_step.NAME: train_step.run,
    tokenizer.NAME: tokenizer.run,
    detokenizer.NAME: detokenizer.run,
    lm.NAME: lm.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {list(BENCHMARKS)})"
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke-test sizes; {DOC.name} is left alone")
    parser.add_argument("--list", action="store_true", help="name the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    for name in args.names or list(BENCHMARKS):
        conditions = Conditions()
        publish(BENCHMARKS[name](args.quick), conditions, write_doc=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
