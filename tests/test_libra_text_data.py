"""The demo text LM's shards (attribute-word list before a share of the captions) and the visual experts' optional
start from the text layer (truncated SVD)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from vlpretrain.configs import ConfigError
from vlpretrain.core.llm import LlamaSpec, build_llama
from vlpretrain.data.synthetic import COLORS, SHAPES, SIZES
from vlpretrain.errors import UserError
from vlpretrain.libra.config import LibraConfig
from vlpretrain.libra.model import LibraLM
from vlpretrain.libra.text import load_libra_text_tokenizer
from vlpretrain.libra.text_data import ATTRIBUTE_LIST, takes_list, write_text_shards
from vlpretrain.libra.vocab import VisualVocab


def _shard(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("png", b"\x89PNG fake"), ("txt", f"one object: caption {i}.".encode()),
                              ("json", b"{}")):  # fmt: skip
                info = tarfile.TarInfo(f"train_{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_attribute_list_names_every_word_in_the_libra_vocabulary() -> None:
    for word in (*COLORS, *SHAPES, *SIZES):
        assert f" {word}" in ATTRIBUTE_LIST
    tok = load_libra_text_tokenizer("shapes-world-libra")
    assert tok.unk_token_id not in tok(ATTRIBUTE_LIST, add_special_tokens=False).input_ids


def test_write_text_shards_prefixes_a_share_and_copies_the_rest(tmp_path: Path) -> None:
    _shard(tmp_path / "src" / "train-000000.tar", 200)
    counts = write_text_shards(tmp_path / "src", tmp_path / "dst", share=0.5, seed=3)
    before, after = _members(tmp_path / "src" / "train-000000.tar"), _members(tmp_path / "dst" / "train-000000.tar")
    assert list(before) == list(after)  # same members, same order
    listed = 0
    for name, data in before.items():
        if not name.endswith(".txt"):
            assert after[name] == data
            continue
        key = name.rsplit(".", 1)[0]
        expected = f"{ATTRIBUTE_LIST} {data.decode()}".encode() if takes_list(key, 0.5, 3) else data
        assert after[name] == expected
        listed += after[name] != data
    assert counts == {"shards": 1, "samples": 200, "with_list": listed}
    assert 60 < listed < 140  # about half
    assert write_text_shards(tmp_path / "src", tmp_path / "none", share=0.0)["with_list"] == 0
    with pytest.raises(UserError, match="no .tar shards"):
        write_text_shards(tmp_path / "dst" / "missing", tmp_path / "x")
    with pytest.raises(UserError, match="share"):
        write_text_shards(tmp_path / "src", tmp_path / "x", share=1.5)


@pytest.mark.parametrize("down_ratio", [1, 4])
def test_expert_init_from_text_layer_is_the_truncated_svd(down_ratio: int) -> None:
    torch.manual_seed(0)
    lm = build_llama(LlamaSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2), 40)
    model = LibraLM(lm, VisualVocab(40, 16, 2), feature_dim=12, down_ratio=down_ratio, expert_init="lm")
    for text, image in zip(lm.model.layers, model.vision.layers, strict=True):
        for name, weight in (("q_proj", text.self_attn.q_proj.weight), ("down_proj", text.mlp.down_proj.weight)):
            expert = getattr(image, name)
            approx = expert.weight_B @ expert.weight_A
            s = torch.linalg.svdvals(weight)
            rank = expert.weight_A.shape[0]
            # Eckart-Young: the error of the best rank-R approximation is the norm of the dropped singular values
            torch.testing.assert_close(torch.linalg.norm(weight - approx), s[rank:].norm(), atol=1e-5, rtol=1e-4)
            if down_ratio == 1:
                torch.testing.assert_close(approx, weight, atol=1e-5, rtol=1e-4)
        assert torch.equal(image.input_layernorm.weight, text.input_layernorm.weight)
        assert not image.k_bridge_on_vision.weight_B.any()  # bridges still start as a no-op
    with pytest.raises(ValueError, match="expert_init"):
        LibraLM(lm, VisualVocab(40, 16, 2), feature_dim=12, expert_init="copy")
    with pytest.raises(ConfigError, match="expert_init"):
        LibraConfig(expert_init="copy")
