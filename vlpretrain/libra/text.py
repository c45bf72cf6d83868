"""Text side of Libra's sequences: the demo's word-level tokenizer and the Vicuna-v1 chat template.

- ``shapes-world-libra``: the shapes-world word-level vocabulary (:mod:`vlpretrain.core.text_tokenizer`) plus the
  words of the Vicuna-v1 template, lower-casing its input, plus a ``"\\n"`` token: Libra separates an image from the
  text after it by a newline (LLaMA's id 13), which a whitespace pre-tokenizer would otherwise drop. Save it with
  :func:`save_text_tokenizer` so the text-only LM stage (``text-lm``) and Libra share one vocabulary.
- Vicuna v1 (the official ``conv_vicuna_v1``): ``{system} USER: {q_1} ASSISTANT: {a_1}</s>USER: {q_2} ...``, the
  image and a newline at the start of the first user message; only the answers and their ``</s>`` are targets.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from vlpretrain.configs import ConfigError
from vlpretrain.core.text_tokenizer import load_text_tokenizer, shapes_world_texts, train_word_tokenizer

BUILTIN = "shapes-world-libra"
NEWLINE = "\n"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
CAPTION_REQUEST = "Describe the image."


@functools.lru_cache(maxsize=1)
def _builtin() -> Any:
    template = f"{VICUNA_SYSTEM} {USER}: {ASSISTANT}: {CAPTION_REQUEST}"
    tok = train_word_tokenizer([*shapes_world_texts(), template], lowercase_inputs=True)
    tok.add_tokens([AddedToken(NEWLINE, normalized=False, special=False)])
    return tok


def load_libra_text_tokenizer(spec: str) -> Any:
    """``"shapes-world-libra"`` (built in, see the module docstring) or a local HF tokenizer folder."""
    if not spec:
        raise ConfigError("text_tokenizer: empty; give 'shapes-world-libra' or a local tokenizer folder")
    if spec == BUILTIN:
        import copy

        return copy.deepcopy(_builtin())
    return load_text_tokenizer(spec)


def save_text_tokenizer(spec: str, out_dir: str | Path) -> Path:
    """Write the tokenizer ``spec`` names as an HF folder (what ``text-lm``'s ``tokenizer`` field reads)."""
    out = Path(out_dir)
    load_libra_text_tokenizer(spec).save_pretrained(str(out))
    return out


def newline_id(tokenizer: Any) -> int:
    """The single id of ``"\\n"``; a tokenizer that splits or drops it cannot separate image and text."""
    ids = tokenizer(NEWLINE, add_special_tokens=False).input_ids
    if len(ids) == 2 and tokenizer.convert_ids_to_tokens(ids[0]) in ("▁", "Ġ"):  # LLaMA: a space piece, then 13
        ids = ids[1:]
    if len(ids) != 1:
        raise ConfigError(f"text_tokenizer: '\\n' is not one token (got ids {ids}); Libra needs a newline token")
    return int(ids[0])


class ChatTemplate:
    """Token ids of the Vicuna-v1 parts (a tokenizer's view of the template)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.system = self.encode(VICUNA_SYSTEM)
        self.user = self.encode(f"{USER}:")
        self.assistant = self.encode(f"{ASSISTANT}:")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)


__all__ = [
    "ASSISTANT",
    "BUILTIN",
    "CAPTION_REQUEST",
    "ChatTemplate",
    "NEWLINE",
    "USER",
    "VICUNA_SYSTEM",
    "load_libra_text_tokenizer",
    "newline_id",
    "save_text_tokenizer",
]
