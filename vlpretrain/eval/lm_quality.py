"""Quality of LaVIT's unified LM on the shapes world: captions, answers and generated images.

- :func:`eval_captions`: each held-out image is captioned; the objects the caption names (size, colour, shape,
  place: :func:`parse_caption`) are compared with the scene record. ``caption_attr_f1`` is the micro F1 over
  attribute values (per attribute kind, the multiset overlap of values; precision over the attributes the captions
  state, recall over the 4 attributes of every true object): the issue's bar is >= 0.8. ``caption_object_f1``
  needs all four attributes of an object right; ``caption_count_acc`` checks the "N objects" phrase.
- :func:`eval_vqa`: every question of the record, exact match after lower-casing and stripping punctuation
  (``vqa_accuracy``, bar >= 0.7; ``vqa_<type>`` per question type).
- :func:`eval_text_to_image`: each held-out caption is drawn (LM -> codes -> detokenizer) and the judge reads the
  picture; :func:`~vlpretrain.data.judge.prompt_match` against the record's objects (count, colour and shape
  multisets) gives ``t2i_prompt_match`` (bar >= 0.6), with ``t2i_count``/``t2i_colors``/``t2i_shapes``.
  :func:`run` draws as the official text-to-image evaluation does (``EVAL_GUIDANCE``, ``EVAL_TOP_K``,
  ``EVAL_CANDIDATES``: LLM guidance 1.5, top-k 300, the best of 4 drawings per prompt, kept there by CLIP score and
  here by the LM's own caption score) and also reports the first drawing alone (``t2i_single_*``).

Evaluators take a pipeline-like object (``caption``, ``ask``, ``generate`` as :class:`vlpretrain.lavit.pipeline.
Pipeline`) and return ``{name: value}``; :func:`run` does everything from folders and writes sample outputs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpretrain.data.judge import attribute_match, objects_from_record
from vlpretrain.data.synthetic import COLORS, NUMBER_WORDS, SHAPES, SIZES, position_name

ATTRIBUTES = ("size", "color", "shape", "position")
# The official text-to-image evaluation (LaVIT/evaluation/evaluate_text2img.py): LLM guidance 1.5, top-k 300,
# top-p 1, temperature 1, four drawings per prompt and the best one kept.
EVAL_GUIDANCE, EVAL_TOP_K, EVAL_CANDIDATES = 1.5, 300, 4
_PLACES = ("top left", "top right", "bottom left", "bottom right", "top", "bottom", "left", "right", "center")
_OBJECT = re.compile(
    rf"\b({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    rf"(?: (?:at|in) the ({'|'.join(_PLACES)}))?\b"
)
_COUNT = re.compile(rf"\b({'|'.join(NUMBER_WORDS)}) objects?\b")
_PUNCT = re.compile(r"[^\w\s]")


def parse_caption(text: str) -> tuple[list[dict[str, str | None]], int | None]:
    """The objects a shapes-world caption names (``{size, color, shape, position}``, position None when not said)
    and its stated object count (None when absent). Only the first sentence is read (the object list)."""
    first = text.lower().split(".")[0]
    objects = [dict(zip(ATTRIBUTES, m.groups(), strict=True)) for m in _OBJECT.finditer(first)]
    count = _COUNT.search(first)
    return objects, NUMBER_WORDS.index(count.group(1)) if count else None


def true_objects(record: dict[str, Any]) -> list[dict[str, str]]:
    """The record's objects as ``{size, color, shape, position}`` (position named as captions name it)."""
    grid = int(record.get("grid", 3))
    return [{"size": o.size, "color": o.color, "shape": o.shape, "position": position_name(o, grid)}
            for o in objects_from_record(record)]  # fmt: skip


def attribute_counts(pred: Sequence[dict[str, Any]], true: Sequence[dict[str, Any]]) -> tuple[int, int, int]:
    """(matched, stated, true) attribute values: per kind, the multiset overlap of values."""
    matched = stated = 0
    for kind in ATTRIBUTES:
        p = Counter(o[kind] for o in pred if o[kind] is not None)
        matched += sum((p & Counter(o[kind] for o in true)).values())
        stated += sum(p.values())
    return matched, stated, len(ATTRIBUTES) * len(true)


