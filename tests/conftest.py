"""Shared fixtures: small shapes-world data sets written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _write(root: Path, **overrides: int) -> Path:
    from vlpretrain.data.synth_write import write_shapes_world
    from vlpretrain.data.synthetic import SynthConfig

    fields = dict(num_train=256, num_val=64, num_test=64, docs_train=16, docs_val=4, docs_test=4, shard_size=64)
    write_shapes_world(SynthConfig(**(fields | overrides)), root, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes world: 256/64/64 images in shards of 64."""
    return _write(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def shapes_one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images in a single shard per split (ranks then split it sample by sample)."""
    return _write(tmp_path_factory.mktemp("shapes1"), shard_size=1000)
