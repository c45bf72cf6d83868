"""Convert the official LaVIT language model into a ``lavit-lm`` folder that :func:`load_lm` reads.

The official checkpoint keeps it in ``language_model/`` (docs/lavit.md section 11):

- an HF LLaMA folder: ``config.json`` (vocabulary 48386 = 32000 text + ``[IMG]``, ``[/IMG]`` + 16384 codes), the
  weights (``model.safetensors``, ``pytorch_model.bin`` or the shards an ``*.index.json`` names) and the text
  tokenizer's files;
- ``visual_weight.bin``: the understanding path fine-tuned with the LM, i.e. the token merger (``causal_encoder.*``)
  and ``vit_proj.*`` (Linear(1408, 4096)), loaded over the tokenizer's merger by the official code.

Every key is mapped by one explicit rule of :data:`KEY_RULES`; a key no rule covers, a model key no file provides and
a shape that differs from the config read from ``config.json`` are errors naming the file, the key and both shapes.
The LLaMA's dimensions come from its ``config.json``; settings our builder cannot express (another activation,
biases, RoPE scaling, another head size) are refused. The text tokenizer's files are copied to
``OUT_DIR/text_tokenizer/`` (reading LLaMA's ``tokenizer.model`` without a ``tokenizer.json`` needs the
``sentencepiece`` package). The visual tokenizer is the separately converted ``lavit-tokenizer`` folder
(``--tokenizer``), recorded in the config; the converted folder carries an all-zero tokenizer digest (unknown, not
checked).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from vlpretrain.configs import get_preset
from vlpretrain.core.key_rules import KeyRule, listed, map_source, rule_for
from vlpretrain.core.llm import LlamaSpec
from vlpretrain.core.official_files import copy_text_tokenizer, official_folder, read_hf_weights
from vlpretrain.core.vit import read_state_dict
from vlpretrain.errors import UserError
from vlpretrain.lavit.lm_task import TASK, LavitLMTask
from vlpretrain.lavit.model import LavitLMConfig, spec_from_hf_config
from vlpretrain.lavit.tokenizer import DynamicTokenizer, TokenizerConfig
from vlpretrain.train.pretrained import conversion_record, folder_model_config, save_task

SUBFOLDER = "language_model"
VISUAL_FILE = "visual_weight.bin"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")  # fmt: skip
TEXT_TOKENIZER_DIR = "text_tokenizer"
OURS_ONLY = frozenset({"tokenizer_digest"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("llm", "", "lm."),
    KeyRule("llm", "model.rotary_emb.inv_freq", None),  # a buffer older transformers saved; recomputed here
    KeyRule("visual", "causal_encoder.", "visual.merger."),
    KeyRule("visual", "vit_proj.", "visual.vit_proj."),
)


def _rule(file: str, key: str) -> KeyRule | None:
    if file == "llm" and key.endswith("self_attn.rotary_emb.inv_freq"):
        return KeyRule("llm", key, None)  # the per-layer form of the same buffer
    return rule_for(KEY_RULES, file, key)


def llm_spec(config_file: Path) -> LlamaSpec:
    """The :class:`LlamaSpec` of an HF LLaMA ``config.json``; settings the builder cannot express are refused."""
    from transformers import LlamaConfig

    return spec_from_hf_config(LlamaConfig.from_pretrained(str(config_file.parent), local_files_only=True),
                               where=str(config_file))  # fmt: skip


def read_llm_weights(folder: Path) -> dict[str, Tensor]:
    """The flat state dict of an HF model folder (one weights file, or the shards an index names)."""
    return read_hf_weights(folder, WEIGHT_FILES, INDEX_FILES, what="LLaMA weights")


def _language_model_folder(official_dir: Path) -> Path:
    folder = official_folder(official_dir, "the official LaVIT checkpoint", SUBFOLDER)
    missing = [str(folder / f) for f in ("config.json", VISUAL_FILE) if not (folder / f).is_file()]
    if missing:
        raise UserError(f"official LaVIT language model: missing {', '.join(missing)}")
    return folder


def _visual_tokenizer_config(tokenizer: str) -> TokenizerConfig:
    """The sizes of the recorded lavit-tokenizer folder (the ``paper`` preset when none is given)."""
    import vlpretrain.lavit.tokenizer_task  # noqa: F401  (registers the lavit-tokenizer presets)

    if not tokenizer:
        return get_preset("lavit-tokenizer", "paper")
    return folder_model_config(tokenizer, "lavit-tokenizer", "--tokenizer")


def _map(sources: dict[str, tuple[Path, dict[str, Tensor]]], expected: dict[str, Tensor],
         dtype: torch.dtype) -> tuple[dict[str, Tensor], list[str]]:  # fmt: skip
    """Map every source key; returns (our key -> tensor, official keys known but unused). Errors list all problems."""
    state: dict[str, Tensor] = {}
    unused: list[str] = []
    problems: list[str] = []
    for file, (path, source) in sources.items():
        mapped = map_source(source, partial(_rule, file), expected, dtype, consume=True)
        state |= mapped.state
        unused += list(mapped.unused)
        problems += [f"{path}: {problem}" for problem in mapped.problems()]
    missing = sorted(set(expected) - set(state) - OURS_ONLY)
    if missing and not problems:
        problems.append(f"keys no official file provides: {listed(missing)}")
    if problems:
        raise UserError("official LaVIT language model does not fit: " + "; ".join(problems))
    return state, unused


def convert_lm(official_dir: str | Path, out_dir: str | Path, tokenizer: str = "", dtype: str = "float32",
               max_len: int = 2048) -> Path:  # fmt: skip
    """Convert ``language_model/`` into a ``lavit-lm`` folder.

    Args:
        official_dir: the official checkpoint folder (holding ``language_model/``) or that subfolder.
        out_dir: the folder to write (``config.json``, ``model.safetensors``, ``text_tokenizer/``).
        tokenizer: the converted ``lavit-tokenizer`` folder to record (its sizes shape the merger); "" = the
            ``paper`` sizes, and the tokenizer must be given when loading.
        dtype: storage dtype of the weights ("float32", "bfloat16" or "float16"; loading casts to the model's).
        max_len: the context recorded as ``max_len`` (the paper's sequence length, 2048).

    Raises:
        UserError: a missing folder or file, unreadable files, unexpected or missing keys, shape mismatches, a
            LLaMA our builder cannot express, or a vocabulary that is not text + 2 + codes.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    folder = _language_model_folder(Path(official_dir))
    out = Path(out_dir)
    spec = llm_spec(folder / "config.json")
    tok_cfg = _visual_tokenizer_config(tokenizer)
    text_dir = copy_text_tokenizer(folder, out / TEXT_TOKENIZER_DIR, TOKENIZER_FILES)
    cfg = LavitLMConfig(llm=spec, text_tokenizer=str(text_dir), tokenizer=str(Path(tokenizer).resolve()) if tokenizer
                        else "", max_len=min(max_len, spec.max_positions), qa_ratio=0.0)  # fmt: skip
    with torch.device("meta"):
        task = LavitLMTask(cfg, DynamicTokenizer(tok_cfg))
    rows = json.loads((folder / "config.json").read_text()).get("vocab_size")
    if rows != task.vocab.size:
        raise UserError(f"{folder / 'config.json'}: vocab_size {rows}, but text ({task.vocab.text_size}) + 2 + "
                        f"{task.vocab.codebook_size} codes = {task.vocab.size}")  # fmt: skip
    expected = {k: v for k, v in task.state_dict().items() if k not in OURS_ONLY}
    visual_file = folder / VISUAL_FILE
    sources = {"llm": (folder, read_llm_weights(folder)), "visual": (visual_file, read_state_dict(visual_file))}
    state, unused = _map(sources, expected, DTYPES[dtype])
    state["tokenizer_digest"] = torch.zeros_like(task.tokenizer_digest, device="cpu")
    task.load_state_dict(state, strict=True, assign=True)
    cfg.text_tokenizer = TEXT_TOKENIZER_DIR  # relative: resolved against the folder when loading
    report = {"source": str(folder), "unused_keys": unused, "dtype": dtype,
              "parameters": sum(p.numel() for p in task.parameters())}  # fmt: skip
    return save_task(task, TASK, cfg, out, extra={"converted_from": report})


def conversion_summary(out_dir: str | Path) -> str:
    """One line describing a converted folder (from its ``config.json``)."""
    config, info = conversion_record(out_dir)
    model = config["model"]
    return (f"converted {info['source']} -> {out_dir}: {info['parameters']:,} parameters ({info['dtype']}), "
            f"LLaMA {model['llm']['num_layers']} x {model['llm']['hidden_size']}, tokenizer "
            f"{model['tokenizer'] or '(give one when loading)'}; unused official keys: "
            f"{', '.join(info['unused_keys']) or 'none'}")  # fmt: skip


__all__ = ["KEY_RULES", "conversion_summary", "convert_lm", "llm_spec", "read_llm_weights"]
