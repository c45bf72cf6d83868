"""Options and helpers shared by the command groups."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer

quiet_option = typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")

config_options = SimpleNamespace(
    config=typer.Option(None, "--config", "-c", help="YAML file: 'preset: NAME' plus fields to override."),
    set_=typer.Option([], "--set", "-s", help="Override a field: --set a.b=3 (repeatable)."),
)


def load_synth_config(preset: str, config: Path | None, overrides: list[str]):
    """The shapes-world config: a preset, then an optional YAML file, then --set overrides."""
    from vlpretrain.configs import load_config
    from vlpretrain.data.synthetic import SynthConfig

    return load_config(SynthConfig, "synth", config, overrides, preset=preset)
