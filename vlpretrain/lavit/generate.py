"""Inference with the unified LM: captions, answers, and images as visual codes.

- Captioning: the image alone (``[IMG] v [/IMG]``, continuous tokens), beam search (2 beams, 8-36 new tokens),
  ``[IMG]``, ``[/IMG]`` and every code id suppressed, cut at the first '.'.
- VQA: image + ``"Question: {q} Answer:"`` (:func:`~vlpretrain.lavit.sequences.vqa_prompt`), 5 beams, 1-10 new tokens,
  cut at the first ',', '.' or newline.
- Text-to-image: prompt ids + ``[IMG]``; at every step the next code is drawn from classifier-free-guided log-probs
  ``g * (logp_cond - logp_uncond) + logp_uncond``, the unconditional context being ``[IMG]`` alone followed by the
  same generated codes; only codes (and ``[/IMG]`` once ``min_tokens`` are out) are allowed; then temperature, top-k
  and top-p. Conditional and unconditional rows run in ONE batched forward pass with a KV cache
  (``batched_cfg=False`` / ``use_cache=False`` give the reference paths the tests and benchmarks compare with).
- Multimodal prompts: image code ids (no ``[IMG]`` wrappers) + text ids + ``[IMG]`` (:func:`text_to_image_prompt`).

Batches are left-padded; position ids count real tokens only, so a prompt gives the same result alone or in a batch.
Shape letters: B prompts, P prompt length, H LM width, V vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, GenerationConfig

from vlpretrain.lavit.model import LavitLM
from vlpretrain.lavit.sequences import vqa_prompt

OFFICIAL_PATCHES = 256  # the official visual-length limits (20..200) are for N = 256 patches


def visual_length_limits(num_patches: int) -> tuple[int, int]:
    """The official 20..200 visual tokens per image, scaled to a tokenizer of ``num_patches`` patches."""
    low = max(1, round(20 * num_patches / OFFICIAL_PATCHES))
    return low, max(low, round(200 * num_patches / OFFICIAL_PATCHES))


@dataclass
class SamplingConfig:
    """Text-to-image sampling (official defaults: top-k 50, top-p 1.0, temperature 1, guidance 4.0; 5.0 for
    multimodal prompts). ``min_tokens``/``max_tokens`` None = :func:`visual_length_limits` of the tokenizer."""

    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    guidance_scale: float = 4.0
    min_tokens: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.top_k < 0 or not 0 < self.top_p <= 1 or self.temperature <= 0 or self.guidance_scale < 0:
            raise ValueError("top_k >= 0, 0 < top_p <= 1, temperature > 0 and guidance_scale >= 0 are required")


@dataclass
class CodeOutput:
    """Generated images as codes (0..K-1, [K_b] each); ``scores`` [B, T, V]: the guided log-probs of each step."""

    codes: list[Tensor]
    scores: Tensor | None = None


def clean_text(text: str) -> str:
    """Word-level decodes put spaces before punctuation ("top left ."); remove them."""
    return re.sub(r"\s+([.,:;?!])", r"\1", text).strip()


def text_to_image_prompt(model: LavitLM, text: str, image_codes: Tensor | None = None) -> list[int]:
    """``[image code ids] text ids [IMG]``: a text-to-image prompt, or a multimodal one when codes are given."""
    head = model.vocab.code_ids(image_codes).tolist() if image_codes is not None else []
    return [*head, *model.encode_text(text), model.vocab.img_start]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [B, P], attention mask [B, P], position ids [B, P]) of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class _Stream:
    """One set of rows decoded together: keeps ids, mask, positions and (optionally) the KV cache."""

    def __init__(self, model: LavitLM, prompts: list[list[int]], use_cache: bool) -> None:
        self.model, self.use_cache = model, use_cache
        self.ids, self.mask, self.positions = left_pad(prompts, model.pad_id, model.device)
        self.cache = DynamicCache(config=model.lm.config) if use_cache else None
        self.fed = 0  # tokens already in the cache

    def next_logits(self) -> Tensor:
        """Logits [rows, V] of the next token (only the new tokens run when caching)."""
        start = self.fed if self.use_cache else 0
        out = self.model.lm(input_ids=self.ids[:, start:], attention_mask=self.mask,
                            position_ids=self.positions[:, start:], past_key_values=self.cache,
                            use_cache=self.use_cache)  # fmt: skip
        self.fed = self.ids.shape[1]
        return out.logits[:, -1].float()

    def append(self, tokens: Tensor) -> None:
        """Add one token per row."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)


