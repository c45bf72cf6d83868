"""Answering a VQA benchmark with LaVIT's unified LM: question files + their image folder -> answers -> accuracy.

- **VQAv2 / OK-VQA**: a questions file ``{"data_subtype"?, "questions": [{"question_id", "image_id", "question"}]}``
  and its annotations file (:func:`vlpretrain.eval.vqa.load_vqa`). An image's file is ``IMAGES/<pattern>``; the
  pattern's fields are ``{image_id}`` and ``{split}`` (``--split``, by default the questions file's
  ``data_subtype``, e.g. ``val2014``). Without a pattern, COCO's name ``COCO_{split}_{image_id:012d}.jpg`` is tried
  first, then a plain ``{image_id}.jpg``.
- **GQA**: a balanced questions file ``{qid: {"imageId", "question", "answer", "types"?}}``; the image is
  ``IMAGES/{imageId}.jpg`` (or another pattern with the field ``{imageId}``).

Every question is answered with beam search and LaVIT's prompt ``Question: {q} Answer:`` (5 beams, 1..10 new tokens,
cut at the first newline, comma or period), the answers are written in the official results format (VQAv2:
``[{"question_id", "answer"}]``; GQA: ``[{"questionId", "prediction"}]``) and scored by :mod:`vlpretrain.eval.vqa`.
Beam search draws no random numbers, so the result is deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpretrain.eval.files import field, read_json
from vlpretrain.eval.run_common import (
    ANSWER_SETTINGS,
    TextSettings,
    format_name,
    image_folder,
    in_batches,
    locate,
    write_json,
)
from vlpretrain.eval.vqa import load_gqa, load_vqa, score_gqa, score_vqa

if TYPE_CHECKING:
    from vlpretrain.lavit.pipeline import Pipeline

COCO_PATTERN = "COCO_{split}_{image_id:012d}.jpg"
PLAIN_PATTERN = "{image_id}.jpg"
GQA_PATTERN = "{imageId}.jpg"


def vqa_image_names(image_id: int | str, split: str | None, pattern: str | None = None) -> list[str]:
    """The file names a VQAv2 / OK-VQA image may have, in order (see the module docstring)."""
    if pattern is not None:
        fields = {"image_id": image_id} | ({"split": split} if split else {})
        return [format_name(pattern, "--image-pattern", **fields)]
    names = [COCO_PATTERN.format(split=split, image_id=image_id)] if split and isinstance(image_id, int) else []
    return names + [PLAIN_PATTERN.format(image_id=image_id)]


def answer(pipe: Pipeline, pairs: list[tuple[Path, str]], settings: TextSettings, progress: bool) -> list[str]:
    """One answer per (image path, question), in batches with a progress bar."""

    def ask(chunk: list[tuple[Path, str]]) -> list[str]:
        return pipe.ask([str(p) for p, _ in chunk], [q for _, q in chunk], len(chunk), settings.num_beams,
                        settings.min_new_tokens, settings.max_new_tokens)  # fmt: skip

    return in_batches(ask, pairs, settings.batch_size, "answers", progress)


def _data_subtype(questions: str | Path) -> str | None:
    data = read_json(questions)
    subtype = data.get("data_subtype") if isinstance(data, dict) else None
    return subtype if isinstance(subtype, str) and subtype else None


def run_vqa(
    pipe: Pipeline,
    questions: str | Path,
    annotations: str | Path,
    images: str | Path,
    pattern: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    settings: TextSettings = ANSWER_SETTINGS,
    allow_missing: bool = False,
    predictions_path: str | Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Answer the VQAv2 / OK-VQA questions and score the answers.

    Args:
        pipe: a loaded LaVIT LM pipeline.
        questions, annotations: the benchmark's two files.
        images: the image folder; ``pattern`` and ``split`` name the files in it (see the module docstring).
        limit: answer only the first ``limit`` questions (a subset: not comparable to published numbers).
        settings: beam search settings.
        allow_missing: skip questions whose image is absent (counted in ``missing_images``) instead of failing.
        predictions_path: where to write ``[{"question_id", "answer"}]``; None = not written.
        progress: show a progress bar.

    Returns:
        ``vqa_accuracy``, ``vqa_<answer type>``, ``questions`` (answered) and ``missing_images``.
    """
    items = load_vqa(questions, annotations)
    split = split or _data_subtype(questions)
    root = image_folder(images)
    qids = list(items)[:limit]
    found, skipped = locate(qids, lambda q: [root / n for n in vqa_image_names(items[q]["image_id"], split, pattern)],
                            lambda q: f"question {q} of {questions}", allow_missing)  # fmt: skip
    answers = answer(pipe, [(path, items[q]["question"]) for q, path in found], settings, progress)
    rows = [{"question_id": q, "answer": a} for (q, _), a in zip(found, answers, strict=True)]
    write_json(predictions_path, rows)
    scored = score_vqa({str(r["question_id"]): r["answer"] for r in rows}, {q: items[q] for q, _ in found})
    return scored | {"missing_images": float(skipped)}


def _gqa_questions(questions: str | Path, qids: list[str]) -> dict[str, tuple[str, str]]:
    """``{qid: (imageId, question)}`` of the chosen questions."""
    data: dict[str, Any] = read_json(questions)
    source = str(questions)
    return {q: (field(data[q], "imageId", source, q, str), field(data[q], "question", source, q, str)) for q in qids}


def run_gqa(
    pipe: Pipeline,
    questions: str | Path,
    images: str | Path,
    pattern: str = GQA_PATTERN,
    limit: int | None = None,
    settings: TextSettings = ANSWER_SETTINGS,
    normalize: bool = False,
    allow_missing: bool = False,
    predictions_path: str | Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Answer the GQA questions and score them by exact match (``normalize``: after the VQAv2 normalisation).

    Returns:
        ``gqa_accuracy``, ``gqa_<structural type>``, ``questions`` (answered) and ``missing_images``; the answers go
        to ``predictions_path`` as ``[{"questionId", "prediction"}]``. The other arguments are :func:`run_vqa`'s.
    """
    items = load_gqa(questions)
    root = image_folder(images)
    asked = _gqa_questions(questions, list(items)[:limit])

    def paths(q: str) -> list[Path]:
        return [root / format_name(pattern, "--image-pattern", imageId=asked[q][0])]

    found, skipped = locate(list(asked), paths, lambda q: f"question {q} of {questions}", allow_missing)
    answers = answer(pipe, [(path, asked[q][1]) for q, path in found], settings, progress)
    rows = [{"questionId": q, "prediction": a} for (q, _), a in zip(found, answers, strict=True)]
    write_json(predictions_path, rows)
    scored = score_gqa({r["questionId"]: r["prediction"] for r in rows}, {q: items[q] for q, _ in found}, normalize)
    return scored | {"missing_images": float(skipped)}


__all__ = ["COCO_PATTERN", "GQA_PATTERN", "PLAIN_PATTERN", "answer", "run_gqa", "run_vqa", "vqa_image_names"]
