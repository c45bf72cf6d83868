"""Convert an official Libra checkpoint (HF ``LibraForCausalLM``: ``libra-11b-base`` / ``libra-11b-chat``) into a
``libra-instruct`` folder that :func:`~vlpretrain.libra.lm_task.load_libra` reads, and back (:func:`export_official`).

The official folder holds ``config.json`` (LLaMA fields + Libra's vision fields), the weights (``model.safetensors``,
the shards a ``model.safetensors.index.json`` names, or the ``pytorch_model*.bin`` equivalents) and LLaMA's tokenizer
files. Every key is mapped by one explicit rule of :func:`key_rules` (docs/libra.md lists them); the per-layer rules
send ``model.layers.i.self_attn.vision_*``, ``model.layers.i.mlp.vision_*`` and ``model.layers.i.vision_*`` to our
``model.vision.layers.i.*`` and every other ``model.*`` key to the HF LLaMA under ``model.lm.``. Known, unused keys:
``vision_hidden_placeholder`` (only the 2-D prediction mode reads it), the logits/placeholder buffers and old
``rotary_emb.inv_freq`` buffers. A key no rule covers, a model key no file provides, a shape mismatch and a config we
cannot express (2-D prediction or RoPE, unified head, addition mode, no signal concatenation or norm, position
embeddings, another activation) are errors naming the file and key.

The visual tokenizer is not in these files (the official ``vqgan.ckpt`` + CLIP folder); give a ``libra-tokenizer``
folder whose feature size and patch count match (``--tokenizer``), else the ``paper`` sizes are recorded and a
``libra-tokenizer`` folder must be given when loading (``load_libra(path, tokenizer=...)``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlpretrain.core.key_rules import KeyRule, listed, map_source, missing_by_source, official_name, rule_for
from vlpretrain.core.llm import LlamaSpec, build_llama
from vlpretrain.core.official_files import copy_text_tokenizer, read_hf_weights
from vlpretrain.errors import UserError
from vlpretrain.libra.config import LibraConfig
from vlpretrain.libra.lm_task import INSTRUCT
from vlpretrain.libra.model import LibraLM
from vlpretrain.libra.text import load_libra_text_tokenizer, newline_id
from vlpretrain.libra.tokenizer_task import codes_paper
from vlpretrain.libra.visual_codes import VisualCodesConfig
from vlpretrain.libra.vocab import VisualVocab
from vlpretrain.train.pretrained import conversion_record, folder_model_config, save_task

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXT_TOKENIZER_DIR = "text_tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNUSED = ("vision_hidden_placeholder", "naive_placeholder", "vision_logits_placeholder",
          "language_logits_placeholder", "eoi_to_newline_logits_placeholder")  # fmt: skip
# official config field -> the value we support (anything else cannot be expressed by our model)
REQUIRED = {"vision_prediction_mode": "1d", "concat_signals": True, "norm_signals": True, "addition_mode": False,
            "use_vision_position_embedding": False, "unified_head": False, "use_2d_rope": False,
            "hidden_act": "silu"}  # fmt: skip
# (official submodule path, name) of each image-side module of a layer: model.layers.i.<path>vision_<name>.*
_EXPERTS = (*(("self_attn.", f"{p}_proj") for p in "qkvo"), *(("mlp.", f"{p}_proj") for p in ("gate", "up", "down")),
            *(("self_attn.", f"{kv}_bridge_on_{side}") for kv in "kv" for side in ("language", "vision")),
            ("", "input_layernorm"), ("", "post_attention_layernorm"))  # fmt: skip


def key_rules(num_layers: int) -> list[KeyRule]:
    """The official -> ours prefix rules for a model of ``num_layers`` layers (longest prefix wins)."""
    rules = [
        KeyRule("lm", "model.", "model.lm.model."),
        KeyRule("lm", "lm_head.", "model.lm.lm_head."),
        KeyRule("lm", "model.vision_norm.", "model.vision.norm."),
        KeyRule("lm", "model.vision_embed_tokens.", "model.vision.embed_tokens."),
        KeyRule("lm", "model.vision_signal_norm.", "model.vision.signal_norm."),
        KeyRule("lm", "model.vision_contiguous_signal_processor.", "model.vision.signal_proj."),
        KeyRule("lm", "vision_lm_head.heads.", "model.vision.heads."),
        *(KeyRule("lm", name, None) for name in UNUSED),
    ]
    for i in range(num_layers):
        official, ours = f"model.layers.{i}.", f"model.vision.layers.{i}."
        rules += [KeyRule("lm", f"{official}{where}vision_{name}.", f"{ours}{name}.") for where, name in _EXPERTS]
        rules.append(KeyRule("lm", f"{official}self_attn.rotary_emb.", None))
    return rules


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The flat state dict of an HF model folder (one weights file, or the shards an index names)."""
    return read_hf_weights(folder, WEIGHT_FILES, INDEX_FILES)