def _f1(matched: int, stated: int, truth: int) -> tuple[float, float, float]:
    precision, recall = matched / max(stated, 1), matched / max(truth, 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def score_captions(captions: Sequence[str], records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Caption metrics (see the module docstring) of captions against their scene records."""
    totals = np.zeros(3, dtype=np.int64)
    objects = np.zeros(3, dtype=np.int64)
    counts = 0
    for text, record in zip(captions, records, strict=True):
        pred, count = parse_caption(text)
        truth = true_objects(record)
        totals += attribute_counts(pred, truth)
        tuples = Counter(tuple(o[k] for k in ATTRIBUTES) for o in pred)
        objects += (
            sum((tuples & Counter(tuple(o[k] for k in ATTRIBUTES) for o in truth)).values()),
            sum(tuples.values()),
            len(truth),
        )
        counts += count == len(truth)
    p, r, f1 = _f1(*totals.tolist())
    return {
        "caption_attr_precision": p,
        "caption_attr_recall": r,
        "caption_attr_f1": f1,
        "caption_object_f1": _f1(*objects.tolist())[2],
        "caption_count_acc": counts / max(len(records), 1),
    }


def eval_captions(pipe: Any, images: Sequence[np.ndarray], records: Sequence[dict[str, Any]],
                  batch_size: int = 32) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """(caption metrics, the captions) of held-out images."""
    captions = pipe.caption(list(images), batch_size=batch_size)
    return score_captions(captions, records), captions


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, spaces collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def eval_vqa(pipe: Any, images: Sequence[np.ndarray], records: Sequence[dict[str, Any]],
             batch_size: int = 32) -> tuple[dict[str, float], list[dict[str, str]]]:  # fmt: skip
    """(accuracy overall and per question type, the answers) over every QA pair of the records."""
    items = [(i, qa) for i, r in enumerate(records) for qa in r.get("qa", [])]
    if not items:
        raise ValueError("the records hold no question-answer pairs ('qa')")
    answers = pipe.ask([images[i] for i, _ in items], [qa["question"] for _, qa in items], batch_size=batch_size)
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    rows = []
    for (i, qa), answer in zip(items, answers, strict=True):
        ok = normalize_answer(answer) == normalize_answer(qa["answer"])
        kind = qa.get("type", "all")
        right[kind] += ok
        seen[kind] += 1
        rows.append({"image": i, "question": qa["question"], "answer": answer, "truth": qa["answer"]})
    metrics = {"vqa_accuracy": sum(right.values()) / len(items)}
    return metrics | {f"vqa_{k}": right[k] / seen[k] for k in sorted(seen)}, rows


def judge_agreement(judge: Any, images_B3SS: Any, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fraction of the images [B, 3, S, S] whose object count / colours / shapes the judge reads as their records
    state (keys ``count``, ``colors``, ``shapes``; see :func:`attribute_match`)."""
    totals: Counter[str] = Counter()
    for pred, record in zip(judge.read(images_B3SS), records, strict=True):
        totals.update({k: int(v) for k, v in attribute_match(pred, objects_from_record(record)).items()})
    n = max(len(records), 1)
    return {k: totals[k] / n for k in ("count", "colors", "shapes")}


def eval_text_to_image(pipe: Any, records: Sequence[dict[str, Any]], judge: Any, seed: int = 0,
                       batch_size: int = 16, sampling: Any = None,
                       candidates: int = 1) -> tuple[dict[str, float], Any]:  # fmt: skip
    """(judge agreement of images drawn from the records' captions, the images [B, 3, S, S]); ``sampling``: a
    :class:`~vlpretrain.lavit.generate.SamplingConfig` (None: the pipeline's default); ``candidates``: drawings per
    caption, the best by the pipeline's caption score kept; with more than one, ``t2i_single_*`` scores the first
    drawing alone."""
    result = pipe.generate([r["caption"] for r in records], sampling=sampling, seed=seed, batch_size=batch_size,
                           candidates=candidates)  # fmt: skip
    if result.images is None:
        raise ValueError("text-to-image evaluation needs a detokenizer (pass one to the pipeline)")
    metrics = _t2i_scores(judge, result, records, "t2i_")
    if candidates > 1:
        metrics |= _t2i_scores(judge, result.candidates[0], records, "t2i_single_")
    return metrics, result.images


def _t2i_scores(judge: Any, drawn: Any, records: Sequence[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Judge agreement, its mean (``prompt_match``) and visual tokens per drawing of ``drawn`` (a ``Generated``)."""
    metrics = {f"{prefix}{k}": v for k, v in judge_agreement(judge, drawn.images, records).items()}
    metrics[f"{prefix}prompt_match"] = sum(metrics.values()) / 3
    metrics[f"{prefix}tokens_mean"] = sum(len(c) for c in drawn.codes) / max(len(records), 1)
    return metrics


def eval_sampling() -> Any:
    """The official evaluation's :class:`~vlpretrain.lavit.generate.SamplingConfig` (guidance 1.5, top-k 300)."""
    from vlpretrain.lavit.generate import SamplingConfig

    return SamplingConfig(guidance_scale=EVAL_GUIDANCE, top_k=EVAL_TOP_K)


def run(checkpoint: str | Path, data: str | Path, judge_dir: str | Path | None = None,
        detokenizer: str | Path | None = None, limit: int = 200, t2i_limit: int = 200, seed: int = 0,
        out: str | Path | None = None, sampling: Any = None,
        candidates: int = EVAL_CANDIDATES) -> dict[str, float]:  # fmt: skip
    """Every evaluation from folders: a ``lavit-lm`` checkpoint, held-out shards (e.g. ``runs/demo/data/test``), a
    judge and a detokenizer (text-to-image is skipped without them). Text-to-image draws with ``sampling`` (None:
    :func:`eval_sampling`) and keeps the best of ``candidates``; with more than one, ``t2i_single_*`` scores the
    first drawing alone. Writes ``samples.json`` (and ``t2i.png``, a grid of the first 16 drawings) into ``out``."""
    from vlpretrain.data.shards import read_records
    from vlpretrain.lavit.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(checkpoint, detokenizer=detokenizer)
    images, records = read_records(str(data), limit=limit)
    metrics, captions = eval_captions(pipe, images, records)
    vqa, answers = eval_vqa(pipe, images, records)
    metrics |= vqa
    drawn = None
    if judge_dir is not None and pipe.detokenizer is not None:
        from vlpretrain.data.judge import load_judge

        judge, prompts, sampling = load_judge(judge_dir), records[:t2i_limit], sampling or eval_sampling()
        t2i, drawn = eval_text_to_image(pipe, prompts, judge, seed, sampling=sampling, candidates=candidates)
        metrics |= t2i
    if out is not None:
        _write_samples(Path(out), records, captions, answers, drawn, metrics)
    return metrics


def _write_samples(out: Path, records: Sequence[dict[str, Any]], captions: list[str], answers: list[dict[str, str]],
                   drawn: Any, metrics: dict[str, float]) -> None:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    samples = {"captions": [{"truth": r.get("caption"), "generated": c} for r, c in zip(records[:16], captions[:16],
                                                                                         strict=False)],
               "answers": answers[:24], "prompts": [r.get("caption") for r in records[:16]]}  # fmt: skip
    (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if drawn is not None:
        _grid(drawn[:16]).save(out / "t2i.png")


def _grid(images_B3SS: Any, columns: int = 8) -> Any:
    """The images side by side, ``columns`` per row (a PIL image)."""
    from PIL import Image

    from vlpretrain.core.image import to_pil

    tiles = [to_pil(x.float().clamp(0, 1)) for x in images_B3SS]
    side = tiles[0].width
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (side * min(columns, len(tiles)), side * rows), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * side, (i // columns) * side))
    return sheet


__all__ = [
    "attribute_counts",
    "eval_captions",
    "eval_text_to_image",
    "eval_vqa",
    "judge_agreement",
    "normalize_answer",
    "parse_caption",
    "run",
    "score_captions",
    "true_objects",
]
