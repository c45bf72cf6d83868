"""VQA accuracy: VQAv2 and OK-VQA (10 annotators, min(matches / 3, 1) over leave-one-out subsets), GQA exact match.

The VQAv2 answer normalisation follows the evaluation rules published with the benchmark (visualqa.org):

- line breaks and tabs become spaces; the answer is stripped;
- punctuation (``; / [ ] " ( ) = + \\ _ > < @ ` , ?``; not the apostrophe, the colon of times such as ``2:00``,
  the hyphen or the period) is replaced by a space, or deleted when it touches a space or when the answer holds a
  digit-comma-digit group (``1,000`` -> ``1000``);
- periods are deleted unless a digit follows (decimals such as ``2.5`` stay);
- lower case; number words ``none``/``zero``..``ten`` become digits; the articles ``a``, ``an``, ``the`` are dropped;
- contractions missing their apostrophes get them back (``dont`` -> ``don't``, ``youd've`` -> ``you'd've``).

As in the official script the prediction gets the whole normalisation, while the annotators' answers (already
normalised in the annotation files) only get the punctuation step, and only when they disagree. A prediction scores
``min(#annotators giving it / 3, 1)`` against each of the leave-one-out subsets of the annotators (10 subsets of 9
for VQAv2), averaged; the benchmark's accuracy is the mean over questions. Unlike the official script, which also
strips apostrophes and colons and whose contraction table mostly writes typographic apostrophes, the apostrophe and
colon are kept as the published rules say and contractions use the ASCII apostrophe: answers with an apostrophe
(``men's``, ``don't``) can then match, so scores can differ from the script's on those rare answers.

GQA (``testdev_balanced_questions.json``: ``{qid: {"imageId", "question", "answer", "types": {...}}}``) is scored
by exact string match, as its official script does; ``normalize=True`` applies the VQAv2 normalisation to both sides.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any

from vlpretrain.errors import UserError
from vlpretrain.eval.files import field, json_list, read_json

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS = {word: str(value) for value, word in enumerate(_NUMBERS)}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
# The marks the official script replaces by a space (or deletes, see _strip_punctuation), less the apostrophe and the
# colon that the published rules keep; hyphens ("t-shirt") and exclamation marks are left alone, as there.
_PUNCTUATION = ';/[]"()=+\\_><@`,?'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
# Contractions with their apostrophes; every spelling with some of them missing maps back to these.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're
they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd
who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've"""


def _contraction_table(contracted: Sequence[str]) -> dict[str, str]:
    """Each spelling of a contraction with at least one apostrophe left out -> the full spelling."""
    table: dict[str, str] = {}
    for word in contracted:
        parts = word.split("'")
        for keep in product((True, False), repeat=len(parts) - 1):
            if all(keep):
                continue
            spelled = parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:], strict=True))
            table.setdefault(spelled, word)
    return table


CONTRACTIONS = _contraction_table(_CONTRACTED.split())


def _strip_punctuation(text: str) -> str:
    """The punctuation step of the normalisation (see the module docstring)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """The VQAv2 normalisation of a predicted answer: ``"Two"`` -> ``"2"``, ``"a dog."`` -> ``"dog"``,
    ``"dont"`` -> ``"don't"``."""
    words = []
    for word in _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip()).lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction against the annotators' answers: the mean over leave-one-out subsets of
    ``min(#matches / 3, 1)`` (2 matches of 10 -> 0.6; 3 or more of 10 -> 1.0 except 3 -> 0.9)."""
    if not answers:
        raise ValueError("vqa_score: no annotator answers")
    predicted = normalize_answer(prediction)
    truth = [" ".join(a.replace("\n", " ").replace("\t", " ").split()) for a in answers]
    if len(set(truth)) > 1:
        truth = [_strip_punctuation(a) for a in truth]
    matches = sum(a == predicted for a in truth)
    # leaving out a matching annotator leaves matches - 1, any other leaves matches
    total = sum(min((matches - (a == predicted)) / 3, 1.0) for a in truth)
    return total / len(truth)


def load_vqa(questions: str | Path, annotations: str | Path) -> dict[int, dict[str, Any]]:
    """VQAv2 / OK-VQA files -> ``{question_id: {"question", "image_id", "answers", "answer_type"}}``.

    ``questions``: ``{"questions": [{"question_id", "image_id", "question"}]}``; ``annotations``:
    ``{"annotations": [{"question_id", "answers": [{"answer"}, ...], "answer_type"?, "question_type"?}]}``.
    """
    qsource, asource = str(questions), str(annotations)
    items: dict[int, dict[str, Any]] = {}
    for i, q in enumerate(json_list(read_json(questions), qsource, "questions")):
        qid = field(q, "question_id", qsource, f"questions[{i}]", int)
        items[qid] = {"question": field(q, "question", qsource, f"questions[{i}]", str),
                      "image_id": field(q, "image_id", qsource, f"questions[{i}]", (int, str))}  # fmt: skip
    for i, ann in enumerate(json_list(read_json(annotations), asource, "annotations")):
        where = f"annotations[{i}]"
        qid = field(ann, "question_id", asource, where, int)
        if qid not in items:
            raise UserError(f"{asource}: {where}: question_id {qid} is not in {qsource}")
        answers = field(ann, "answers", asource, where, list)
        items[qid]["answers"] = [
            field(a, "answer", asource, f"{where}.answers[{j}]", str) for j, a in enumerate(answers)
        ]
        items[qid]["answer_type"] = ann.get("answer_type", "other")
    unanswered = [q for q, item in items.items() if "answers" not in item]
    if unanswered:
        raise UserError(f"{asource}: {len(unanswered)} questions have no annotation (first: {unanswered[0]})")
    return items


