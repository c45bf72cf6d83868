"""The command line: version, help, `data synth` determinism, one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run

from vlpretrain import __version__


def test_version_and_help(capsys) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"vlpretrain {__version__}"
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(group in out for group in ("data", "train", "demo"))
    code, out, _ = run(["data", "--help"], capsys)
    assert all(
        cmd in out for cmd in ("synth", "inspect", "import-folder", "train-judge", "eval-judge", "train-encoder")
    )


def test_synth_is_deterministic_and_independent_of_workers(tmp_path: Path, capsys) -> None:
    args = ["--preset", "tiny", "--set", "num_train=100", "--set", "shard_size=40", "--quiet"]
    assert run(["data", "synth", str(tmp_path / "a"), *args, "--workers", "1"], capsys)[0] == 0
    assert run(["data", "synth", str(tmp_path / "b"), *args, "--workers", "2"], capsys)[0] == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("train/train-000002.tar") in files and Path("val/docs.jsonl") in files
    for rel in files:
        if rel.name != "stats.json":
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["splits"]["train"]["images"] == 100 and len(stats["splits"]["train"]["shards"]) == 3
    assert sum(stats["splits"]["train"]["objects_per_image"].values()) == 100


def test_inspect_writes_a_grid(tmp_path: Path, capsys) -> None:
    run(["data", "synth", str(tmp_path), "--preset", "tiny", "--quiet"], capsys)
    code, out, _ = run(["data", "inspect", str(tmp_path / "val"), "--grid", str(tmp_path / "g.png")], capsys)
    assert code == 0 and json.loads(out)["samples"] == 64 and (tmp_path / "g.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "synth"], "Missing argument"),
        (["data", "synth", "x", "--bogus"], "No such option: --bogus"),
        (["data", "synth", "x", "--set", "image_size=999"], "image_size: 999 is outside 8..224"),
        (["data", "synth", "x", "--set", "colour=red"], "unknown key 'colour'"),
        (["data", "synth", "x", "--preset", "huge"], "unknown synth preset 'huge'"),
        (["data", "import-folder", "/nonexistent/dir", "out"], "not a folder: /nonexistent/dir"),
        (["data", "inspect", "/nonexistent/*.tar"], "/nonexistent"),
        (["train", "/nonexistent.yaml"], "config file not found"),
        (["data", "train-encoder", "enc.bin"], "enc.bin: the demo encoder is saved as .safetensors"),
        (["data", "train-encoder", "e.safetensors", "--set", "objective=mae"], "demo_encoder.objective: 'mae'"),
        (["data", "train-encoder", "e.safetensors", "--set", "embed_scales={colour: 2}"], "embed_scales: colour"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:
    code, _, err = run(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_train_encoder_writes_a_loadable_encoder_with_the_overrides(tmp_path: Path, capsys) -> None:
    from vlpretrain.lavit.demo_encoder import load_demo_encoder

    out = tmp_path / "enc" / "vit.safetensors"
    args = ["--set", "steps=2", "--set", "pool_size=64", "--set", "eval_images=8", "--set", "data_workers=0"]
    code, stdout, _ = run(["data", "train-encoder", str(out), *args, "--set", "objective=embed", "--quiet"], capsys)
    assert code == 0 and "encoder written to" in stdout
    assert json.loads(out.with_suffix(".json").read_text())["metrics"]["steps"] == 2
    assert load_demo_encoder(out).num_patches == 64