def config_from_official(config: dict[str, Any], where: str, codes: VisualCodesConfig) -> LibraConfig:
    """Our :class:`LibraConfig` for an official ``config.json`` (refusing what our model cannot express)."""
    bad = [f"{k} = {config[k]!r} (supported: {v!r})" for k, v in REQUIRED.items() if k in config and config[k] != v]
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("rope_scaling"):
        bad.append("biases or RoPE scaling")
    if bad:
        raise UserError(f"{where}: not supported: {'; '.join(bad)}")
    head = int(config.get("vision_vocab_size", 514)) - 2
    bits = int(math.log2(head)) if head > 0 else 0
    if 2**bits != head:
        raise UserError(f"{where}: vision_vocab_size {head + 2} is not 2 ** bits + 2")
    rope = config.get("rope_parameters") or {}
    spec = LlamaSpec(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                     num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                     num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                     max_positions=config.get("max_position_embeddings", 2048),
                     rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                     rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)))  # fmt: skip
    codes = VisualCodesConfig(**{**vars(codes), "num_codebooks": int(config.get("vision_codebook_num", 2)),
                                 "codebook_bits": bits})  # fmt: skip
    rank = int(config.get("bridge_rank", 8)) if config.get("use_bridge", True) else 0
    return LibraConfig(llm=spec, codes=codes, text_vocab=int(config["vocab_size"]),
                       down_ratio=int(config.get("vision_down_ratio", 4)), bridge_rank=rank,
                       max_len=min(2048, spec.max_positions), train_lm=True)  # fmt: skip


def _vision_sizes(config: dict[str, Any], tokenizer: str, where: str) -> tuple[int, int]:
    """(F, N): the feature size and patches per image of the official config, checked against ``tokenizer``."""
    feature_dim = int(config.get("contiguous_signal_size", 4096))
    patches = int(config.get("max_vision_token_length", 578)) - 2
    if tokenizer:
        from vlpretrain.libra.tokenizer_task import load_visual_tokenizer

        tok = load_visual_tokenizer(tokenizer, VisualCodesConfig())
        ours = (tok.feature_dim, tok.num_patches + 2, tok.cfg.codebook_size + 2, tok.cfg.num_codebooks)
        theirs = (feature_dim, patches + 2, int(config.get("vision_vocab_size", 514)),
                  int(config.get("vision_codebook_num", 2)))  # fmt: skip
        if ours != theirs:
            raise UserError(f"{where}: contiguous_signal_size, max_vision_token_length, vision_vocab_size, "
                            f"vision_codebook_num = {theirs} do not fit --tokenizer {tokenizer} ({ours})")  # fmt: skip
    return feature_dim, patches


