"""`vlpretrain libra ...` and `vlpretrain convert libra`: the text tokenizer folder, captions and answers from a
checkpoint, and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run
from PIL import Image

from vlpretrain.train.pretrained import save_task
from vlpretrain.train.task import build_task, task_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2}
    task = build_task("libra-instruct", task_config("libra-instruct", "tiny", {"llm": small}))
    return save_task(task, "libra-instruct", task.cfg, tmp_path_factory.mktemp("libra_ckpt"))


def test_text_tokenizer_caption_and_ask(tmp_path: Path, checkpoint: Path, capsys) -> None:
    code, out, _ = run(["libra", "text-tokenizer", str(tmp_path / "tok")], capsys)
    assert code == 0 and (tmp_path / "tok" / "tokenizer.json").is_file()
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    args = ["--checkpoint", str(checkpoint), "--max-new-tokens", "3"]
    code, out, _ = run(["libra", "caption", str(image), *args], capsys)
    assert code == 0 and json.loads(out)[0]["image"] == str(image)
    code, out, _ = run(["libra", "ask", str(image), "what color is the square?", *args], capsys)
    assert code == 0 and isinstance(out, str)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["libra", "caption", "/nonexistent.png", "--checkpoint", "x"], "/nonexistent.png: no such image file"),
        (["libra", "eval", "--checkpoint", "/nonexistent"], "/nonexistent: no model.safetensors"),
        (["convert", "libra", "/nonexistent", "out"], "/nonexistent: no config.json"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_empty_question_and_wrong_checkpoint(tmp_path: Path, checkpoint: Path, capsys) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    code, _, err = run(["libra", "ask", str(image), " ", "--checkpoint", str(checkpoint)], capsys)
    assert code == 2 and "question: empty" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"")
    (other / "config.json").write_text(json.dumps({"task": "text-lm", "model": {}}))
    code, _, err = run(["libra", "caption", str(image), "--checkpoint", str(other)], capsys)
    assert code == 2 and "not a Libra LM" in err
