"""The Libra converter on a tiny random checkpoint in the official HF ``LibraForCausalLM`` layout (key names of
docs/libra.md section "Converting"): round trip of every weight, text-only parity with an HF LLaMA of the same text
weights, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from vlpretrain.errors import UserError
from vlpretrain.libra.convert import UNUSED, conversion_summary, convert_libra, export_official
from vlpretrain.libra.lm_task import load_libra
from vlpretrain.libra.text import save_text_tokenizer
from vlpretrain.libra.tokenizer_task import LibraTokenizerTask
from vlpretrain.libra.visual_codes import VisualCodesConfig
from vlpretrain.train.pretrained import save_task

T, H, INTER, LAYERS, HEADS, K, RANK = 96, 32, 64, 2, 2, 512, 8
F, N = 512, 64  # the tiny tokenizer: 4 ViT blocks of 128, 8 x 8 patches


def official_config() -> dict:
    return {"architectures": ["LibraForCausalLM"], "model_type": "libra", "vocab_size": T, "hidden_size": H,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "vision_vocab_size": K + 2, "vision_codebook_num": 2, "max_vision_token_length": N + 2,
            "image_feature_resolution": 8, "contiguous_signal_size": F, "vision_down_ratio": 4,
            "bridge_rank": RANK, "use_bridge": True, "vision_prediction_mode": "1d", "concat_signals": True,
            "norm_signals": True, "addition_mode": False, "use_vision_position_embedding": False,
            "unified_head": False, "use_2d_rope": False, "newline_token_id": 13}  # fmt: skip


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of an official checkpoint of these sizes, random."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (T, H), "model.norm.weight": (H,), "lm_head.weight": (T, H),
        "model.vision_norm.weight": (H,), "model.vision_embed_tokens.0.weight": (K + 2, H // 2),
        "model.vision_embed_tokens.1.weight": (K + 2, H // 2), "model.vision_signal_norm.weight": (H + F,),
        "model.vision_contiguous_signal_processor.weight": (H, H + F), "vision_lm_head.heads.0.weight": (K + 2, H),
        "vision_lm_head.heads.1.weight": (K + 2, H), "vision_hidden_placeholder": (H,), "naive_placeholder": (H,),
        "vision_logits_placeholder": (1, K + 2), "language_logits_placeholder": (1, T),
        "eoi_to_newline_logits_placeholder": (1, 1, 1, T + K + 2),
    }  # fmt: skip
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (H, H)
            shapes[f"{p}self_attn.vision_{name}_proj.weight_A"] = (H // 4, H)
            shapes[f"{p}self_attn.vision_{name}_proj.weight_B"] = (H, H // 4)
        for kv in ("k", "v"):
            for side in ("language", "vision"):
                shapes[f"{p}self_attn.vision_{kv}_bridge_on_{side}.weight_A"] = (RANK, H)
                shapes[f"{p}self_attn.vision_{kv}_bridge_on_{side}.weight_B"] = (H, RANK)
        shapes[f"{p}self_attn.rotary_emb.inv_freq"] = (H // HEADS // 2,)
        shapes |= {f"{p}mlp.gate_proj.weight": (INTER, H), f"{p}mlp.up_proj.weight": (INTER, H),
                   f"{p}mlp.down_proj.weight": (H, INTER)}  # fmt: skip
        for name in ("gate", "up"):
            shapes[f"{p}mlp.vision_{name}_proj.weight_A"] = (INTER // 4, H)
            shapes[f"{p}mlp.vision_{name}_proj.weight_B"] = (INTER, INTER // 4)
        shapes[f"{p}mlp.vision_down_proj.weight_A"] = (H // 4, INTER)
        shapes[f"{p}mlp.vision_down_proj.weight_B"] = (H, H // 4)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}{norm}.weight"] = (H,)
            shapes[f"{p}vision_{norm}.weight"] = (H,)
    return {k: torch.randn(*s, generator=g) * 0.1 for k, s in shapes.items()}


def write_official(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """The official layout: config.json, two safetensors shards + index, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or official_config()))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_text_tokenizer("shapes-world-libra", folder)  # tokenizer.json (LLaMA's tokenizer.model is not offline)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    task = LibraTokenizerTask(VisualCodesConfig())
    return save_task(task, "libra-tokenizer", task.cfg, tmp_path_factory.mktemp("libra_tok"))


def test_converter_round_trip_and_text_parity(tmp_path: Path, tokenizer_dir: Path) -> None:
    state = official_state()
    out = convert_libra(write_official(tmp_path / "official", state), tmp_path / "ours", tokenizer=str(tokenizer_dir))
    assert "unused official keys: 7" in conversion_summary(out)  # 5 placeholders + a rotary buffer per layer
    task, _ = load_libra(out)
    back = export_official(task.state_dict(), LAYERS)
    used = {k: v for k, v in state.items() if k not in UNUSED and "rotary_emb" not in k}
    assert set(back) == set(used)
    for key, value in used.items():
        assert torch.equal(back[key], value), key
    text_keys = {k: v for k, v in used.items() if k.startswith(("model.", "lm_head")) and "vision" not in k}
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=T, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=HEADS, rms_norm_eps=1e-6,
                                      max_position_embeddings=256, tie_word_embeddings=False)).eval()  # fmt: skip
    hf.load_state_dict(text_keys, strict=True)
    ids = torch.randint(0, T, (2, 9))
    ours = task.model.text_logits(task.model(ids[None].expand(2, -1, -1)).hidden_BLH)
    assert torch.equal(ours, hf(input_ids=ids).logits)


def test_converter_errors_name_the_problem(tmp_path: Path, tokenizer_dir: Path) -> None:
    state = official_state()
    extra = state | {"model.layers.0.self_attn.vision_gate.weight": torch.zeros(2)}
    with pytest.raises(UserError, match="unexpected keys model.layers.0.self_attn.vision_gate.weight"):
        convert_libra(write_official(tmp_path / "a", extra), tmp_path / "oa", tokenizer=str(tokenizer_dir))
    missing = {k: v for k, v in state.items() if k != "vision_lm_head.heads.1.weight"}
    with pytest.raises(UserError, match="keys no official file provides: vision_lm_head.heads.1.weight"):
        convert_libra(write_official(tmp_path / "b", missing), tmp_path / "ob", tokenizer=str(tokenizer_dir))
    two_d = official_config() | {"vision_prediction_mode": "2d"}
    with pytest.raises(UserError, match="vision_prediction_mode"):
        convert_libra(write_official(tmp_path / "c", state, two_d), tmp_path / "oc", tokenizer=str(tokenizer_dir))
    wrong_f = official_config() | {"contiguous_signal_size": 4096}
    with pytest.raises(UserError, match=r"\(4096, 66, 514, 2\) do not fit"):
        convert_libra(write_official(tmp_path / "d", state, wrong_f), tmp_path / "od", tokenizer=str(tokenizer_dir))
