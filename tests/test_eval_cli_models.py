"""`vlpretrain eval TASK --checkpoint DIR --data PATH`: a tiny LaVIT LM run on fixture files in each public format
(Karpathy split, COCO captions, VQAv2 questions + annotations, GQA), the detokenizer's reconstruction score and the
text-to-image FID; metrics.json must follow from the written predictions and be identical on a second run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_lavit_lm import micro_config, micro_tokenizer, tokenizer_folder

from vlpretrain.cli import main
from vlpretrain.data.synthetic import SynthConfig, make_example
from vlpretrain.eval import captioning, vqa
from vlpretrain.eval.vqa import normalize_answer
from vlpretrain.lavit.lm_task import LavitLMTask
from vlpretrain.train.pretrained import save_task

java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")
IDS = (391895, 522418, 184613, 318219)  # COCO-like image ids
SIDE = 32  # the micro detokenizer's images
FAST = ["--max-new-tokens", "4"]  # short generations keep the tiny LM quick
_ANSWER_TYPES = {"count": "number", "yesno": "yes/no"}


def _micro_detokenizer(tok: Path, out: Path) -> Path:
    from vlpretrain.configs import get_preset
    from vlpretrain.lavit.detokenizer import DetokenizerConfig
    from vlpretrain.lavit.detokenizer_task import LavitDetokenizerTask

    unet = {"sample_size": SIDE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4,
            "cross_attention_dim": 64, "norm_num_groups": 8}  # fmt: skip
    cfg = DetokenizerConfig(tokenizer=str(tok), image_size=SIDE, unet=unet, sample_steps=1,
                            scheduler=get_preset("lavit-detokenizer", "tiny").scheduler)  # fmt: skip
    torch.manual_seed(0)
    return save_task(LavitDetokenizerTask(cfg), "lavit-detokenizer", cfg, out)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _benchmark_files(root: Path) -> dict[str, Path]:
    """Four shapes-world images as COCO val2014 JPEGs (and GQA PNGs) with the annotation files that name them."""
    examples = {i: make_example(SynthConfig(), "test", k) for k, i in enumerate(IDS)}
    coco_dir = root / "images" / "val2014"
    coco_dir.mkdir(parents=True)
    (root / "gqa").mkdir()
    for i, ex in examples.items():
        Image.fromarray(ex.image).save(coco_dir / f"COCO_val2014_{i:012d}.jpg", quality=95)
        Image.fromarray(ex.image).save(root / "gqa" / f"n{i}.png")
    # two references per image: the scene's caption and its first sentence
    refs = {i: [ex.caption, ex.caption.split(".")[0] + "."] for i, ex in examples.items()}
    karpathy = {"images": [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i,
                            "split": "test", "sentences": [{"raw": r} for r in refs[i]]} for i in IDS]
                + [{"filepath": "train2014", "filename": "absent.jpg", "cocoid": 7, "split": "train",
                    "sentences": [{"raw": "not read"}]}]}  # fmt: skip
    coco = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in IDS],
            "annotations": [{"id": 10 * i + j, "image_id": i, "caption": r} for i in IDS
                            for j, r in enumerate(refs[i])]}  # fmt: skip
    qa = [(i, j, q) for i, ex in examples.items() for j, q in enumerate([ex.qa[0], ex.qa[4]])]  # count, yes/no
    questions = {"data_subtype": "val2014", "questions": [{"question_id": 10 * i + j, "image_id": i,
                                                           "question": q["question"]} for i, j, q in qa]}  # fmt: skip
    annotations = {"annotations": [{"question_id": 10 * i + j, "answer_type": _ANSWER_TYPES.get(q["type"], "other"),
                                    "answers": [{"answer": normalize_answer(q["answer"])}] * 10}
                                   for i, j, q in qa]}  # fmt: skip
    gqa = {f"q{i}{j}": {"imageId": f"n{i}", "question": q["question"], "answer": q["answer"],
                        "types": {"structural": "query"}} for i, j, q in qa}  # fmt: skip
    return {
        "karpathy": _write(root / "dataset_coco.json", karpathy),
        "coco": _write(root / "captions_val2014.json", coco),
        "questions": _write(root / "OpenEnded_mscoco_val2014_questions.json", questions),
        "annotations": _write(root / "mscoco_val2014_annotations.json", annotations),
        "gqa": _write(root / "testdev_balanced_questions.json", gqa),
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A micro tokenizer, LM (random weights) and detokenizer, and the benchmark files."""
    root = tmp_path_factory.mktemp("bench")
    tok = tokenizer_folder(root / "tok")
    cfg = micro_config(tokenizer=str(tok))
    torch.manual_seed(0)
    lm = save_task(LavitLMTask(cfg, micro_tokenizer()), "lavit-lm", cfg, root / "lm")
    detok = _micro_detokenizer(tok, root / "detok")
    return SimpleNamespace(root=root, lm=str(lm), detok=str(detok), images=root / "images", **_benchmark_files(root))


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of a command."""
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    return code, capsys.readouterr().err.strip()


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@java
def test_captions_from_a_checkpoint(bench: SimpleNamespace, tmp_path: Path, capsys) -> None:
    quick = ["--metrics", "bleu,rouge,cider"]  # METEOR's Java start costs ~20 s: once, below
    karpathy = ["eval", "captions", "--checkpoint", bench.lm, "--data", str(bench.karpathy), "--images",
                str(bench.images), "--beams", "1", "--min-new-tokens", "2", *FAST, *quick]  # fmt: skip
    assert _cli([*karpathy, "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert _cli([*karpathy, "--out", str(tmp_path / "b"), "--batch-size", "1"], capsys)[0] == 0
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    predictions = tmp_path / "a" / "predictions.json"
    rows = json.loads(predictions.read_text())
    assert [r["image_id"] for r in rows] == list(IDS)  # the test split only, in file order, ids as in the file
    metrics = _metrics(tmp_path / "a")
    assert metrics["images"] == 4 and metrics["missing_images"] == 0 and "meteor" not in metrics
    rescored = captioning.run(predictions, bench.karpathy, metrics=("bleu", "rouge", "cider"))  # the written file
    assert metrics == pytest.approx(rescored | {"missing_images": 0.0})
    # the COCO captions file over the same images (file_name under --images val2014/) gives the same captions
    coco = ["eval", "captions", "--checkpoint", bench.lm, "--annotations", str(bench.coco), "--images",
            str(bench.images / "val2014"), "--beams", "1", "--min-new-tokens", "2", *FAST, "--limit", "2", "--out",
            str(tmp_path / "c" / "coco.json")]  # fmt: skip
    assert _cli(coco, capsys)[0] == 0
    assert json.loads((tmp_path / "c" / "predictions.json").read_text()) == rows[:2]
    metrics = json.loads((tmp_path / "c" / "coco.json").read_text())
    assert metrics["images"] == 2 and {"bleu_4", "meteor", "rouge_l", "cider"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in ("bleu_4", "meteor", "rouge_l"))


def test_vqa_and_gqa_from_a_checkpoint(bench: SimpleNamespace, tmp_path: Path, capsys) -> None:
    base = ["eval", "vqa", "--checkpoint", bench.lm, "--data", str(bench.questions), "--annotations",
            str(bench.annotations), "--images", str(bench.images / "val2014"), "--beams", "2", *FAST]  # fmt: skip
    assert _cli([*base, "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert _cli([*base, "--out", str(tmp_path / "b"), "--batch-size", "3"], capsys)[0] == 0
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    metrics, predictions = _metrics(tmp_path / "a"), tmp_path / "a" / "predictions.json"
    rows = json.loads(predictions.read_text())
    assert len(rows) == metrics["questions"] == 8 and metrics["missing_images"] == 0
    assert {"vqa_accuracy", "vqa_number", "vqa_yes_no"} <= set(metrics)
    # 10 identical annotator answers (normalised, as in VQAv2's files): 1 when the normalised answer matches, else 0
    truth = {q["question_id"]: a["answers"][0]["answer"] for q, a in zip(
        json.loads(bench.questions.read_text())["questions"], json.loads(bench.annotations.read_text())["annotations"],
        strict=True)}  # fmt: skip
    hits = [normalize_answer(r["answer"]) == truth[r["question_id"]] for r in rows]
    assert metrics["vqa_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert metrics["vqa_accuracy"] == pytest.approx(vqa.run(predictions, bench.questions, bench.annotations)
                                                    ["vqa_accuracy"])  # fmt: skip

    gqa = ["eval", "gqa", "--checkpoint", bench.lm, "--questions", str(bench.gqa), "--images",
           str(bench.root / "gqa"), "--image-pattern", "{imageId}.png", "--beams", "2", *FAST]  # fmt: skip
    assert _cli([*gqa, "--out", str(tmp_path / "g")], capsys)[0] == 0
    answers = json.loads((tmp_path / "g" / "predictions.json").read_text())
    assert [r["questionId"] for r in answers] == list(json.loads(bench.gqa.read_text()))
    # the same images and questions as the VQA run: the same answers
    assert [r["prediction"] for r in answers] == [r["answer"] for r in rows]
    rescored = vqa.run_gqa(tmp_path / "g" / "predictions.json", bench.gqa)
    assert _metrics(tmp_path / "g") == pytest.approx(rescored | {"missing_images": 0.0})


class Oracle:
    """A stand-in pipeline that reads nothing but the file name it is given: the true caption of each image, the
    true answer to the count question and a wrong one to the yes/no question (so that misaligned images, questions
    or predictions change the scores)."""

    def __init__(self) -> None:
        examples = {i: make_example(SynthConfig(), "test", k) for k, i in enumerate(IDS)}
        self.captions = {i: ex.caption for i, ex in examples.items()}
        self.answers = {(i, q["question"]): q["answer"] if q["type"] == "count" else "maybe"
                        for i, ex in examples.items() for q in ex.qa}  # fmt: skip

    @staticmethod
    def _id(path: str) -> int:
        return int(Path(path).stem.split("_")[-1].lstrip("n"))

    def caption(self, images: list[str], *settings: int) -> list[str]:
        return [self.captions[self._id(p)] for p in images]

    def ask(self, images: list[str], questions: list[str], *settings: int) -> list[str]:
        return [self.answers[(self._id(p), q)] for p, q in zip(images, questions, strict=True)]


def test_scores_follow_from_the_predictions(bench: SimpleNamespace, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("vlpretrain.cli.lavit_lm._pipeline", lambda *args: Oracle())
    plain = tmp_path / "plain"  # {image_id}.jpg: the fallback when COCO's name is not there
    plain.mkdir()
    for i in IDS:
        shutil.copy(bench.images / "val2014" / f"COCO_val2014_{i:012d}.jpg", plain / f"{i}.jpg")
    args = ["--checkpoint", "oracle", "--images", str(plain)]
    assert _cli(["eval", "vqa", "--data", str(bench.questions), "--annotations", str(bench.annotations), *args,
                 "--out", str(tmp_path / "vqa")], capsys)[0] == 0  # fmt: skip
    metrics = _metrics(tmp_path / "vqa")
    assert (metrics["vqa_number"], metrics["vqa_yes_no"], metrics["vqa_accuracy"]) == (1.0, 0.0, 0.5)
    args[-1] = str(bench.root / "gqa")
    assert _cli(["eval", "gqa", "--data", str(bench.gqa), "--image-pattern", "{imageId}.png", *args, "--out",
                 str(tmp_path / "gqa")], capsys)[0] == 0  # fmt: skip
    assert _metrics(tmp_path / "gqa")["gqa_accuracy"] == 0.5
    if shutil.which("java") is not None:  # the PTB tokenizer
        args[-1] = str(bench.images)
        assert _cli(["eval", "captions", "--data", str(bench.karpathy), *args, "--metrics", "bleu", "--out",
                     str(tmp_path / "cap")], capsys)[0] == 0  # fmt: skip
        assert _metrics(tmp_path / "cap")["bleu_4"] == pytest.approx(1.0)  # each caption is one of its references


def test_missing_images_and_bad_arguments(bench: SimpleNamespace, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(bench.images / "val2014", images)
    gone = images / f"COCO_val2014_{IDS[1]:012d}.jpg"
    gone.unlink()
    base = ["eval", "vqa", "--checkpoint", bench.lm, "--data", str(bench.questions), "--annotations",
            str(bench.annotations), "--images", str(images), "--beams", "1", *FAST, "--out", str(tmp_path)]  # fmt: skip
    code, err = _cli(base, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and str(gone) in err and f"{IDS[1]}.jpg" in err
    assert _cli([*base, "--allow-missing"], capsys)[0] == 0
    metrics = _metrics(tmp_path)
    assert metrics["missing_images"] == 2 and metrics["questions"] == 6  # two questions per image
    assert all(r["question_id"] // 10 != IDS[1] for r in json.loads((tmp_path / "predictions.json").read_text()))

    both = ["eval", "captions", "--predictions", str(tmp_path / "p.json"), "--checkpoint", bench.lm, "--data",
            str(bench.karpathy), "--images", str(images)]  # fmt: skip
    for argv, message in [
        (both, "exactly one of --predictions"),
        (["eval", "captions", "--data", str(bench.karpathy)], "exactly one of --predictions"),
        (["eval", "gqa", "--checkpoint", bench.lm, "--data", str(bench.gqa)], "--images"),
        (
            [
                "eval",
                "gqa",
                "--checkpoint",
                bench.lm,
                "--data",
                str(bench.gqa),
                "--images",
                str(images),
                "--image-pattern",
                "{image}.png",
            ],
            "--image-pattern '{image}.png'",
        ),  # fmt: skip
        (
            ["eval", "fid", "--checkpoint", bench.lm, "--data", str(bench.coco), "--images", str(images)],
            "needs a detokenizer",
        ),  # fmt: skip
        (
            [
                "eval",
                "fid",
                "--checkpoint",
                bench.lm,
                "--detokenizer",
                bench.detok,
                "--data",
                str(bench.coco),
                "--images",
                str(bench.images / "val2014"),
                "--inception-weights",
                str(tmp_path / "none.pth"),
            ],
            "none.pth: no such file",
        ),  # fmt: skip
    ]:
        code, err = _cli(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)


def test_text_to_image_fid(bench: SimpleNamespace, tmp_path: Path, capsys) -> None:
    base = ["eval", "fid", "--checkpoint", bench.lm, "--detokenizer", bench.detok, "--data", str(bench.karpathy),
            "--images", str(bench.images), "--max-tokens", "6", "--batch-size", "2", "--seed", "3"]  # fmt: skip
    assert _cli([*base, "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert _cli([*base, "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    metrics = _metrics(tmp_path / "a")
    assert "fid" not in metrics and metrics["fid_lavit_tokenizer_vit"] > 0  # random drawings differ from the reals
    assert "not comparable to published FID" in metrics["fid_note"]
    assert metrics["real_images"] == metrics["fake_images"] == 4 and metrics["missing_images"] == 0
    rows = json.loads((tmp_path / "a" / "predictions.json").read_text())
    karpathy = json.loads(bench.karpathy.read_text())["images"]
    assert [r["caption"] for r in rows] == [im["sentences"][0]["raw"] for im in karpathy[:4]]  # first references
    assert [r["seed"] for r in rows] == [3, 4, 5, 6] and all(1 <= r["tokens"] <= 6 for r in rows)
    assert metrics["tokens_mean"] == pytest.approx(sum(r["tokens"] for r in rows) / 4)
    assert Image.open(tmp_path / "a" / "fid_pairs.png").size[0] > 2 * SIDE


def test_reconstruction_from_a_checkpoint(bench: SimpleNamespace, shapes_data: Path, tmp_path: Path, capsys) -> None:
    from vlpretrain.configs import get_preset
    from vlpretrain.data.judge import Judge, save_judge

    torch.manual_seed(0)
    judge = save_judge(Judge(get_preset("judge", "tiny")), tmp_path / "judge")  # random: the plumbing only
    base = ["eval", "reconstruction", "--checkpoint", bench.detok, "--data", str(shapes_data), "--judge", str(judge),
            "--limit", "3"]  # fmt: skip
    assert _cli([*base, "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert _cli([*base, "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    metrics = _metrics(tmp_path / "a")
    assert metrics["images"] == 3 and "images_per_s" not in metrics
    for prefix in ("agree", "truth", "judge"):
        parts = [metrics[f"{prefix}_{k}"] for k in ("count", "colors", "shapes")]
        assert metrics[f"{prefix}_mean"] == pytest.approx(sum(parts) / 3)
    assert (tmp_path / "a" / "reconstruction.png").is_file()
    code, err = _cli([*base[:-4], "--judge", str(tmp_path / "no-judge"), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "no-judge" in err and not (tmp_path / "c").exists()  # fails before it runs