def load_answers(path: str | Path, id_key: str = "question_id", answer_key: str = "answer") -> dict[str, str]:
    """Predictions ``[{id_key, answer_key}, ...]`` -> ``{str(id): answer}`` (question ids matched as strings)."""
    out: dict[str, str] = {}
    for i, row in enumerate(json_list(read_json(path), str(path))):
        qid = str(field(row, id_key, str(path), f"[{i}]", (int, str)))
        if qid in out:
            raise UserError(f"{path}: [{i}]: {id_key} {qid} has a second answer")
        out[qid] = field(row, answer_key, str(path), f"[{i}]", str)
    return out


def _check_coverage(predictions: Mapping[str, str], ids: Sequence[str], allow_missing: bool) -> list[str]:
    unknown = sorted(set(predictions) - set(ids))
    if unknown:
        raise UserError(f"{len(unknown)} predicted question ids are not in the annotations (first: {unknown[0]})")
    missing = [q for q in ids if q not in predictions]
    if missing and not allow_missing:
        raise UserError(f"{len(missing)} questions have no predicted answer (first: {missing[0]}); "
                        "pass allow_missing (--allow-missing) to score only the answered ones")  # fmt: skip
    scored = [q for q in ids if q in predictions]
    if not scored:
        raise UserError("no predicted answers")
    return scored


def score_vqa(
    predictions: Mapping[str, str], items: Mapping[int, Mapping[str, Any]], allow_missing: bool = False
) -> dict[str, float]:
    """``vqa_accuracy`` (mean :func:`vqa_score`) and ``vqa_<answer type>`` (``yes/no`` -> ``vqa_yes_no``), in [0, 1],
    plus ``questions``. ``predictions``: ``{str(question_id): answer}``; ``items``: from :func:`load_vqa`."""
    by_str = {str(q): item for q, item in items.items()}
    scored = _check_coverage(predictions, list(by_str), allow_missing)
    per_type: dict[str, list[float]] = defaultdict(list)
    for qid in scored:
        item = by_str[qid]
        per_type[str(item.get("answer_type", "other"))].append(vqa_score(predictions[qid], item["answers"]))
    total = [s for scores in per_type.values() for s in scores]
    metrics = {"vqa_accuracy": sum(total) / len(total)}
    for kind in sorted(per_type):
        metrics[f"vqa_{re.sub(r'[^a-z0-9]+', '_', kind.lower())}"] = sum(per_type[kind]) / len(per_type[kind])
    return metrics | {"questions": float(len(total))}


def load_gqa(path: str | Path) -> dict[str, dict[str, Any]]:
    """GQA balanced questions ``{qid: {"answer", "types"?: {"structural"}, ...}}`` -> ``{qid: {"answer", "type"}}``."""
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object {{question_id: question}}")
    items = {}
    for qid, q in data.items():
        types = q.get("types") if isinstance(q, dict) else None
        kind = types.get("structural", "all") if isinstance(types, dict) else "all"
        items[str(qid)] = {"answer": field(q, "answer", str(path), str(qid), str), "type": kind}
    return items


def score_gqa(
    predictions: Mapping[str, str], items: Mapping[str, Mapping[str, Any]], normalize: bool = False,
    allow_missing: bool = False,
) -> dict[str, float]:  # fmt: skip
    """``gqa_accuracy`` (exact match; with ``normalize`` after :func:`normalize_answer` on both sides) and
    ``gqa_<structural type>`` (verify, query, choose, logical, compare), plus ``questions``."""
    scored = _check_coverage(predictions, list(items), allow_missing)
    prep = normalize_answer if normalize else (lambda s: s)
    per_type: dict[str, list[float]] = defaultdict(list)
    for qid in scored:
        per_type[items[qid]["type"]].append(float(prep(predictions[qid]) == prep(items[qid]["answer"])))
    total = [s for scores in per_type.values() for s in scores]
    metrics = {"gqa_accuracy": sum(total) / len(total)}
    metrics |= {f"gqa_{kind}": sum(v) / len(v) for kind, v in sorted(per_type.items()) if kind != "all"}
    return metrics | {"questions": float(len(total))}


def run(
    predictions: str | Path, questions: str | Path, annotations: str | Path, allow_missing: bool = False
) -> dict[str, float]:
    """VQAv2 / OK-VQA accuracy from files: results ``[{"question_id", "answer"}]``, questions and annotations."""
    return score_vqa(load_answers(predictions), load_vqa(questions, annotations), allow_missing)


def run_gqa(
    predictions: str | Path, questions: str | Path, normalize: bool = False, allow_missing: bool = False
) -> dict[str, float]:
    """GQA accuracy from files: results ``[{"questionId", "prediction"}]`` (the official submission format) or
    ``[{"question_id", "answer"}]``, and a balanced questions file."""
    rows = json_list(read_json(predictions), str(predictions))
    keys = ("questionId", "prediction") if rows and isinstance(rows[0], dict) and "questionId" in rows[0] else None
    answers = load_answers(predictions, *keys) if keys else load_answers(predictions)
    return score_gqa(answers, load_gqa(questions), normalize, allow_missing)


__all__ = [
    "CONTRACTIONS",
    "load_answers",
    "load_gqa",
    "load_vqa",
    "normalize_answer",
    "run",
    "run_gqa",
    "score_gqa",
    "score_vqa",
    "vqa_score",
]
