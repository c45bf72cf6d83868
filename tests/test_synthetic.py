"""Shapes world: determinism, ground truth that matches the text, compositional split, documents."""

from __future__ import annotations

import numpy as np
import pytest

from vlpretrain.data.synthetic import (
    COLORS,
    SHAPES,
    SynthConfig,
    make_document,
    make_example,
    position_name,
)

CFG = SynthConfig()


def test_same_seed_same_example_other_seed_differs() -> None:
    a, b = make_example(CFG, "train", 7), make_example(CFG, "train", 7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.qa == b.qa
    c = make_example(SynthConfig(seed=1), "train", 7)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, make_example(CFG, "val", 7).image)


@pytest.mark.parametrize("size", [8, 64, 224])
def test_image_shape_and_dtype(size: int) -> None:
    ex = make_example(SynthConfig(image_size=size), "train", 0)
    assert ex.image.shape == (size, size, 3) and ex.image.dtype == np.uint8


def test_objects_are_drawn_in_their_cells() -> None:
    """Each object's colour dominates the centre of its cell; empty cells show only background (< 100)."""
    for i in range(50):
        ex = make_example(CFG, "train", i)
        cell = CFG.image_size / CFG.grid
        occupied = {(o.row, o.col): o for o in ex.scene.objects}
        for r in range(CFG.grid):
            for c in range(CFG.grid):
                centre = ex.image[int((r + 0.5) * cell), int((c + 0.5) * cell)].astype(int)
                if (r, c) in occupied:
                    assert np.abs(centre - np.array(COLORS[occupied[(r, c)].color])).max() <= 1
                else:
                    assert centre.max() < 100 + 25


def test_caption_and_qa_match_the_record() -> None:
    for i in range(200):
        ex = make_example(CFG, "train", i)
        objs = ex.scene.objects
        for o in objs:
            assert f"{o.size} {o.color} {o.shape}" in ex.caption
        answers = {qa["type"]: qa for qa in ex.qa}
        assert answers["count"]["answer"] == ["zero", "one", "two", "three", "four", "five"][len(objs)]
        if "color" in answers:
            shape = answers["color"]["question"].split()[-1].rstrip("?")
            assert answers["color"]["answer"] == next(o.color for o in objs if o.shape == shape)
        if "position" in answers:
            _, _, _, color, shape = answers["position"]["question"].rstrip("?").split()
            o = next(o for o in objs if (o.color, o.shape) == (color, shape))
            assert answers["position"]["answer"] == position_name(o, CFG.grid)
        words = answers["yesno"]["question"].rstrip("?").split()
        present = any((o.color, o.shape) == (words[-2], words[-1]) for o in objs)
        assert answers["yesno"]["answer"] == ("yes" if present else "no")


def test_yesno_pairs_add_the_other_answer_to_training_images_only() -> None:
    paired = SynthConfig(yesno_pairs=True)
    for i in range(100):
        plain, ex = make_example(CFG, "train", i), make_example(paired, "train", i)
        assert ex.caption == plain.caption and ex.qa[:-1] == plain.qa and np.array_equal(ex.image, plain.image)
        yesno = [qa for qa in ex.qa if qa["type"] == "yesno"]
        assert sorted(qa["answer"] for qa in yesno) == ["no", "yes"]
        for qa in yesno:
            words = qa["question"].rstrip("?").split()
            present = any((o.color, o.shape) == (words[-2], words[-1]) for o in ex.scene.objects)
            assert qa["answer"] == ("yes" if present else "no")
        assert make_example(paired, "test", i).qa == make_example(CFG, "test", i).qa


def test_variety_of_objects_and_backgrounds() -> None:
    exs = [make_example(CFG, "train", i) for i in range(300)]
    counts = {len(e.scene.objects) for e in exs}
    assert counts == set(range(1, 6))
    assert {o.shape for e in exs for o in e.scene.objects} == set(SHAPES)
    assert {o.color for e in exs for o in e.scene.objects} == set(COLORS)
    assert {e.scene.background["kind"] for e in exs} == {"plain", "gradient", "texture"}


def test_compositional_split_holds_pairs_out_of_train() -> None:
    cfg = SynthConfig(compositional=True)
    held = {tuple(p.split()) for p in cfg.held_out}
    for i in range(300):
        assert not {(o.color, o.shape) for o in make_example(cfg, "train", i).scene.objects} & held
        assert {(o.color, o.shape) for o in make_example(cfg, "test", i).scene.objects} & held


def test_document_matches_images_to_their_captions() -> None:
    doc, images = make_document(CFG, "train", 3)
    assert len(doc["image_info"]) == len(images)
    for info in doc["image_info"]:
        if info["matched_sim"] >= 0.24:
            assert doc["text_list"][info["matched_text_index"]].split()[1].startswith("object")
    assert make_document(CFG, "train", 3) == (doc, images)
