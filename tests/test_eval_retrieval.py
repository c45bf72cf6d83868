"""Retrieval recall@K on hand-built embeddings, saved in both file formats; zero-shot classification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlpretrain.cli import main
from vlpretrain.errors import UserError
from vlpretrain.eval.retrieval import load_embeddings, recall_at_k, retrieval_ranks
from vlpretrain.eval.zero_shot import class_embeddings, run

# 3 one-hot images; 5 captions, two for image 0, one for image 1, two for image 2.
IMAGES = torch.eye(3)
TEXTS = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.0], [0.0, 0.3, 1.0], [0.9, 0.0, 1.0], [1.0, 0.0, 0.3]])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])
# By hand (cosine = the caption's normalised coordinate of the image's axis):
# text -> image: t0 finds image 0 first; t1 prefers image 1; t2 image 2; t3 finds image 2 (1 > 0.9); t4 image 0.
T2I_RANKS = [0, 1, 1, 0, 1]
# image -> text: image 0's best own caption t0 (0.98) beats t4 (0.96); image 1's own t2 (0.29) loses to t1 (0.89);
# image 2's best own t3 (0.74) loses to t2 (0.96).
I2T_RANKS = [0, 1, 1]


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


@pytest.mark.parametrize("block", [1, 2, 1024])
def test_ranks_by_hand(block: int) -> None:
    i2t, t2i = retrieval_ranks(IMAGES, TEXTS, TEXT_TO_IMAGE, block=block)
    assert i2t.tolist() == I2T_RANKS and t2i.tolist() == T2I_RANKS


def test_recall_at_k() -> None:
    metrics = recall_at_k(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 2, 5))
    assert metrics["i2t_r@1"] == pytest.approx(1 / 3) and metrics["t2i_r@1"] == pytest.approx(2 / 5)
    assert metrics["i2t_r@2"] == metrics["t2i_r@2"] == metrics["t2i_r@5"] == 1.0
    assert metrics["r_mean"] == pytest.approx((1 / 3 + 1 + 1 + 2 / 5 + 1 + 1) / 6)


def test_ties_count_against_the_model() -> None:
    metrics = recall_at_k(torch.ones(4, 8), torch.ones(8, 8), torch.arange(8) // 2, ks=(1,))
    assert metrics["i2t_r@1"] == 0.0 and metrics["t2i_r@1"] == 0.0


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_reads_saved_embeddings(tmp_path: Path, suffix: str) -> None:
    tensors = {"image_embeddings": IMAGES, "text_embeddings": TEXTS, "text_to_image": TEXT_TO_IMAGE}
    path = tmp_path / f"emb{suffix}"
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save(tensors, path)
    assert cli(["eval", "retrieval", "--embeddings", str(path), "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["i2t_r@1"] == pytest.approx(1 / 3) and metrics["t2i_r@10"] == 1.0


def test_bad_embedding_files(tmp_path: Path) -> None:
    torch.save({"image_embeddings": IMAGES, "text_embeddings": TEXTS}, tmp_path / "e.pt")
    with pytest.raises(UserError, match="e.pt: missing tensor 'text_to_image'"):
        load_embeddings(tmp_path / "e.pt")
    with pytest.raises(UserError, match=r"text_to_image must hold image indices in 0..2"):
        recall_at_k(IMAGES, TEXTS, torch.tensor([0, 0, 1, 2, 3]))


def test_zero_shot_with_templates() -> None:
    names = ["red", "green", "blue"]

    def encode_text(prompts: list[str]) -> torch.Tensor:
        # the class axis, scaled per template: normalising each prompt before averaging removes the scale
        return torch.stack(
            [
                torch.eye(3)[next(i for i, n in enumerate(names) if n in p)] * (5.0 if "photo" in p else 1)
                for p in prompts
            ]
        )

    classifier = class_embeddings(names, encode_text, ["a {} thing.", "a photo of a {} object"])
    assert torch.allclose(classifier, torch.eye(3))
    images = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.2, 0.1, 0.9], [0.9, 0.8, 0]])
    labels = torch.tensor([0, 1, 2, 1])
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    metrics = run(encode_text, lambda x: x, batches, names, ["a {} thing."], topk=(1, 2))
    # the last image is nearest to red, green second: top-1 3/4, top-2 all
    assert metrics == {"zero_shot_top1": 0.75, "zero_shot_top2": 1.0, "images": 4.0}
    with pytest.raises(ValueError, match="has no '{}'"):
        class_embeddings(names, encode_text, ["a photo"])
