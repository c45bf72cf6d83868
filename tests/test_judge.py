"""Tests of the shapes-world judge: model shapes, scoring helpers, checkpoints and (slow) learning to >= 95%."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlpretrain.configs import ConfigError, get_preset, list_presets
from vlpretrain.data.judge import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Judge,
    JudgeConfig,
    attribute_match,
    cells_to_objects,
    evaluate_judge,
    load_judge,
    objects_from_record,
    objects_to_cells,
    prompt_match,
    save_judge,
    score_objects,
    train_judge,
)
from vlpretrain.data.synthetic import ShapeObject, SynthConfig, make_example


def obj(shape: str, color: str, size: str, row: int, col: int) -> ShapeObject:
    return ShapeObject(shape=shape, color=color, size=size, row=row, col=col)


@pytest.fixture(scope="module")
def tiny_judge() -> Judge:
    """A tiny judge trained a few steps, so BatchNorm running statistics are not at their defaults."""
    return train_judge(get_preset("judge", "tiny"), SynthConfig(), steps=3, progress=False)


def test_presets_and_validation() -> None:
    assert {"judge/default", "judge/tiny"} <= set(list_presets("judge"))
    assert isinstance(get_preset("judge", "default"), JudgeConfig)
    with pytest.raises(ConfigError, match="image_size"):
        JudgeConfig(image_size=65)
    with pytest.raises(ConfigError, match="widths"):
        JudgeConfig(widths=[])
    with pytest.raises(ConfigError, match="widths"):  # 8 px cannot be pooled onto 3 x 3 cells after 4 halvings
        JudgeConfig(image_size=8, widths=[4, 4, 4, 4])
    with pytest.raises(ConfigError, match="lr"):
        JudgeConfig(lr=0.0)
    with pytest.raises(ConfigError, match="grid"):
        train_judge(JudgeConfig(grid=2), SynthConfig(grid=3), progress=False)


def test_training_is_reproducible_and_restores_threads(tiny_judge: Judge) -> None:
    threads = torch.get_num_threads()
    again = train_judge(get_preset("judge", "tiny"), SynthConfig(), steps=3, progress=False)
    assert torch.get_num_threads() == threads
    for key, value in tiny_judge.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_forward_and_read_shapes(tiny_judge: Judge) -> None:
    cfg = tiny_judge.cfg
    s, g = cfg.image_size, cfg.grid
    logits = tiny_judge(torch.rand(2, 3, s, s))
    assert {k: list(v.shape) for k, v in logits.items()} == {
        "occupancy": [2, 2, g, g],
        "shape": [2, 5, g, g],
        "color": [2, 8, g, g],
        "size": [2, 2, g, g],
    }
    with pytest.raises(ValueError, match="expected images"):
        tiny_judge(torch.rand(2, 3, s + 2, s + 2))
    # lists of uint8 arrays at the data's 64 px and float tensors of another size are both resized
    arrays = [make_example(SynthConfig(), "test", i).image for i in range(3)]
    assert arrays[0].shape == (64, 64, 3)
    read = tiny_judge.read(arrays)
    assert len(read) == 3
    for objects in read:
        assert all(isinstance(o, ShapeObject) for o in objects)
        assert [(o.row, o.col) for o in objects] == sorted((o.row, o.col) for o in objects)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    assert tiny_judge.read(batch) == read
    assert tiny_judge.predict_cells(batch, batch_size=2).shape == (3, 4, g, g)
    with pytest.raises(ValueError, match="image 0 is float32"):
        tiny_judge.read([arrays[0].astype(np.float32)])
    with pytest.raises(ValueError, match="image 1 is uint8 \\[32, 32, 3\\]"):
        tiny_judge.read([arrays[0], arrays[1][:32, :32]])


def test_cells_round_trip() -> None:
    objects = [obj("cross", "white", "small", 0, 2), obj("circle", "red", "large", 2, 1)]
    cells = objects_to_cells(objects, grid=3)
    assert cells.shape == (4, 3, 3)
    assert cells[0].sum() == 2 and (cells[1:, 0, 0] == -100).all()
    assert cells_to_objects(cells) == objects
    with pytest.raises(ValueError, match="outside"):
        objects_to_cells([obj("cross", "white", "small", 3, 0)], grid=3)
    record = {"objects": [o.__dict__ for o in reversed(objects)]}
    assert objects_from_record(record) == objects


def test_score_objects_by_hand() -> None:
    true = [
        obj("circle", "red", "small", 0, 0),
        obj("square", "blue", "large", 1, 1),
        obj("cross", "red", "large", 2, 2),
    ]
    assert score_objects(true, true) == {k: True for k in ("count", "colors", "shapes", "sizes", "positions", "exact")}
    # same attributes, objects swapped between two occupied cells: only `exact` fails
    swapped = [obj("square", "blue", "large", 0, 0), obj("circle", "red", "small", 1, 1), true[2]]
    assert score_objects(swapped, true) == {
        "count": True, "colors": True, "shapes": True, "sizes": True, "positions": True, "exact": False,
    }  # fmt: skip
    # one colour wrong (red -> green) and one size wrong (small -> large) on the first object
    recoloured = [obj("circle", "green", "large", 0, 0), *true[1:]]
    assert score_objects(recoloured, true) == {
        "count": True, "colors": False, "shapes": True, "sizes": False, "positions": True, "exact": False,
    }  # fmt: skip
    # one object missing and another moved: count, multisets of colours/shapes/sizes and cells all differ
    fewer = [obj("circle", "red", "small", 0, 1), true[1]]
    assert score_objects(fewer, true) == {
        k: False for k in ("count", "colors", "shapes", "sizes", "positions", "exact")
    }
    # a moved object keeps count, colours, shapes and sizes but not positions
    moved = [true[0], true[1], obj("cross", "red", "large", 2, 0)]
    assert score_objects(moved, true) == {
        "count": True, "colors": True, "shapes": True, "sizes": True, "positions": False, "exact": False,
    }  # fmt: skip
    assert score_objects([], []) == {k: True for k in ("count", "colors", "shapes", "sizes", "positions", "exact")}


def test_attribute_and_prompt_match_by_hand() -> None:
    wanted = [obj("circle", "red", "small", 0, 0), obj("circle", "blue", "large", 1, 2)]
    # positions and sizes are ignored: the same colours and shapes anywhere match fully
    elsewhere = [obj("circle", "blue", "small", 2, 2), obj("circle", "red", "large", 0, 1)]
    assert attribute_match(elsewhere, wanted) == {"count": True, "colors": True, "shapes": True}
    assert prompt_match(elsewhere, wanted) == 1.0
    # a blue square instead of the blue circle: count and colours agree, shapes do not -> 2/3
    square = [wanted[0], obj("square", "blue", "large", 1, 2)]
    assert attribute_match(square, wanted) == {"count": True, "colors": True, "shapes": False}
    assert prompt_match(square, wanted) == pytest.approx(2 / 3)
    # one extra red circle: the count and both multisets differ -> 0
    extra = [*wanted, obj("circle", "red", "small", 2, 0)]
    assert attribute_match(extra, wanted) == {"count": False, "colors": False, "shapes": False}
    assert prompt_match(extra, wanted) == 0.0
    # the multiset, not the set: {red, red} against {red, blue} differs in colours only -> 2/3
    two_red = [obj("circle", "red", "small", 0, 0), obj("circle", "red", "large", 1, 2)]
    assert prompt_match(two_red, wanted) == pytest.approx(2 / 3)
    assert prompt_match([], wanted) == 0.0


def test_save_load_round_trip(tiny_judge: Judge, tmp_path: Path) -> None:
    save_judge(tiny_judge, tmp_path / "judge")
    meta = json.loads((tmp_path / "judge" / CONFIG_FILE).read_text())
    assert meta["synth"] == {"image_size": 64, "grid": 3}
    assert meta["judge"]["widths"] == tiny_judge.cfg.widths
    loaded = load_judge(tmp_path / "judge")
    assert loaded.cfg == tiny_judge.cfg and loaded.synth_size == 64
    images = [make_example(SynthConfig(), "val", i).image for i in range(16)]
    assert torch.equal(loaded.predict_cells(images), tiny_judge.predict_cells(images))
    x = loaded.prepare(images)
    for name, value in loaded(x).items():
        torch.testing.assert_close(value, tiny_judge(x)[name], rtol=0, atol=0)


def test_load_refuses_bad_checkpoints(tiny_judge: Judge, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_judge(tmp_path / "no_such_dir")
    directory = save_judge(tiny_judge, tmp_path / "judge")
    # a weight of the wrong shape is named by its key
    state = load_file(str(directory / WEIGHTS_FILE))
    key = "head.2.weight"
    state[key] = torch.zeros(5, *state[key].shape[1:])
    save_file(state, str(directory / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"head\.2\.weight"):
        load_judge(directory)
    # weights of a wider judge than its config says
    save_judge(Judge(JudgeConfig(widths=[8, 32], head_width=16)), tmp_path / "wide")
    meta = json.loads((tmp_path / "wide" / CONFIG_FILE).read_text())
    meta["judge"]["widths"] = [8, 16]
    (tmp_path / "wide" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"key 'backbone\.3\.0\.weight'"):
        load_judge(tmp_path / "wide")
    (tmp_path / "wide" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_judge(tmp_path / "wide")


def test_evaluate_judge_interface(tiny_judge: Judge) -> None:
    examples = [make_example(SynthConfig(), "test", i) for i in range(10)]
    images = [ex.image for ex in examples]
    records = [ex.scene.record() for ex in examples]
    scores = evaluate_judge(tiny_judge, images, records, batch_size=4)
    assert list(scores) == ["count", "colors", "shapes", "sizes", "positions", "exact"]
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores["exact"] <= min(scores["count"], scores["colors"], scores["shapes"])
    with pytest.raises(ValueError, match="records"):
        evaluate_judge(tiny_judge, images, records[:-1])


@pytest.mark.slow
def test_judge_learns_shapes_world() -> None:
    """The default judge trained from scratch (~45 s on 2 idle cores) reads >= 95% of test images per attribute."""
    synth = SynthConfig()
    judge = train_judge(get_preset("judge", "default"), synth, progress=False)
    examples = [make_example(synth, "test", i) for i in range(500)]
    scores = evaluate_judge(judge, [ex.image for ex in examples], [ex.scene.record() for ex in examples])
    for name in ("count", "colors", "shapes", "sizes", "positions"):
        assert scores[name] >= 0.95, f"{name}: {scores[name]:.3f} < 0.95 ({scores})"
