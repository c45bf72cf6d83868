"""Task ``text-lm``: a LLaMA language model on the captions (and optionally QA) of pair shards.

The smallest real training stage: the engine's tests and benchmarks use it, Libra's demo pretrains its frozen LM with
it, and it is what LaVIT's text-only mixture looks like. Loss = summed next-token cross-entropy over caption tokens
(BOS excluded as a target, padding ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.configs import ConfigError, register_preset
from vlpretrain.core.llm import LlamaSpec, build_llama, non_embedding_params
from vlpretrain.core.text_tokenizer import load_text_tokenizer
from vlpretrain.train.flops import transformer_flops_per_token

IGNORE = -100


@dataclass
class TextLMConfig:
    """Model and text settings of the ``text-lm`` task.

    Args:
        llm: the decoder's size (or a local HF folder).
        tokenizer: "shapes-world" (built in) or a local HF tokenizer folder.
        max_len: tokens per row (captions are cut to this, then padded).
        with_qa: also train on "question answer" strings from the shards' JSON records.
    """

    llm: LlamaSpec = field(default_factory=LlamaSpec)
    tokenizer: str = "shapes-world"
    max_len: int = 64
    with_qa: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.max_len <= self.llm.max_positions:
            raise ConfigError(f"max_len: {self.max_len} must be in 2..llm.max_positions ({self.llm.max_positions})")


@register_preset("text-lm", "tiny")
def text_lm_tiny() -> TextLMConfig:
    """About 0.1M parameters: tests and the CPU demo."""
    return TextLMConfig()


@register_preset("text-lm", "small")
def text_lm_small() -> TextLMConfig:
    """About 3M parameters: benchmarks and longer CPU runs."""
    return TextLMConfig(
        llm=LlamaSpec(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=8)
    )


class TextCollate:
    """Raw shard sample -> text, and a list of texts -> padded ``input_ids``/``labels`` [B, T] (picklable)."""

    def __init__(self, tokenizer: Any, max_len: int, with_qa: bool) -> None:
        self.tokenizer, self.max_len, self.with_qa = tokenizer, max_len, with_qa

    def decode(self, sample: dict[str, Any]) -> str:
        """The training text of one sample: its caption, plus its QA pairs when ``with_qa``."""
        if "txt" not in sample:
            raise ValueError("sample has no caption (.txt)")
        text = _as_str(sample["txt"])
        if self.with_qa and "json" in sample:
            qa = json.loads(_as_str(sample["json"])).get("qa", [])
            text += " " + " ".join(f"{q['question']} {q['answer']}" for q in qa)
        return text

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        bos, eos, pad = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ids = [[bos, *self.tokenizer(t, add_special_tokens=False).input_ids, eos][: self.max_len] for t in texts]
        input_ids = torch.full((len(ids), self.max_len), pad, dtype=torch.long)  # (B, T)
        labels = torch.full((len(ids), self.max_len), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(ids), self.max_len), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, 1 : len(row)] = torch.tensor(row[1:])  # BOS is never a target
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TextLMTask(nn.Module):
    """LLaMA + summed next-token loss on caption text."""

    config_cls = TextLMConfig
    target_unit = "tok"

    def __init__(self, cfg: TextLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = load_text_tokenizer(cfg.tokenizer)
        self.lm = build_llama(cfg.llm, vocab_size=len(self.tokenizer))
        self.collate = TextCollate(self.tokenizer, cfg.max_len, cfg.with_qa)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Summed cross-entropy of ``labels`` [B, T] given ``input_ids`` [B, T]."""
        logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                               reduction="sum")  # fmt: skip
        return {"loss": loss}

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def flops_per_target(self) -> float:
        spec = self.lm.config
        return transformer_flops_per_token(non_embedding_params(self.lm), spec.num_hidden_layers, spec.hidden_size,
                                           self.cfg.max_len)  # fmt: skip

    def shard_units(self) -> list[nn.Module]:
        return list(self.lm.model.layers)

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any:
        from vlpretrain.train.streams import pair_dataset

        return pair_dataset(data_cfg, split, rank, world_size, decode=self.collate.decode, collate=self.collate)

    @torch.no_grad()
    def sample(self, prompt: str = "three objects:", max_new_tokens: int = 32) -> dict[str, str]:
        """Greedy continuation of ``prompt`` (logged by the loop's sample phase)."""
        ids = [self.tokenizer.bos_token_id, *self.tokenizer(prompt, add_special_tokens=False).input_ids]
        out = self.lm.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return {prompt: self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)}
