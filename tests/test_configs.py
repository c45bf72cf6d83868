"""Typed configs: presets, YAML files, --set overrides and the errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlpretrain.configs import ConfigError, apply_overrides, from_dict, load_config, to_dict
from vlpretrain.data.synthetic import SynthConfig
from vlpretrain.train.config import TrainConfig


def test_round_trip_through_dict() -> None:
    cfg = TrainConfig(steps=7)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_overrides_parse_yaml_scalars_and_nested_keys() -> None:
    cfg = apply_overrides(TrainConfig(), ["optim.lr=1e-3", "steps=12", "optim.betas=[0.9, 0.99]", "data.train=x"])
    assert cfg.optim.lr == 1e-3 and cfg.steps == 12 and cfg.optim.betas == [0.9, 0.99] and cfg.data.train == "x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'"),
        ("bogus=1", "unknown key 'bogus'"),
        ("steps=ten", "steps: expected an integer"),
        ("steps=1.5", "steps: expected an integer"),
        ("precision=fp8", "precision: 'fp8' is not one of"),
        ("optim.lr=-1", "optim.lr"),
        ("deterministic=1", "deterministic: expected true/false"),
        ("steps", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        apply_overrides(TrainConfig(), [override])


def test_int_is_accepted_for_float() -> None:
    assert apply_overrides(TrainConfig(), ["optim.lr=1"]).optim.lr == 1.0


def test_yaml_preset_then_file_then_set(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nimage_size: 32\nnum_train: 10\n")
    cfg = load_config(SynthConfig, "synth", path, ["num_val=3"])
    assert (cfg.image_size, cfg.num_train, cfg.num_val, cfg.shard_size) == (32, 10, 3, 64)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("image_sizee: 32\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'image_sizee'"):
        load_config(SynthConfig, "synth", path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SynthConfig, "synth", tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown synth preset 'huge'"):
        load_config(SynthConfig, "synth", preset="huge")


def test_post_init_validation() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        SynthConfig(image_size=500)
    with pytest.raises(ConfigError, match="held_out"):
        SynthConfig(held_out=["red hexagon"])
