"""Caption metrics on tiny COCO-format and Karpathy-split files, against hand-computed values (Java needed)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from vlpretrain.cli import main
from vlpretrain.errors import UserError
from vlpretrain.eval.captioning import load_predictions, load_references, run, score_captions

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")

# Distinct words per image, so every n-gram has a non-zero CIDEr document frequency weight.
CAPTIONS = {
    391895: "A man riding a red bicycle down a dirt road.",
    522418: "Two zebras grazing near tall green trees today",
    184613: "Kids flying yellow kites over sandy beach dunes",
}


def cli(args: list[str]) -> int:
    """Run the command line; its exit status."""
    try:
        main(args)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captions")
    coco = {
        "images": [{"id": k} for k in CAPTIONS],
        "annotations": [{"id": i, "image_id": k, "caption": c} for i, (k, c) in enumerate(CAPTIONS.items())],
    }
    karpathy = {
        "images": [
            {"filename": f"{k}.jpg", "split": "test", "cocoid": k, "sentences": [{"raw": c, "tokens": c.split()}]}
            for k, c in CAPTIONS.items()
        ]
        + [{"filename": "x.jpg", "split": "train", "cocoid": 1, "sentences": [{"raw": "not read"}]}]
    }
    return {
        "coco": _write(root / "captions_test.json", coco),
        "karpathy": _write(root / "dataset_coco.json", karpathy),
        "predictions": _write(root / "pred.json", [{"image_id": k, "caption": c} for k, c in CAPTIONS.items()]),
        "root": root,
    }


@pytest.fixture(scope="module")
def identical_metrics(files: dict[str, Path]) -> dict[str, float]:
    """Every metric (METEOR starts its Java process once) through the CLI, identical candidates and references."""
    code = cli(
        [
            "eval",
            "captions",
            "--predictions",
            str(files["predictions"]),
            "--annotations",
            str(files["karpathy"]),
            "--format",
            "karpathy",
            "--out",
            str(files["root"] / "metrics.json"),
        ]
    )
    assert code == 0
    return json.loads((files["root"] / "metrics.json").read_text())


def test_identical_captions_reach_the_maxima(identical_metrics: dict[str, float]) -> None:
    for n in range(1, 5):
        assert identical_metrics[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert identical_metrics["meteor"] == pytest.approx(1.0, abs=1e-3)
    assert identical_metrics["rouge_l"] == pytest.approx(1.0)
    assert identical_metrics["cider"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D is scaled by 10
    assert identical_metrics["images"] == 3 and "spice" not in identical_metrics


def test_both_reference_formats_read_the_same_captions(files: dict[str, Path]) -> None:
    coco, karpathy = load_references(files["coco"]), load_references(files["karpathy"], split="test")
    assert coco == karpathy == {str(k): [c] for k, c in CAPTIONS.items()}
    assert load_references(files["karpathy"], split="train") == {"1": ["not read"]}
    # imgid is the id when there is no cocoid (Flickr30k)
    flickr = _write(
        files["root"] / "flickr.json",
        {"images": [{"filename": "a.jpg", "split": "test", "imgid": 7, "sentences": [{"raw": "x"}]}]},
    )
    assert load_references(flickr) == {"7": ["x"]}


def test_hand_computed_brevity_penalty_and_rouge() -> None:
    # candidate = the first 4 of 8 reference words: every n-gram precision is 1, BP = exp(1 - 8/4)
    refs = {"1": ["a red circle sits at the top left"]}
    metrics = score_captions({"1": "A red circle sits."}, refs, metrics=("bleu", "rouge"))
    for n in range(1, 5):
        assert metrics[f"bleu_{n}"] == pytest.approx(math.exp(-1), abs=1e-6)
    # LCS 4: precision 1, recall 1/2, F with beta = 1.2
    assert metrics["rouge_l"] == pytest.approx((1 + 1.2**2) * 0.5 / (0.5 + 1.2**2))


def test_predictions_must_cover_the_references(files: dict[str, Path]) -> None:
    partial = {str(next(iter(CAPTIONS))): "a man riding a bicycle"}
    with pytest.raises(UserError, match="2 reference images have no prediction"):
        run(partial, files["coco"], metrics=("rouge",))
    assert run(partial, files["coco"], metrics=("rouge",), allow_missing=True)["images"] == 1
    with pytest.raises(UserError, match="have no references"):
        run({"5": "x"}, files["coco"], metrics=("rouge",))


def test_bad_files_name_the_file_and_field(files: dict[str, Path], tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.json", {"annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2}]})
    with pytest.raises(UserError, match=r"bad.json: annotations\[1\]: missing field 'caption'"):
        load_references(bad)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        load_predictions(tmp_path / "broken.json")
    dup = _write(tmp_path / "dup.json", [{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}])
    with pytest.raises(UserError, match=r"dup.json: \[1\]: image_id 1 has a second caption"):
        load_predictions(dup)


def test_cli_error_is_one_line(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _write(tmp_path / "pred.json", [{"image_id": 1}])
    code = cli(["eval", "captions", "--predictions", str(bad), "--annotations", str(files["coco"])])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0
    assert "pred.json: [0]: missing field 'caption'" in err
