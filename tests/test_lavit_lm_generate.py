"""Inference with the unified LM: batched classifier-free guidance, KV cache, seeding, visual-length limits,
suppressed visual ids in captions, top-k/top-p, batching invariance and context limits."""

from __future__ import annotations

import pytest
import torch
from test_lavit_lm import micro_task

from vlpretrain.lavit.generate import (
    SamplingConfig,
    answer_questions,
    caption_images,
    filter_logits,
    generate_codes,
    guided_logprobs,
    text_ids,
    text_to_image_prompt,
    visual_length_limits,
)
from vlpretrain.lavit.lm_task import LavitLMTask


@pytest.fixture(scope="module")
def task() -> LavitLMTask:
    return micro_task(seed=2).eval()


def prompts(task: LavitLMTask) -> list[list[int]]:
    texts = ["two objects: a small red circle at the top left", "one object", "three objects: a large cyan cross"]
    return [text_to_image_prompt(task, t) for t in texts]


GREEDY = SamplingConfig(top_k=1, guidance_scale=3.0, min_tokens=2, max_tokens=9)


def test_default_visual_lengths_scale_the_official_20_to_200() -> None:
    assert visual_length_limits(256) == (20, 200)
    assert visual_length_limits(64) == (5, 50)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_guidance_equals_two_separate_passes(task: LavitLMTask, use_cache: bool) -> None:
    one = generate_codes(task, prompts(task), GREEDY, torch.Generator(), batched_cfg=True, use_cache=use_cache,
                         keep_scores=True)  # fmt: skip
    two = generate_codes(task, prompts(task), GREEDY, torch.Generator(), batched_cfg=False, use_cache=use_cache,
                         keep_scores=True)  # fmt: skip
    assert [c.tolist() for c in one.codes] == [c.tolist() for c in two.codes]
    torch.testing.assert_close(one.scores, two.scores, rtol=1e-4, atol=1e-4)


def test_kv_cache_decoding_equals_full_recomputation(task: LavitLMTask) -> None:
    cached = generate_codes(task, prompts(task), GREEDY, torch.Generator(), use_cache=True, keep_scores=True)
    full = generate_codes(task, prompts(task), GREEDY, torch.Generator(), use_cache=False, keep_scores=True)
    assert [c.tolist() for c in cached.codes] == [c.tolist() for c in full.codes]
    torch.testing.assert_close(cached.scores, full.scores, rtol=1e-4, atol=1e-4)
    assert len({len(c) for c in cached.codes} | {0}) > 1


def test_guidance_is_applied_on_log_probabilities() -> None:
    cond, uncond = torch.randn(2, 7), torch.randn(2, 7)
    out = guided_logprobs(cond, uncond, 4.0)
    expected = 4.0 * (cond.log_softmax(-1) - uncond.log_softmax(-1)) + uncond.log_softmax(-1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(guided_logprobs(cond, None, 4.0), cond.log_softmax(-1))


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(task: LavitLMTask) -> None:
    cfg = SamplingConfig(guidance_scale=2.0, min_tokens=3, max_tokens=12)
    p = prompts(task)

    def run(ps: list[list[int]], seeds: list[int]) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return [c.tolist() for c in generate_codes(task, ps, cfg, gens).codes]

    first = run(p, [0, 1, 2])
    assert first == run(p, [0, 1, 2])
    assert run(p[1:2], [1]) == first[1:2]  # the same prompt and seed alone give the same image
    assert run(p, [5, 6, 7]) != first


def _bias(task: LavitLMTask, ids: list[int], value: float):
    """Add ``value`` to the output logits of ``ids`` (a forward hook on lm_head); returns the undo function."""
    shift = torch.zeros(task.vocab.size)
    shift[ids] = value
    return task.lm.lm_head.register_forward_hook(lambda module, inputs, out: out + shift.to(out.dtype)).remove


def test_min_and_max_visual_tokens_are_respected(task: LavitLMTask) -> None:
    vocab = task.vocab
    cfg = SamplingConfig(guidance_scale=1.0, min_tokens=4, max_tokens=7)
    undo = _bias(task, [vocab.img_end], 1e4)  # the model wants to close the image at once
    try:
        eager = generate_codes(task, prompts(task), cfg, torch.Generator().manual_seed(0)).codes
    finally:
        undo()
    undo = _bias(task, [vocab.img_end], -1e4)  # the model never wants to close it
    try:
        endless = generate_codes(task, prompts(task), cfg, torch.Generator().manual_seed(0)).codes
    finally:
        undo()
    assert [len(c) for c in eager] == [4, 4, 4]
    assert [len(c) for c in endless] == [7, 7, 7]
    assert all(((c >= 0) & (c < vocab.codebook_size)).all() for c in eager + endless)


def test_visual_ids_never_appear_in_captions_or_answers(task: LavitLMTask) -> None:
    undo = _bias(task, task.vocab.visual_ids(), 1e3)  # visual ids dominate every step unless suppressed
    try:
        images = torch.rand(2, 3, 64, 64)
        ids = text_ids(task, images, [[], []], num_beams=2, min_new_tokens=3, max_new_tokens=6)
        captions = caption_images(task, images, min_new_tokens=2, max_new_tokens=6)
        answers = answer_questions(task, images, ["what color is the circle?", "how many objects are there?"])
    finally:
        undo()
    assert ids.shape[1] >= 3 and not task.vocab.is_visual(ids).any()
    assert len(captions) == len(answers) == 2


def test_captions_do_not_depend_on_the_batch(task: LavitLMTask) -> None:
    images = torch.rand(3, 3, 64, 64)  # different visual lengths: left padding differs per image
    together = caption_images(task, images, max_new_tokens=8)
    alone = [caption_images(task, images[i : i + 1], max_new_tokens=8)[0] for i in range(3)]
    assert together == alone


def test_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, 0, 1.0)).all()


def test_prompts_past_the_context_are_refused(task: LavitLMTask) -> None:
    long = [text_to_image_prompt(task, " ".join(["red"] * 200))]
    with pytest.raises(ValueError, match="context"):
        generate_codes(task, long, GREEDY, torch.Generator())
    with pytest.raises(ValueError, match=r"end with \[IMG\]"):
        generate_codes(task, [[1, 2]], GREEDY, torch.Generator())
    with pytest.raises(ValueError, match="context"):
        answer_questions(task, torch.rand(1, 3, 64, 64), [" ".join(["circle"] * 200)])
