"""VQAv2 / OK-VQA accuracy and GQA exact match on tiny files in the public formats, against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpretrain.cli import main
from vlpretrain.errors import UserError
from vlpretrain.eval.vqa import load_vqa, normalize_answer, run, run_gqa, vqa_score


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("dont", "don't"),
        ("The  Ten\tapples", "10 apples"),
        ("none", "0"),
        ("2.5", "2.5"),  # a decimal point stays
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("red,blue", "red blue"),  # otherwise replaced by a space
        ("(yes)", "yes"),  # touching a space or an end: deleted
        ("t-shirt", "t-shirt"),  # hyphens are not in the punctuation list
        ("2:00", "2:00"),  # colons (times) stay
        ("youdve", "you'd've"),
        ("you'dve", "you'd've"),
        ("an apple", "apple"),
    ],
)
def test_normalization(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_annotator_subset_averaging() -> None:
    # 2 of 10 match: 8 of the 10 leave-one-out subsets keep both (2/3), 2 keep one (1/3) -> 0.6
    assert vqa_score("Two", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_score("3", ["3"] * 3 + ["4"] * 7) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert vqa_score("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert vqa_score("1 ", ["1"] + ["2"] * 9) == pytest.approx(0.3)  # (9 * 1/3 + 1 * 0) / 10
    assert vqa_score("cat", ["dog"] * 10) == 0.0
    # annotators' answers get the punctuation step only when they disagree
    assert vqa_score("red blue", ["red,blue"] * 3 + ["red"] * 7) == pytest.approx(0.9)
    assert vqa_score("red blue", ["red,blue"] * 10) == 0.0


@pytest.fixture
def vqa_files(tmp_path: Path) -> dict[str, Path]:
    questions = {
        "questions": [
            {"question_id": 1, "image_id": 10, "question": "How many?"},
            {"question_id": 2, "image_id": 10, "question": "Is it red?"},
            {"question_id": 3, "image_id": 11, "question": "What is it?"},
        ]
    }
    answers = {1: ["2", "2"] + ["3"] * 8, 2: ["yes"] * 10, 3: ["dog"] * 9 + ["puppy"]}
    types = {1: "number", 2: "yes/no", 3: "other"}
    annotations = {
        "annotations": [
            {
                "question_id": q,
                "image_id": 10,
                "answer_type": types[q],
                "question_type": "x",
                "answers": [
                    {"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(ans)
                ],
            }
            for q, ans in answers.items()
        ]
    }
    preds = [
        {"question_id": 1, "answer": "two"},
        {"question_id": 2, "answer": "Yes."},
        {"question_id": 3, "answer": "a puppy"},
    ]
    return {
        "questions": _write(tmp_path / "q.json", questions),
        "annotations": _write(tmp_path / "a.json", annotations),
        "predictions": _write(tmp_path / "p.json", preds),
        "root": tmp_path,
    }


def test_vqa_files_through_the_cli(vqa_files: dict[str, Path]) -> None:
    out = vqa_files["root"] / "metrics.json"
    code = cli(
        [
            "eval",
            "vqa",
            "--predictions",
            str(vqa_files["predictions"]),
            "--questions",
            str(vqa_files["questions"]),
            "--annotations",
            str(vqa_files["annotations"]),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    # 0.6 (2 of 10), 1.0 (10 of 10), 0.3 (1 of 10: 9 subsets give 1/3)
    assert metrics["vqa_accuracy"] == pytest.approx((0.6 + 1.0 + 0.3) / 3)
    assert metrics["vqa_number"] == pytest.approx(0.6) and metrics["vqa_yes_no"] == 1.0
    assert metrics["vqa_other"] == pytest.approx(0.3) and metrics["questions"] == 3


def test_vqa_coverage_and_bad_files(vqa_files: dict[str, Path], tmp_path: Path) -> None:
    partial = _write(tmp_path / "partial.json", [{"question_id": 2, "answer": "yes"}])
    with pytest.raises(UserError, match="2 questions have no predicted answer"):
        run(partial, vqa_files["questions"], vqa_files["annotations"])
    assert run(partial, vqa_files["questions"], vqa_files["annotations"], allow_missing=True)["vqa_accuracy"] == 1.0
    bad = _write(tmp_path / "ann.json", {"annotations": [{"question_id": 1, "answers": [{"text": "2"}]}]})
    with pytest.raises(UserError, match=r"ann.json: annotations\[0\].answers\[0\]: missing field 'answer'"):
        load_vqa(vqa_files["questions"], bad)
    no_list = _write(tmp_path / "q2.json", {"question": []})
    with pytest.raises(UserError, match="q2.json: top level: missing field 'questions'"):
        load_vqa(no_list, vqa_files["annotations"])


def test_gqa_exact_match(tmp_path: Path) -> None:
    questions = {
        "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "types": {"structural": "verify"}},
        "202": {"imageId": "n1", "question": "What color?", "answer": "red", "types": {"structural": "query"}},
        "203": {"imageId": "n2", "question": "Which?", "answer": "cat", "types": {"structural": "query"}},
    }
    q = _write(tmp_path / "testdev_balanced_questions.json", questions)
    preds = _write(
        tmp_path / "p.json",
        [
            {"questionId": "201", "prediction": "yes"},
            {"questionId": "202", "prediction": "Red."},
            {"questionId": "203", "prediction": "dog"},
        ],
    )
    exact = run_gqa(preds, q)
    assert exact["gqa_accuracy"] == pytest.approx(1 / 3) and exact["gqa_verify"] == 1.0 and exact["gqa_query"] == 0.0
    assert run_gqa(preds, q, normalize=True)["gqa_accuracy"] == pytest.approx(2 / 3)
    out = tmp_path / "out"
    out.mkdir()
    assert cli(["eval", "gqa", "--predictions", str(preds), "--questions", str(q), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["gqa_accuracy"] == pytest.approx(1 / 3)


def test_gqa_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    q = _write(tmp_path / "q.json", {"1": {"question": "x"}})
    p = _write(tmp_path / "p.json", [{"questionId": "1", "prediction": "yes"}])
    assert cli(["eval", "gqa", "--predictions", str(p), "--questions", str(q)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {q}: 1: missing field 'answer'"
