"""`python -m vlpretrain ...` is the `vlpretrain` command (and what torchrun launches)."""

from vlpretrain.cli import main

if __name__ == "__main__":
    main()