def _map(source: dict[str, Tensor], path: Path, expected: dict[str, Tensor], rules: list[KeyRule],
         dtype: torch.dtype) -> tuple[dict[str, Tensor], list[str]]:  # fmt: skip
    """Map every official key; returns (our key -> tensor, official keys known but unused)."""
    mapped = map_source(source, lambda key: rule_for(rules, "lm", key), expected, dtype)
    problems = mapped.problems()
    missing = sorted(k for keys in missing_by_source(rules, expected, mapped.provided).values() for k in keys)
    if missing and not problems:
        problems.append(f"keys no official file provides: {listed(missing)}")
    if problems:
        raise UserError(f"{path}: official Libra weights do not fit: " + "; ".join(problems))
    return mapped.state, list(mapped.unused)


def convert_libra(official_dir: str | Path, out_dir: str | Path, tokenizer: str = "",
                  dtype: str = "float32") -> Path:  # fmt: skip
    """Convert an official Libra folder into a ``libra-instruct`` folder (see the module docstring).

    Args:
        official_dir: the official checkpoint folder (``config.json``, weights, tokenizer files).
        out_dir: the folder to write (``config.json``, ``model.safetensors``, ``text_tokenizer/``).
        tokenizer: a ``libra-tokenizer`` folder to record (its sizes must match); "" = the ``paper`` sizes.
        dtype: storage dtype of the weights.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    folder, out = Path(official_dir), Path(out_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json (expected an official Libra checkpoint folder)")
    official = json.loads((folder / "config.json").read_text())
    where = str(folder / "config.json")
    cfg = config_from_official(official, where, _tokenizer_codes(tokenizer))
    feature_dim, _ = _vision_sizes(official, tokenizer, where)
    copy_text_tokenizer(folder, out / TEXT_TOKENIZER_DIR, TOKENIZER_FILES)
    text_tokenizer = load_libra_text_tokenizer(str(out / TEXT_TOKENIZER_DIR))
    newline_id(text_tokenizer)  # Libra needs a single newline token (LLaMA's 13)
    vocab = VisualVocab(int(official["vocab_size"]), cfg.codes.codebook_size, cfg.codes.num_codebooks)
    holder = nn.Module()  # the task's key layout (model.lm.*, model.vision.*) without its tokenizers
    with torch.device("meta"):
        holder.model = LibraLM(build_llama(cfg.llm, vocab.text_size), vocab, feature_dim, cfg.down_ratio,
                               cfg.bridge_rank)  # fmt: skip
    rules = key_rules(cfg.llm.num_layers)
    state, unused = _map(read_weights(folder), folder, holder.state_dict(), rules, DTYPES[dtype])
    holder.load_state_dict(state, strict=True, assign=True)
    cfg.text_tokenizer = TEXT_TOKENIZER_DIR  # relative: resolved against the folder when loading
    cfg.tokenizer = str(Path(tokenizer).resolve()) if tokenizer else ""
    report = {"source": str(folder), "unused_keys": unused, "dtype": dtype,
              "parameters": sum(p.numel() for p in holder.parameters())}  # fmt: skip
    return save_task(holder, INSTRUCT, cfg, out, extra={"converted_from": report})


def _tokenizer_codes(tokenizer: str) -> VisualCodesConfig:
    return folder_model_config(tokenizer, "libra-tokenizer", "--tokenizer") if tokenizer else codes_paper()


def export_official(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Our ``model.*`` state dict -> official key names (the inverse of the conversion; unused keys omitted)."""
    rules = key_rules(num_layers)
    return {official_name(rules, key)[1]: value for key, value in state.items() if key.startswith("model.")}


def conversion_summary(out_dir: str | Path) -> str:
    """One line describing a converted folder (from its ``config.json``)."""
    config, info = conversion_record(out_dir)
    llm = config["model"]["llm"]
    return (f"converted {info['source']} -> {out_dir}: {info['parameters']:,} parameters ({info['dtype']}), LLaMA "
            f"{llm['num_layers']} x {llm['hidden_size']}, tokenizer {config['model']['tokenizer'] or '(paper sizes)'}"
            f"; unused official keys: {len(info['unused_keys'])}")  # fmt: skip


__all__ = ["config_from_official", "conversion_summary", "convert_libra", "export_official", "key_rules"]
