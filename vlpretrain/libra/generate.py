"""Greedy text generation with Libra: KV-cached captioning and question answering.

- Prompts (:mod:`vlpretrain.libra.sequences`): captioning ``<s> [img] \\n`` (the official raw prompt: the image, a
  newline, no instruction), VQA the Vicuna-v1 question prompt. Both end on a text token, so every generated token
  comes from ``lm_head`` (image slots are -inf there officially: a text position never writes an image). The
  official forces ``\\n`` after a generated ``<eoi>`` on cached steps; our prompts already end with it.
- Batches are left-padded; position ids are ``arange`` over the padded row, as officially (RoPE sees only
  differences, so real tokens get the same attention as alone). Generation stops at ``</s>`` or after
  ``max_new_tokens``.
- ``use_cache=True`` keeps an HF ``DynamicCache`` (both key/value views per layer, see :mod:`~vlpretrain.libra.
  model`) and feeds one token per step; ``use_cache=False`` recomputes the whole sequence every step (the reference
  the cache is tested against).

Shape letters: C streams, B prompts, L positions, F feature size.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from vlpretrain.errors import UserError
from vlpretrain.libra.sequences import Segment, assemble, caption_prompt, fill_images, question_prompt
from vlpretrain.libra.text import ChatTemplate

if TYPE_CHECKING:
    from vlpretrain.libra.lm_task import LibraLMTask

_SPACE_BEFORE_PUNCT = re.compile(r" ([.,:;?!'])")


@torch.no_grad()
def generate_ids(task: LibraLMTask, prompts: list[list[Segment]], images_B3HW: Tensor, max_new_tokens: int,
                 use_cache: bool = True) -> list[list[int]]:  # fmt: skip
    """Greedy continuations (ids, ``</s>`` excluded) of prompts whose image b is ``images[b]``."""
    vocab, limit = task.vocab, task.model.lm.config.max_position_embeddings
    asm = assemble(prompts, vocab, task.tokenizer.num_patches, limit, task.ids["pad"], task.ids["bos"], left_pad=True)
    if asm.ids_BL.shape[1] + max_new_tokens > limit:
        raise UserError(f"prompt ({asm.ids_BL.shape[1]} tokens) + {max_new_tokens} new tokens exceed the model's "
                        f"{limit} positions")  # fmt: skip
    codes_BCN, feats_BNF = task.tokenize_images(images_B3HW)
    ids_CBL, feats_BLF, _ = fill_images(asm, codes_BCN, feats_BNF, vocab)
    mask_BL = asm.attention_mask_BL.to(ids_CBL.device)
    cache = DynamicCache(config=task.model.lm.config) if use_cache else None
    step_ids, step_feats = ids_CBL, feats_BLF
    done = torch.zeros(len(prompts), dtype=torch.bool, device=ids_CBL.device)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        hidden = task.model(step_ids, step_feats, mask_BL, cache).hidden_BLH
        next_B = task.model.text_logits(hidden[:, -1]).float().argmax(-1)
        done |= next_B == task.ids["eos"]
        for b in (~done).nonzero().flatten().tolist():
            out[b].append(int(next_B[b]))
        if bool(done.all()):
            break
        next_CB1 = next_B.masked_fill(done, task.ids["pad"])[None, :, None].expand(vocab.num_codebooks, -1, -1)
        mask_BL = torch.cat([mask_BL, mask_BL.new_ones(len(prompts), 1)], dim=1)
        if use_cache:
            step_ids, step_feats = next_CB1, None
        else:
            ids_CBL = torch.cat([ids_CBL, next_CB1], dim=-1)
            feats_BLF = torch.cat([feats_BLF, feats_BLF.new_zeros(len(prompts), 1, feats_BLF.shape[-1])], dim=1)
            step_ids, step_feats = ids_CBL, feats_BLF
    return out


def decode_words(tokenizer: object, ids: list[int]) -> str:
    """Text of generated ids (special tokens dropped; a word-level tokenizer's spaces before punctuation removed)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def caption_images(task: LibraLMTask, images_B3HW: Tensor, max_new_tokens: int = 64,
                   use_cache: bool = True) -> list[str]:  # fmt: skip
    """A caption per image (stage-1 prompt)."""
    prompt = caption_prompt(task.ids["bos"], task.ids["newline"])
    ids = generate_ids(task, [prompt] * len(images_B3HW), images_B3HW, max_new_tokens, use_cache)
    return [decode_words(task.text_tokenizer, row) for row in ids]


def answer_questions(task: LibraLMTask, images_B3HW: Tensor, questions: list[str], max_new_tokens: int = 8,
                     use_cache: bool = True) -> list[str]:  # fmt: skip
    """An answer per (image, question) pair (Vicuna-v1 prompt)."""
    if len(questions) != len(images_B3HW):
        raise ValueError(f"{len(questions)} questions for {len(images_B3HW)} images")
    t = ChatTemplate(task.text_tokenizer)
    prompts = [question_prompt(task.ids["bos"], task.ids["newline"], t.system, t.user, t.assistant, t.encode(q))
               for q in questions]  # fmt: skip
    ids = generate_ids(task, prompts, images_B3HW, max_new_tokens, use_cache)
    return [decode_words(task.text_tokenizer, row) for row in ids]


__all__ = ["answer_questions", "caption_images", "decode_words", "generate_ids"]
