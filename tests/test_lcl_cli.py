"""LCL through the command line: train on shapes-world documents, eval, encode-images, convert, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_runner import run
from PIL import Image
from safetensors.torch import load_file
from test_lcl_convert import CTX, IMAGE, PATCH, POOL_HEADS, SPECIAL, TW, VOCAB, VW, official_state, write_checkpoint

from vlpretrain.cli import main
from vlpretrain.train.pretrained import load_task


@pytest.fixture(scope="module")
def trained(shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lcl_run")
    cfg = {"task": "lcl", "model_preset": "tiny",
           "model": {"vit": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                     "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 128}, "max_len": 128},
           "data": {"train": str(shapes_data / "train" / "docs.jsonl"), "batch_size": 2, "shuffle_buffer": 0},
           "steps": 3, "precision": "fp32", "schedule": {"warmup_steps": 1},
           "log": {"every": 1, "progress": False, "peak_tflops": 1.0}, "out_dir": str(out / "run")}  # fmt: skip
    (out / "lcl.yaml").write_text(yaml.safe_dump(cfg))
    main(["train", str(out / "lcl.yaml")])
    return out / "run"


def test_train_then_eval_writes_metrics(trained: Path, tmp_path: Path, capsys) -> None:
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3] and all("con" in r for r in lines if "loss" in r)
    args = ["eval", "lcl", str(trained), "--train-images", "48", "--test-images", "24", "--epochs", "1",
            "--out", str(tmp_path / "m.json")]  # fmt: skip
    code, _, err = run(args, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in (
        "probe_count",
        "probe_color",
        "probe_shape",
        "probe_size",
        "probe_mean",
        "zero_shot_count",
        "zero_shot_shape",
        "retrieval_i2t_r@1",
    ):
        assert 0.0 <= metrics[key] <= 1.0


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_encode_images_from_a_folder(trained: Path, tmp_path: Path, fmt: str, capsys) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    code, _, err = run(["encode-images", str(trained), str(folder), "--out", str(tmp_path / "f"), "--kind", "patches",
                        "--format", fmt, "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert [r["key"] for r in index["items"]] == ["a.jpg", "b.png", "sub/c.png"]
    assert index["skipped"] == {"corrupt_image": 1} and index["shape"] == [3, 16, 32]
    path = tmp_path / "f" / f"features.{fmt}"
    feats = torch.from_numpy(np.load(path)) if fmt == "npy" else load_file(str(path))["features"]
    task, _ = load_task(trained)
    with torch.no_grad():
        one = task.visual(_normalised(folder / "sub" / "c.png"))
    assert feats.shape == (3, 16, 32) and torch.allclose(feats[2], one[0], atol=1e-5)


def _normalised(path: Path) -> torch.Tensor:
    from vlpretrain.core.image import load_image, normalize, resize, to_tensor

    return normalize(to_tensor(resize(load_image(path), 32)))[None]


def test_encode_images_from_shards_is_l2_normalised(trained: Path, shapes_data: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run(["encode-images", str(trained), str(shapes_data / "test"), "--out", str(tmp_path / "e"),
                        "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    index = json.loads((tmp_path / "e" / "index.json").read_text())
    feats = load_file(str(tmp_path / "e" / "features.safetensors"))["features"]
    assert len(index["items"]) == 64 == len(feats) and index["items"][0]["key"] == "test_00000000"
    assert torch.allclose(feats.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_convert_lcl_command(tmp_path: Path, capsys) -> None:
    ckpt = write_checkpoint(tmp_path / "official.pt", official_state())
    # applied one at a time, each checked: shrink in an order where every intermediate config is valid
    sets = [f"vit.image_size={IMAGE}", f"vit.patch_size={PATCH}", "vit.heads=2", f"vit.width={VW}", "vit.depth=1",
            f"pool_heads={POOL_HEADS}", "text.heads=2", f"text.width={TW}", "text.layers=1", f"max_len={CTX}",
            f"text.context_length={CTX}", f"special_ids={json.dumps(SPECIAL)}", f"vocab_size={VOCAB}"]  # fmt: skip
    args = ["convert", "lcl", str(ckpt), str(tmp_path / "out"), *[a for s in sets for a in ("--set", s)]]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "LCL ViT 24x1" in out and (tmp_path / "out" / "model.safetensors").is_file()
    code, _, err = run(["convert", "lcl", str(ckpt), str(tmp_path / "o2")], capsys)  # the paper preset: 12 blocks
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing visual.transformer.resblocks.1." in err


@pytest.mark.parametrize("args", [["encode-images", "nowhere", "nothing", "--out", "x"],
                                  ["eval", "lcl", "nowhere"]])  # fmt: skip
def test_bad_inputs_are_one_line_errors(args: list[str], capsys) -> None:
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
