"""Training sequences of LaVIT's unified LM: ``[image, text]``, ``[text, image]`` and text-only documents.

- ``[image, text]`` (understanding): ``[IMG] v_1 .. v_K [/IMG] text </s>``; the v_k are CONTINUOUS slots that the
  merged visual tokens (through ``vit_proj``) fill; targets are the text and ``</s>`` (for a VQA sample only the
  answer and ``</s>``: the question is part of the prompt).
- ``[text, image]`` (generation): ``text [IMG] c_1 .. c_K [/IMG]`` with discrete code ids; targets are the codes and
  ``[/IMG]`` (the model decides the image length; ``[IMG]`` itself is given by the prompt at inference).
- text-only: ``<s> text </s>``; every token after ``<s>`` is a target.

Image-text sequences feed no ``<s>``, as the official inference prompts do. A batch of B image-text pairs is planned
in the data loader (:func:`plan_batch`, no pixels touched): round(B x ``understand_ratio``) of them become
understanding samples (a VQA sample with probability ``qa_ratio``) and the rest generation samples, plus
round(B x ``text_ratio``) text-only documents; a generation sample loses its text with probability
``caption_drop`` (then it is ``[IMG] c_1 .. c_K [/IMG]``, the unconditional context of classifier-free guidance).
The visual lengths K are only known once the frozen tokenizer has run, so :func:`build_samples` turns a plan into
:class:`Sample` lists on the model's side.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlpretrain.lavit.vocab import VisualVocab

VISUAL_SLOT = -1  # id placeholder of a continuous visual token in Sample.ids
_PUNCTUATION = re.compile(r"[^\w\s]")


def vqa_prompt(question: str) -> str:
    """The official VQA prompt: ``"Question: {q} Answer:"`` with the question lower-cased, punctuation stripped."""
    cleaned = " ".join(_PUNCTUATION.sub("", question.lower()).split())
    return f"Question: {cleaned} Answer:"


@dataclass
class Sample:
    """One training sequence before packing.

    Attributes:
        ids: token ids; :data:`VISUAL_SLOT` where a continuous visual token goes.
        targets: whether token t is predicted (its loss is taken from position t - 1); targets[0] is always False.
        image: the batch image whose merged tokens fill the slots, in order (-1: no slots).
        kind: "understand", "generate" or "text" (for per-kind loss logging).
    """

    ids: list[int]
    targets: list[bool]
    image: int = -1
    kind: str = "text"

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.targets) or not self.ids:
            raise ValueError("a sample needs as many target flags as ids, and at least one id")
        if self.targets[0]:
            raise ValueError("the first token of a sample cannot be a target (nothing precedes it)")
        if any(t and i == VISUAL_SLOT for i, t in zip(self.ids, self.targets, strict=True)):
            raise ValueError("a continuous visual slot cannot be a target")

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, length: int) -> Sample:
        """The first ``length`` tokens (slots past the cut are dropped with them)."""
        return Sample(self.ids[:length], self.targets[:length], self.image, self.kind)


def understanding_sample(vocab: VisualVocab, image: int, num_visual: int, prompt: list[int], answer: list[int],
                         eos: int, more_turns: Sequence[tuple[list[int], list[int]]] = ()) -> Sample:  # fmt: skip
    """``[IMG] slots [/IMG] prompt answer </s>``, then ``prompt answer </s>`` for each of ``more_turns`` (further
    questions about the same image); targets: every answer and its ``</s>`` (a caption is all answer)."""
    ids = [vocab.img_start, *([VISUAL_SLOT] * num_visual), vocab.img_end]
    targets = [False] * len(ids)
    for turn_prompt, turn_answer in [(prompt, answer), *more_turns]:
        ids += [*turn_prompt, *turn_answer, eos]
        targets += [False] * len(turn_prompt) + [True] * (len(turn_answer) + 1)
    return Sample(ids, targets, image, "understand")


def generation_sample(vocab: VisualVocab, text: list[int], codes: list[int]) -> Sample:
    """``text [IMG] code ids [/IMG]``; targets: the code ids and ``[/IMG]``."""
    head = [*text, vocab.img_start]
    tail = [c + vocab.code_offset for c in codes] + [vocab.img_end]
    return Sample(head + tail, [False] * len(head) + [True] * len(tail), -1, "generate")


def text_sample(text: list[int], bos: int, eos: int) -> Sample:
    """``<s> text </s>``; every token after ``<s>`` is a target."""
    ids = [bos, *text, eos]
    return Sample(ids, [False] + [True] * (len(ids) - 1), -1, "text")


@dataclass
class ImagePlan:
    """What one image-text pair of a batch becomes: ``understand`` (prompt + answer, then ``more_turns``: further
    (prompt, answer) pairs about the same image) or ``generate`` (text)."""

    kind: str
    prompt: list[int] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    more_turns: list[tuple[list[int], list[int]]] = field(default_factory=list)


def plan_batch(examples: list[dict[str, Any]], tokenize: Any, understand_ratio: float, qa_ratio: float,
               text_ratio: float, seed: int, qa_turns: int = 1,
               caption_drop: float = 0.0) -> tuple[list[ImagePlan], list[list[int]]]:  # fmt: skip
    """Decide the sequences of a batch of pairs (``{"caption", "qa": [{"question", "answer"}], "key"}``).

    The first round(B x ``understand_ratio``) pairs (the stream is shuffled, so these are random pairs) are
    understanding samples, at least one and at most B - 1 when 0 < ratio < 1 and B >= 2, so both orders are in every
    batch; each is a VQA sample with probability ``qa_ratio`` (when it has QA), drawn from a generator seeded by
    (seed, key, position) that asks min(``qa_turns``, questions of the pair) of its questions, in random order, one
    after another. Each generation sample keeps its caption unless a draw from a generator seeded by (seed, key,
    position) falls under ``caption_drop``. Text-only documents cycle through the pairs' captions, then their QA text.

    Args:
        examples: the decoded pairs.
        tokenize: ``str -> list[int]`` (no special tokens).
        understand_ratio, qa_ratio, text_ratio, qa_turns, caption_drop: see
            :class:`vlpretrain.lavit.model.LavitLMConfig`.
        seed: the data seed.

    Returns:
        (one plan per pair, the token ids of each text-only document).
    """
    b = len(examples)
    n_und = round(b * understand_ratio)
    if 0 < understand_ratio < 1 and b >= 2:
        n_und = min(max(n_und, 1), b - 1)
    plans = []
    for i, ex in enumerate(examples):
        caption = tokenize(ex["caption"])
        rng = random.Random(f"lavit-lm/{seed}/{ex['key']}/{i}")
        if i >= n_und:
            dropped = caption_drop > 0 and rng.random() < caption_drop
            plans.append(ImagePlan("generate", text=[] if dropped else caption))
            continue
        if ex["qa"] and rng.random() < qa_ratio:
            # one question: rng.choice, whose draws the runs measured before qa_turns existed used
            asked = rng.sample(ex["qa"], min(qa_turns, len(ex["qa"]))) if qa_turns > 1 else [rng.choice(ex["qa"])]
            turns = [(tokenize(vqa_prompt(qa["question"])), tokenize(qa["answer"])) for qa in asked]
            plans.append(ImagePlan("understand", *turns[0], more_turns=turns[1:]))
        else:
            plans.append(ImagePlan("understand", answer=caption))
    sources = [ex["caption"] for ex in examples]
    sources += [" ".join(f"{qa['question']} {qa['answer']}" for qa in ex["qa"]) for ex in examples if ex["qa"]]
    docs = [tokenize(sources[j % len(sources)]) for j in range(round(b * text_ratio))] if sources else []
    return plans, docs


def build_samples(vocab: VisualVocab, plans: list[ImagePlan], docs: list[list[int]], visual_lengths: list[int],
                  codes: list[list[int] | None], bos: int, eos: int) -> list[Sample]:  # fmt: skip
    """Samples of a planned batch once the tokenizer has run.

    Args:
        vocab: the LM's vocabulary layout.
        plans: one per image.
        docs: text-only documents.
        visual_lengths: K_b, the kept tokens of each image.
        codes: the code ids of each generation image (None for understanding images).
        bos, eos: the text tokenizer's special ids.
    """
    samples = []
    for b, plan in enumerate(plans):
        if plan.kind == "understand":
            samples.append(understanding_sample(vocab, b, visual_lengths[b], plan.prompt, plan.answer, eos,
                                                plan.more_turns))  # fmt: skip
        else:
            samples.append(generation_sample(vocab, plan.text, codes[b] or []))
    return samples + [text_sample(doc, bos, eos) for doc in docs]
