"""LCL's token ids: the text tokenizer's vocabulary plus three image tokens.

An image enters a sequence as ``<soi>`` + N placeholders ``<img>`` + ``<eoi>``; the placeholders' embeddings are
replaced by the image's projected patch tokens. ``<sot>``/``<eot>`` are the tokenizer's BOS/EOS and ``pad`` its
padding id (0 in both the shapes-world and the official vocabulary; padding is embedded like any token and, being
at the end of a row under a causal mask, never seen by a real token).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from vlpretrain.configs import ConfigError
from vlpretrain.lcl.config import LCLConfig


@dataclass(frozen=True)
class LCLVocab:
    """Special token ids and the embedding table size."""

    pad: int
    sot: int
    eot: int
    img: int
    soi: int
    eoi: int
    size: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> LCLVocab:
        """pad/sot/eot from the tokenizer; img, soi, eoi appended after its vocabulary."""
        ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if any(i is None for i in ids):
            raise ConfigError("tokenizer: needs pad, bos (<sot>) and eos (<eot>) tokens for LCL sequences")
        n = len(tokenizer)
        return cls(pad=ids[0], sot=ids[1], eot=ids[2], img=n, soi=n + 1, eoi=n + 2, size=n + 3)


@functools.cache
def _cached_tokenizer(spec: str) -> Any:
    from vlpretrain.core.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(spec)


def load_tokenizer(spec: str) -> Any:
    """The text tokenizer named by ``spec`` (cached per process: the built-in one is trained on first use)."""
    return _cached_tokenizer(spec) if spec else None


def build_vocab(cfg: LCLConfig, tokenizer: Any) -> LCLVocab:
    """The vocabulary of ``cfg``: explicit ``special_ids`` when given, else derived from ``tokenizer``."""
    if cfg.special_ids:
        ids = cfg.special_ids
        if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
            raise ConfigError(f"vocab_size: {cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        return LCLVocab(ids["pad"], ids["sot"], ids["eot"], ids["img"], ids["soi"], ids["eoi"], cfg.vocab_size)
    return LCLVocab.from_tokenizer(tokenizer)


__all__ = ["LCLVocab", "build_vocab", "load_tokenizer"]
