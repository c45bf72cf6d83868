"""Libra on the shapes world: caption attribute F1, VQA accuracy, and the text-only identity with the frozen LM.

- captions and answers are scored by :mod:`vlpretrain.eval.lm_quality` (the same metrics as LaVIT's demo LM), plus
  the caption F1 of each attribute kind (:func:`attribute_breakdown`);
- :func:`text_identity` checks stage 1's promise: on inputs without images the Libra model gives exactly the frozen
  text LM's logits (``torch.equal``, fp32, every position of every prompt) and the same greedy continuations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlpretrain.libra.generate import decode_words
from vlpretrain.libra.lm_task import LibraLMTask
from vlpretrain.libra.pipeline import LibraPipeline


@torch.no_grad()
def text_identity(task: LibraLMTask, text_lm: Any, texts: Sequence[str], max_new_tokens: int = 16) -> dict[str, float]:
    """Compare Libra's text-only path with ``text_lm`` (an HF causal LM with the same vocabulary) on ``texts``.

    Returns:
        ``text_identical_logits`` (fraction of texts whose logits are bit-identical), ``text_identical_generation``
        (fraction whose greedy continuations match) and ``text_max_abs_diff``.
    """
    same_logits = same_text = 0
    worst = 0.0
    bos = task.ids["bos"]
    for text in texts:
        ids = torch.tensor([[bos, *task.text_tokenizer(text, add_special_tokens=False).input_ids]])
        ref = text_lm(input_ids=ids).logits
        ours = task.model.text_logits(task.model(ids[None].expand(task.vocab.num_codebooks, -1, -1)).hidden_BLH)
        same_logits += bool(torch.equal(ref, ours))
        worst = max(worst, float((ref - ours).abs().max()))
        same_text += _greedy(task, ids, max_new_tokens, None) == _greedy(task, ids, max_new_tokens, text_lm)
    n = max(len(texts), 1)
    return {"text_identical_logits": same_logits / n, "text_identical_generation": same_text / n,
            "text_max_abs_diff": worst}  # fmt: skip


def attribute_breakdown(captions: Sequence[str], records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Caption F1 per attribute kind (``caption_<kind>_f1`` for size, colour, shape, position), the per-kind terms
    of :func:`vlpretrain.eval.lm_quality.score_captions`'s micro F1."""
    from collections import Counter

    from vlpretrain.eval.lm_quality import ATTRIBUTES, parse_caption, true_objects

    totals = {kind: [0, 0, 0] for kind in ATTRIBUTES}  # matched, stated, true
    for text, record in zip(captions, records, strict=True):
        pred, truth = parse_caption(text)[0], true_objects(record)
        for kind in ATTRIBUTES:
            stated = Counter(o[kind] for o in pred if o[kind] is not None)
            totals[kind][0] += sum((stated & Counter(o[kind] for o in truth)).values())
            totals[kind][1] += sum(stated.values())
            totals[kind][2] += len(truth)
    out = {}
    for kind, (matched, stated, true) in totals.items():
        p, r = matched / max(stated, 1), matched / max(true, 1)
        out[f"caption_{kind}_f1"] = 2 * p * r / max(p + r, 1e-12)
    return out


def _greedy(task: LibraLMTask, ids: torch.Tensor, steps: int, text_lm: Any | None) -> str:
    """Greedy continuation by full recomputation, with Libra (``text_lm`` None) or the text LM."""
    for _ in range(steps):
        if text_lm is None:
            hidden = task.model(ids[None].expand(task.vocab.num_codebooks, -1, -1)).hidden_BLH
            logits = task.model.text_logits(hidden[:, -1])
        else:
            logits = text_lm(input_ids=ids).logits[:, -1]
        nxt = int(logits.argmax(-1))
        if nxt == task.ids["eos"]:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return decode_words(task.text_tokenizer, ids[0, 1:].tolist())


def run(checkpoint: str | Path, data: str | Path, limit: int = 200, captions: bool = True, vqa: bool = True,
        text_lm: str | Path | None = None, out: str | Path | None = None,
        batch_size: int = 50) -> dict[str, float]:  # fmt: skip
    """Every evaluation from folders: a Libra checkpoint and held-out shards (e.g. ``runs/demo/data/test``);
    ``text_lm`` (a ``text-lm`` folder) adds the identity check on the records' captions. Writes ``metrics.json`` and
    ``samples.json`` into ``out`` when given."""
    from vlpretrain.data.shards import read_records
    from vlpretrain.eval.lm_quality import eval_captions, eval_vqa

    pipe = LibraPipeline.from_pretrained(checkpoint)
    images, records = read_records(str(data), limit=limit)
    metrics: dict[str, float] = {}
    samples: dict[str, Any] = {}
    if captions:
        caption_metrics, texts = eval_captions(pipe, images, records, batch_size=batch_size)
        metrics |= caption_metrics | attribute_breakdown(texts, records)
        samples["captions"] = [{"truth": r.get("caption"), "generated": c} for r, c in zip(records, texts[:16],
                                                                                             strict=False)]  # fmt: skip
    if vqa:
        vqa_metrics, answers = eval_vqa(pipe, images, records, batch_size=batch_size)
        metrics |= vqa_metrics
        samples["answers"] = answers[:24]
    if text_lm is not None:
        from vlpretrain.train.pretrained import load_task

        lm_task, _ = load_task(text_lm, expect_task="text-lm")
        prompts = [" ".join(r["caption"].split()[:4]) for r in records[:16]]  # e.g. "two objects: a large"
        metrics |= text_identity(pipe.task, lm_task.lm.eval(), prompts)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (folder / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    return metrics


__all__ = ["attribute_breakdown", "run", "text_identity"]
