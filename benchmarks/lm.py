"""LaVIT unified LM: text-to-image decoding speed and the padding waste of packed training rows.

Decoding: visual tokens/s of :func:`vlpretrain.lavit.generate.generate_codes` at the ``tiny`` preset (random weights:
the speed does not depend on them, and every variant samples the same tokens, tests/test_lavit_lm_generate.py) for
a batch of shapes-world captions, with classifier-free guidance (scale 4) run as one batched forward of the
conditional and unconditional rows or as two, and with a KV cache or recomputing the whole sequence each step.
Every image is forced to the same length (min = max visual tokens) so that all variants do the same work.

Training step: forward + backward of one ``tiny``-preset batch in the demo's stage-2 mixture (32 pairs, 3/4 of
them ``[text, image]``, 8 text-only documents; random images through the random tokenizer, packed once and reused),
with the output layer on every position of the packed rows (``logits`` then the masked cross-entropy) or on the target
positions only (the task's ``forward``), bf16 autocast.

Packing: the share of padding in the training rows of ``tiny``-preset batches (32 pairs, the default 2:1 text-only
mixture, half of the pairs in each order, half of the understanding pairs VQA), packed into rows of 256 tokens by
first-fit decreasing, against one sample per row padded to the batch's longest. The visual lengths are drawn
uniformly from N/6..N/2 (mean N/3, the tokenizer's target keep ratio), so no trained tokenizer is needed.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from benchmarks.common import Report, Table, time_calls
from vlpretrain.configs import get_preset
from vlpretrain.data.synthetic import SynthConfig, make_example
from vlpretrain.lavit.generate import SamplingConfig, generate_codes, text_to_image_prompt
from vlpretrain.lavit.lm_task import LavitLMTask
from vlpretrain.lavit.packing import IGNORE, pack_samples, padding_waste
from vlpretrain.lavit.sequences import build_samples, plan_batch

NAME = "lm"
GUIDANCE = 4.0
VARIANTS = ((False, False), (True, False), (False, True), (True, True))  # (batched CFG, KV cache)


def _decode(task: LavitLMTask, prompts: list[list[int]], cfg: SamplingConfig, batched: bool, cache: bool):
    def call() -> None:
        generate_codes(task, prompts, cfg, torch.Generator().manual_seed(0), batched_cfg=batched, use_cache=cache)

    return call


def _pairs(start: int, count: int) -> list[dict]:
    """Training pairs ``start .. start + count - 1`` of the shapes world as :func:`plan_batch` reads them."""
    examples = []
    for i in range(start, start + count):
        ex = make_example(SynthConfig(), "train", i)
        examples.append({"caption": ex.caption, "qa": ex.qa, "key": ex.scene.key})
    return examples


def _train_batch(task: LavitLMTask, batch_size: int) -> dict:
    """A planned stage-2 batch (random images) whose packed rows :meth:`LavitLMTask.prepare` caches."""
    plans, docs = plan_batch(_pairs(0, batch_size), task.encode_text, 0.25, 0.5, 0.25, seed=0)
    size = task.tokenizer.encoder.image_size
    batch = {"image": torch.rand(batch_size, 3, size, size), "plans": plans, "docs": docs}
    task.prepare(batch)
    return batch


def _train_step(task: LavitLMTask, batch: dict, full_rows: bool):
    def call() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if full_rows:
                packed = task.prepare(batch)
                logits = task.logits(packed)[:, :-1].float().flatten(0, 1)
                loss = F.cross_entropy(logits, packed["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")
            else:
                loss = task(batch)["loss"]
        loss.backward()
        task.zero_grad(set_to_none=True)

    return call


def _waste(task: LavitLMTask, batches: int, batch_size: int) -> tuple[float, float]:
    """(packed, one-sample-per-row) padding fractions over ``batches`` planned batches of shapes-world pairs."""
    rng = random.Random(0)
    n = task.tokenizer.num_patches
    packed_pad = packed_all = plain_pad = plain_all = 0
    for b in range(batches):
        plans, docs = plan_batch(_pairs(b * batch_size, batch_size), task.encode_text, 0.5, 0.5, 2.0, seed=0)
        lengths = [rng.randint(n // 6, n // 2) for _ in plans]
        codes = [[rng.randrange(task.vocab.codebook_size) for _ in range(k)] for k in lengths]
        samples = build_samples(task.vocab, plans, docs, lengths, codes, task.bos_id, task.eos_id)
        packed = pack_samples(samples, task.cfg.max_len, task.pad_id)
        packed_all += packed["input_ids"].numel()
        packed_pad += round(padding_waste(packed) * packed["input_ids"].numel())
        longest = max(len(s) for s in samples)
        plain_all += longest * len(samples)
        plain_pad += sum(longest - len(s) for s in samples)
    return packed_pad / packed_all, plain_pad / plain_all


def run(quick: bool = False) -> Report:
    """Visual tokens/s of the four decoding variants, and the padding waste with and without packing."""
    batch, length = (2, 6) if quick else (8, 50)
    warmup, repeats = (0, 1) if quick else (1, 3)
    torch.manual_seed(0)
    task = LavitLMTask(get_preset("lavit-lm", "tiny")).eval()
    captions = [make_example(SynthConfig(), "test", i).caption for i in range(batch)]
    prompts = [text_to_image_prompt(task, c) for c in captions]
    cfg = SamplingConfig(guidance_scale=GUIDANCE, min_tokens=length, max_tokens=length)
    table = Table(f"tiny preset: {batch} prompts x {length} visual tokens, guidance {GUIDANCE}; training rows of "
                  f"{task.cfg.max_len} (median of {repeats})", ["measurement", "value", "relative"])  # fmt: skip
    base = 0.0
    for batched, cache in VARIANTS:
        seconds = time_calls(_decode(task, prompts, cfg, batched, cache), warmup, repeats).median
        rate = batch * length / seconds
        base = base or rate
        label = f"text-to-image, {'batched' if batched else 'unbatched'} CFG, {'KV cache' if cache else 'no cache'}"
        table.add(label, f"{rate:,.0f} tok/s", f"{rate / base:.2f}x")
    train = _train_batch(task.train(), 4 if quick else 32)
    targets = task.num_targets(train)
    full = 0.0
    for full_rows in (True, False):
        seconds = time_calls(_train_step(task, train, full_rows), warmup, repeats).median
        rate = targets / seconds
        full = full or rate
        where = "every position" if full_rows else "target positions only"
        table.add(f"training step, output layer on {where}", f"{rate:,.0f} targets/s", f"{rate / full:.2f}x")
    packed, plain = _waste(task, 2 if quick else 20, 8 if quick else 32)
    table.add("training padding, packed rows", f"{100 * packed:.1f}%", "")
    table.add("training padding, one sample per row", f"{100 * plain:.1f}%", "")
    notes = [
        f"Requirement: batched CFG + KV cache >= 2x unbatched CFG without cache; packed padding < 5%. "
        f"LM: {sum(p.numel() for p in task.lm.parameters()) / 1e6:.1f}M parameters, vocabulary {task.vocab.size}.",
        "Unbatched CFG runs the conditional rows and the [IMG]-only unconditional rows as two forward passes per "
        "step; batched runs them as one pass of twice the rows (left-padded). Without a cache every step reruns the "
        "prompt and all tokens so far.",
        "Padding: first-fit decreasing into fixed rows; the remainder is mostly the last, partly filled row of each "
        "batch, so it shrinks as batches grow.",
    ]
    return Report(NAME, "LaVIT unified LM (`lm`)", table, notes)
