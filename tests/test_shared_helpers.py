"""The helpers shared by the converters, configs and user APIs: key mapping, official files, config checks, images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vlpretrain.configs import ConfigError, check_at_least, check_divides
from vlpretrain.core.image import as_pil
from vlpretrain.core.key_rules import KeyRule, listed, map_source, missing_by_source, rule_for
from vlpretrain.core.llm import LlamaSpec
from vlpretrain.core.official_files import copy_text_tokenizer, first_file, official_folder, read_hf_weights
from vlpretrain.errors import UserError
from vlpretrain.train.pretrained import conversion_record, folder_model_config

RULES = (KeyRule("a", "enc.", "model.encoder."), KeyRule("a", "enc.buf", None), KeyRule("b", "head.", "model.head."))


def test_map_source_sorts_every_key_and_casts() -> None:
    expected = {"model.encoder.w": torch.zeros(2, 3, dtype=torch.bfloat16), "model.encoder.b": torch.zeros(3),
                "model.head.w": torch.zeros(4)}  # fmt: skip
    source = {"enc.w": torch.ones(2, 3), "enc.b": torch.ones(5), "enc.buf": torch.ones(1), "stray": torch.ones(1),
              "enc.extra": torch.ones(1)}  # fmt: skip
    mapped = map_source(source, lambda key: rule_for(RULES, "a", key), expected, consume=True)
    assert list(mapped.state) == ["model.encoder.w"] and mapped.state["model.encoder.w"].dtype == torch.bfloat16
    assert mapped.provided == {"model.encoder.w", "model.encoder.b"}
    assert list(mapped.unused) == ["enc.buf"] and mapped.unused["enc.buf"].official == "enc.buf"
    assert mapped.unexpected == ["stray", "enc.extra"]
    assert mapped.mismatched == ["enc.b: file (5,), model (3,)"] and mapped.dtypes == {"float32"}
    assert source == {}  # consumed
    assert mapped.problems() == ["unexpected keys enc.extra, stray", "shapes differ: enc.b: file (5,), model (3,)"]
    assert mapped.problems("shape mismatch for", brackets=True)[0] == "unexpected keys [enc.extra, stray]"
    kept = {"enc.w": torch.ones(2, 3)}
    assert map_source(kept, lambda key: rule_for(RULES, "a", key), expected, torch.float16).state[
        "model.encoder.w"].dtype == torch.float16 and list(kept) == ["enc.w"]  # fmt: skip
    missing = missing_by_source(RULES, expected, mapped.provided)
    assert missing == {"b": ["head.w"]}


def test_listed_shortens_long_lists() -> None:
    items = [f"k{i}" for i in range(10)]
    assert listed(items[:2]) == "k0, k1" and listed(items[:2], brackets=True) == "[k0, k1]"
    assert listed(items) == "k0, k1, k2, k3, k4, k5, k6, k7 (+2 more)"
    assert listed(items, brackets=True) == "[k0, k1, k2, k3, k4, k5, k6, k7, ... and 2 more]"


def test_official_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "w.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    state = read_hf_weights(tmp_path, ("w.safetensors",), ("w.index.json",))
    assert set(state) == {"a", "b"} and torch.equal(state["b"], torch.zeros(3))
    with pytest.raises(UserError, match=r"no LLaMA weights \(x.bin or y.json\)"):
        read_hf_weights(tmp_path, ("x.bin",), ("y.json",), what="LLaMA weights")
    (tmp_path / "bad.index.json").write_text("[1]")
    with pytest.raises(UserError, match="bad.index.json: not an HF weights index"):
        read_hf_weights(tmp_path, (), ("bad.index.json",))
    assert first_file(tmp_path, "s1") == tmp_path / "s1.safetensors" and first_file(tmp_path, "s3") is None
    (tmp_path / "sub").mkdir()
    assert official_folder(tmp_path, "x", "sub") == tmp_path / "sub"
    assert official_folder(tmp_path, "x", "other") == official_folder(tmp_path, "x") == tmp_path
    with pytest.raises(UserError, match=r"nope: no such folder \(expected the release\)"):
        official_folder(tmp_path / "nope", "the release")
    with pytest.raises(UserError, match="no text tokenizer"):
        copy_text_tokenizer(tmp_path, tmp_path / "out", ("tokenizer.json",))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert (copy_text_tokenizer(tmp_path, tmp_path / "out", ("tokenizer.json", "x")) / "tokenizer.json").is_file()


def test_saved_folder_records(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--tokenizer: .*: not a libra-tokenizer folder"):
        folder_model_config(tmp_path, "libra-tokenizer", "--tokenizer")
    (tmp_path / "config.json").write_text(json.dumps({"task": "lcl", "model": {}}))
    with pytest.raises(UserError, match="a 'lcl' folder, not a libra-tokenizer"):
        folder_model_config(tmp_path, "libra-tokenizer", "--tokenizer")
    with pytest.raises(UserError, match="not written by the converter"):
        conversion_record(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"task": "lcl", "converted_from": {"source": "x"}}))
    assert conversion_record(tmp_path)[1] == {"source": "x"}


def test_config_checks_name_the_field() -> None:
    class Cfg:
        width, heads = 8, 0

    check_at_least(Cfg(), 0, ("width", "heads"))
    with pytest.raises(ConfigError, match=r"^text.heads: must be >= 1, got 0$"):
        check_at_least(Cfg(), 1, ("width", "heads"), prefix="text.")
    check_divides(4, 8, "heads", "width")
    for heads in (0, 3):
        with pytest.raises(ConfigError, match=rf"^heads: {heads} does not divide width 8$"):
            check_divides(heads, 8, "heads", "width")
    with pytest.raises(ConfigError, match="llm.num_heads: must be >= 1"):  # once a ZeroDivisionError
        LlamaSpec(num_heads=0)
    with pytest.raises(ConfigError, match="llm.num_kv_heads: 3 does not divide num_heads 4"):
        LlamaSpec(num_kv_heads=3)


def test_as_pil_accepts_every_image_form(tmp_path: Path) -> None:
    array = np.zeros((4, 5, 3), dtype=np.uint8)
    array[1, 2] = (255, 0, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    (tmp_path / "x.png").write_bytes(buffer.getvalue())
    forms = [array, buffer.getvalue(), tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(array).convert("L")]
    for form in forms[:4]:
        image = as_pil(form)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), array)
    assert as_pil(forms[4]).mode == "RGB"
    with pytest.raises(ValueError, match="uint8"):
        as_pil(array.astype(np.float32))
