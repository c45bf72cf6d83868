"""The tokenizer's user API and commands: any image in, ids out; decode; keep-mask pictures; eval; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.cli import main
from vlpretrain.errors import UserError
from vlpretrain.lavit.api import Tokenizer, keep_overlay
from vlpretrain.lavit.tokenizer import TokenizerConfig
from vlpretrain.lavit.tokenizer_task import LavitTokenizerTask
from vlpretrain.train.pretrained import save_task


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = TokenizerConfig(codebook_size=64)
    return save_task(LavitTokenizerTask(cfg), "lavit-tokenizer", cfg, tmp_path_factory.mktemp("tok"))


def test_any_image_form_size_and_mode(checkpoint: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(checkpoint)
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 128))
    gray = Image.new("L", (1, 1), 77)
    path = tmp_path / "p.png"
    Image.new("P", (64, 64)).save(path)
    array = np.zeros((10, 20, 3), np.uint8)
    ids = tok.encode([rgba, gray, str(path), path.read_bytes(), array])
    assert len(ids) == 5 and all(s.dtype == torch.long and s.ndim == 1 for s in ids)
    assert torch.equal(ids[2], ids[3])  # a path and its bytes are the same image
    feats = tok.decode_features(ids)
    assert feats.shape == (5, 64, 128)
    with pytest.raises(ValueError, match="uint8"):
        tok.encode([np.zeros((4, 4), np.float32)])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(ValueError, match="tiny.png: 1x1 is below 2x2"):
        tok.encode([str(tiny)])


def test_overlay_marks_kept_patches() -> None:
    keep = torch.zeros(64, dtype=torch.bool)
    keep[0] = True
    img = np.full((64, 64, 3), 200, np.uint8)
    out = np.asarray(keep_overlay(img, keep, scale=2))
    assert out.shape == (128, 128, 3)
    assert out[8, 8].tolist() == [200, 200, 200]  # inside the kept patch, unshaded
    assert out[100, 100].max() < 200  # a dropped patch is darkened


def test_wrong_checkpoint_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    cfg = TokenizerConfig(codebook_size=32)  # the saved weights have 64 codes
    bad = tmp_path / "bad"
    save_task(LavitTokenizerTask(TokenizerConfig(codebook_size=64)), "lavit-tokenizer", cfg, bad)
    with pytest.raises(UserError, match="quantize.*shape"):
        Tokenizer.from_pretrained(bad)


def test_tokenize_and_eval_commands(checkpoint: Path, shapes_data: Path, tmp_path: Path, capsys) -> None:
    image = next((shapes_data / "test").glob("*.tar"))  # not an image: refused with its name
    with pytest.raises(SystemExit) as stop:
        main(["tokenize", str(image), "--checkpoint", str(checkpoint)])
    assert stop.value.code == 2 and image.name in capsys.readouterr().err
    png = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 20, 20)).save(png)
    main(["tokenize", str(png), str(png), "--checkpoint", str(checkpoint), "--visualize", str(tmp_path / "v.png")])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["tokens"] == len(rows[0]["ids"]) and (tmp_path / "v.png").exists()
    out = tmp_path / "m.json"
    main(["eval", "tokenizer", "--checkpoint", str(checkpoint), "--data", str(shapes_data), "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert {"tokens_mean", "keep_ratio", "code_usage", "code_perplexity", "rec_cos", "spearman_objects_tokens"} <= set(
        metrics
    )
    assert 0 <= metrics["keep_ratio"] <= 1 and -1 <= metrics["rec_cos"] <= 1
