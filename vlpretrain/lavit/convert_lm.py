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
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlpretrain.configs import get_preset
from vlpretrain.core.key_rules import KeyRule, our_key, rule_for
from vlpretrain.core.llm import LlamaSpec
from vlpretrain.core.vit import read_state_dict
from vlpretrain.errors import UserError
from vlpretrain.lavit.lm_task import TASK, LavitLMTask
from vlpretrain.lavit.model import LavitLMConfig, spec_from_hf_config
from vlpretrain.lavit.tokenizer import DynamicTokenizer, TokenizerConfig
from vlpretrain.train.pretrained import save_task

SUBFOLDER = "language_model"
VISUAL_FILE = "visual_weight.bin"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")  # fmt: skip
TEXT_TOKENIZER_DIR = "text_tokenizer"
OURS_ONLY = frozenset({"tokenizer_digest"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_LISTED = 8


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
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for name in INDEX_FILES:
        if (folder / name).is_file():
            try:
                shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as err:
                raise UserError(f"{folder / name}: not an HF weights index ({err})") from err
            state: dict[str, Tensor] = {}
            for shard in shards:
                state |= read_state_dict(folder / shard)
            return state
    raise UserError(f"{folder}: no LLaMA weights ({' or '.join(WEIGHT_FILES + INDEX_FILES)})")


def _language_model_folder(official_dir: Path) -> Path:
    if not official_dir.is_dir():
        raise UserError(f"{official_dir}: no such folder (expected the official LaVIT checkpoint)")
    folder = official_dir / SUBFOLDER if (official_dir / SUBFOLDER).is_dir() else official_dir
    missing = [str(folder / f) for f in ("config.json", VISUAL_FILE) if not (folder / f).is_file()]
    if missing:
        raise UserError(f"official LaVIT language model: missing {', '.join(missing)}")
    return folder


def _copy_text_tokenizer(folder: Path, out: Path) -> Path:
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not any(f.name in ("tokenizer.model", "tokenizer.json") for f in files):
        raise UserError(f"{folder}: no text tokenizer (tokenizer.model or tokenizer.json)")
    target = out / TEXT_TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, target / f.name)
    return target


def _visual_tokenizer_config(tokenizer: str) -> TokenizerConfig:
    """The sizes of the recorded lavit-tokenizer folder (the ``paper`` preset when none is given)."""
    import vlpretrain.lavit.tokenizer_task  # noqa: F401  (registers the lavit-tokenizer presets)

    if not tokenizer:
        return get_preset("lavit-tokenizer", "paper")
    from vlpretrain.train.task import model_config_from_dict

    config_file = Path(tokenizer) / "config.json"
    if not config_file.is_file():
        raise UserError(f"--tokenizer: {tokenizer}: not a lavit-tokenizer folder (no config.json)")
    config = json.loads(config_file.read_text())
    if config.get("task") != "lavit-tokenizer":
        raise UserError(f"--tokenizer: {tokenizer}: a '{config.get('task')}' folder, not a lavit-tokenizer")
    return model_config_from_dict("lavit-tokenizer", config["model"])


def _map(sources: dict[str, tuple[Path, dict[str, Tensor]]], expected: dict[str, Tensor],
         dtype: torch.dtype) -> tuple[dict[str, Tensor], list[str]]:  # fmt: skip
    """Map every source key; returns (our key -> tensor, official keys known but unused). Errors list all problems."""
    state: dict[str, Tensor] = {}
    unused: list[str] = []
    problems: list[str] = []
    for file, (path, source) in sources.items():
        unexpected, mismatched = [], []
        for key in list(source):
            value = source.pop(key)
            rule = _rule(file, key)
            if rule is not None and rule.ours is None:
                unused.append(key)
                continue
            ours = our_key(rule, key) if rule is not None else None
            if ours not in expected:
                unexpected.append(key)
            elif value.shape != expected[ours].shape:
                mismatched.append(f"{key}: file {tuple(value.shape)}, model {tuple(expected[ours].shape)}")
            else:
                state[ours] = value.to(dtype).contiguous()
        if unexpected:
            problems.append(f"{path}: unexpected keys {_listed(sorted(unexpected))}")
        if mismatched:
            problems.append(f"{path}: shapes differ: {_listed(mismatched)}")
    missing = sorted(set(expected) - set(state) - OURS_ONLY)
    if missing and not problems:
        problems.append(f"keys no official file provides: {_listed(missing)}")
    if problems:
        raise UserError("official LaVIT language model does not fit: " + "; ".join(problems))
    return state, unused


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


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
    text_dir = _copy_text_tokenizer(folder, out)
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
    config = json.loads((Path(out_dir) / "config.json").read_text())
    info: dict[str, Any] = config.get("converted_from") or {}
    if not info:
        raise UserError(f"{out_dir}/config.json: not written by the converter (no converted_from)")
    model = config["model"]
    return (f"converted {info['source']} -> {out_dir}: {info['parameters']:,} parameters ({info['dtype']}), "
            f"LLaMA {model['llm']['num_layers']} x {model['llm']['hidden_size']}, tokenizer "
            f"{model['tokenizer'] or '(give one when loading)'}; unused official keys: "
            f"{', '.join(info['unused_keys']) or 'none'}")  # fmt: skip


__all__ = ["KEY_RULES", "conversion_summary", "convert_lm", "llm_spec", "read_llm_weights"]