def guided_logprobs(cond_logits: Tensor, uncond_logits: Tensor | None, scale: float) -> Tensor:
    """``scale * (logp_cond - logp_uncond) + logp_uncond`` on log-softmaxed logits [B, V] (cond alone if no uncond)."""
    cond = F.log_softmax(cond_logits.float(), dim=-1)
    if uncond_logits is None:
        return cond
    uncond = F.log_softmax(uncond_logits.float(), dim=-1)
    return scale * (cond - uncond) + uncond


def filter_logits(logits_BV: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the ``top_k`` largest (0 = all) and the smallest set whose probability reaches ``top_p``; others -inf."""
    if 0 < top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def _allowed(model: LavitLM, step: int, low: int, high: int) -> Tensor:
    """Which ids may come at this step of an image: codes before ``high`` tokens, ``[/IMG]`` from ``low`` on."""
    vocab = model.vocab
    allowed = torch.zeros(vocab.size, dtype=torch.bool, device=model.device)
    if step < high:
        allowed[vocab.code_offset :] = True
    if step >= low:
        allowed[vocab.img_end] = True
    return allowed


@torch.no_grad()
def generate_codes(model: LavitLM, prompts: list[list[int]], cfg: SamplingConfig,
                   generator: torch.Generator | list[torch.Generator], batched_cfg: bool = True, use_cache: bool = True,
                   keep_scores: bool = False) -> CodeOutput:  # fmt: skip
    """Sample one image (visual codes) per prompt; each prompt must end with ``[IMG]``.

    Args:
        model: the unified LM (eval mode).
        prompts: token ids, e.g. from :func:`text_to_image_prompt`.
        cfg: sampling settings.
        generator: CPU generator(s) drawing the tokens (advanced by this call): one for the batch, or one per prompt
            (then a prompt's image does not depend on what else is in the batch).
        batched_cfg: conditional and unconditional rows in one forward pass (False: two passes, same result).
        use_cache: decode with a KV cache (False: rerun the whole sequence every step, same result).
        keep_scores: also return the guided log-probs of every step.
    """
    if not prompts or any(not p or p[-1] != model.vocab.img_start for p in prompts):
        raise ValueError("every prompt must be non-empty and end with [IMG]")
    low, high = visual_length_limits(model.tokenizer.num_patches)
    low = cfg.min_tokens if cfg.min_tokens is not None else low
    high = cfg.max_tokens if cfg.max_tokens is not None else high
    if not 0 <= low <= high:
        raise ValueError(f"min_tokens {low} must be in 0..max_tokens ({high})")
    check_context(model, max(len(p) for p in prompts) + high + 1)
    b, guided = len(prompts), cfg.guidance_scale != 1.0
    uncond = [[model.vocab.img_start]] * b
    if guided and batched_cfg:
        streams = [_Stream(model, prompts + uncond, use_cache)]
    else:
        streams = [_Stream(model, prompts, use_cache)] + ([_Stream(model, uncond, use_cache)] if guided else [])
    out = torch.full((b, high + 1), model.vocab.img_end, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    scores = []
    for step in range(high + 1):
        logits = torch.cat([s.next_logits() for s in streams])  # (B or 2B, V)
        logp = guided_logprobs(logits[:b], logits[b:] if guided else None, cfg.guidance_scale)
        logp = logp.masked_fill(~_allowed(model, step, low, high), float("-inf"))
        if keep_scores:
            scores.append(logp.cpu())
        probs = filter_logits(logp / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
        token = _draw(probs.cpu(), generator)
        token = torch.where(done, model.vocab.img_end, token)
        out[:, step] = token
        done |= token == model.vocab.img_end
        if bool(done.all()):
            break
        fed = token.to(model.device)
        for s in streams:
            s.append(fed.repeat(s.ids.shape[0] // b))
    codes = [model.vocab.codes(row[: int((row == model.vocab.img_end).nonzero()[0])]) for row in out]
    return CodeOutput(codes, torch.stack(scores, dim=1) if keep_scores else None)


def _draw(probs_BV: Tensor, generator: torch.Generator | list[torch.Generator]) -> Tensor:
    """One token per row [B]: from a shared generator, or row b from ``generator[b]``."""
    if isinstance(generator, torch.Generator):
        return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
    if len(generator) != len(probs_BV):
        raise ValueError(f"{len(generator)} generators for {len(probs_BV)} prompts")
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs_BV, generator, strict=True)])


def check_context(model: LavitLM, needed: int) -> None:
    """ValueError when a sequence of ``needed`` tokens does not fit the model's context (``max_len``)."""
    if needed > model.cfg.max_len:
        raise ValueError(f"the prompt needs {needed} tokens with its output, more than the model's context of "
                         f"{model.cfg.max_len}")  # fmt: skip


def understanding_inputs(model: LavitLM, images_B3SS: Tensor, prompts: list[list[int]]) -> tuple[Tensor, Tensor,
                                                                                                   Tensor]:  # fmt: skip
    """Left-padded ``[IMG] v [/IMG] prompt`` embeddings [B, P, H], attention mask [B, P] and position ids [B, P]."""
    frozen = model.frozen_visual(images_B3SS, [False] * len(images_B3SS))
    visual_BKH, valid_BK = model.visual(frozen.x_BND, frozen.keep_BN)
    table = model.lm.get_input_embeddings()
    marks = table(torch.tensor([model.vocab.img_start, model.vocab.img_end], device=model.device))
    rows = []
    for b, prompt in enumerate(prompts):
        text = table(torch.tensor(prompt, dtype=torch.long, device=model.device))
        rows.append(torch.cat([marks[:1], visual_BKH[b, valid_BK[b]].to(marks.dtype), marks[1:], text]))
    width = max(len(r) for r in rows)
    embeds = marks.new_zeros(len(rows), width, marks.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=model.device)
    for b, row in enumerate(rows):
        embeds[b, width - len(row) :], mask[b, width - len(row) :] = row, 1
    return embeds, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def text_ids(model: LavitLM, images_B3SS: Tensor, prompts: list[list[int]], num_beams: int, min_new_tokens: int,
             max_new_tokens: int) -> Tensor:  # fmt: skip
    """Beam-searched new text ids [B, T'] after image + prompt; ``[IMG]``, ``[/IMG]`` and every code id suppressed."""
    embeds, mask, positions = understanding_inputs(model, images_B3SS, prompts)
    check_context(model, embeds.shape[1] + max_new_tokens)
    config = GenerationConfig(num_beams=num_beams, do_sample=False, min_new_tokens=min_new_tokens,
                              max_new_tokens=max_new_tokens, suppress_tokens=model.vocab.visual_ids(),
                              eos_token_id=model.eos_id, pad_token_id=model.pad_id, bos_token_id=None,
                              length_penalty=1.0, early_stopping=True)  # fmt: skip
    return model.lm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             generation_config=config)  # fmt: skip


def describe(model: LavitLM, images_B3SS: Tensor, prompts: list[list[int]], num_beams: int, min_new_tokens: int,
             max_new_tokens: int) -> list[str]:  # fmt: skip
    """:func:`text_ids`, decoded."""
    ids = text_ids(model, images_B3SS, prompts, num_beams, min_new_tokens, max_new_tokens)
    return [clean_text(t) for t in model.text_tokenizer.batch_decode(ids, skip_special_tokens=True)]


def caption_images(model: LavitLM, images_B3SS: Tensor, num_beams: int = 2, min_new_tokens: int = 8,
                   max_new_tokens: int = 36) -> list[str]:  # fmt: skip
    """One caption per image (cut at the first '.', as the official captioner)."""
    texts = describe(model, images_B3SS, [[] for _ in images_B3SS], num_beams, min_new_tokens, max_new_tokens)
    return [t.split(".")[0].strip() for t in texts]


def answer_questions(model: LavitLM, images_B3SS: Tensor, questions: list[str], num_beams: int = 5,
                     min_new_tokens: int = 1, max_new_tokens: int = 10) -> list[str]:  # fmt: skip
    """One answer per (image, question), with the official prompt; cut at the first newline, ',' or '.'.

    The official minimum is 2 new tokens (LLaMA's sub-words); with a word-level vocabulary a one-word answer is one
    token, so the default here is 1.
    """
    if len(questions) != len(images_B3SS):
        raise ValueError(f"{len(images_B3SS)} images but {len(questions)} questions")
    prompts = [model.encode_text(vqa_prompt(q)) for q in questions]
    texts = describe(model, images_B3SS, prompts, num_beams, min_new_tokens, max_new_tokens)
    return [re.split(r"[\n,.]", t)[0].strip() for t in texts]


__all__ = [
    "CodeOutput",
    "SamplingConfig",
    "answer_questions",
    "caption_images",
    "check_context",
    "clean_text",
    "describe",
    "filter_logits",
    "generate_codes",
    "guided_logprobs",
    "text_ids",
    "text_to_image_prompt",
    "understanding_inputs",
    "visual_length_limits",
]
