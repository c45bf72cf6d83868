"""The demo's frozen encoder: targets from the scene agree with the pixels, training learns, the checkpoint loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpretrain.configs import ConfigError, get_preset
from vlpretrain.core.encoders import EncoderSpec, build_encoder
from vlpretrain.core.vit import VisionTransformer, ViTConfig
from vlpretrain.data.synthetic import COLORS, SHAPES, SIZES, SynthConfig, make_example
from vlpretrain.lavit.demo_encoder import (
    COLOR_NAMES,
    IGNORE,
    MIN_COVERAGE,
    DemoEncoderConfig,
    evaluate_patch_accuracy,
    load_demo_encoder,
    make_dense_example,
    patch_targets,
    pixels_for_vit,
    pretrain_demo_encoder,
    save_demo_encoder,
)

SYNTH = SynthConfig()
PATCH = 8
SHORT = DemoEncoderConfig(steps=60, batch_size=64, pool_size=3840, data_workers=0, warmup_steps=10, eval_images=64)


def _patches(array: np.ndarray) -> np.ndarray:
    """[H, W, ...] -> [N, P * P, ...] in raster patch order."""
    grid = array.shape[0] // PATCH
    blocks = array.reshape(grid, PATCH, grid, PATCH, *array.shape[2:]).swapaxes(1, 2)
    return blocks.reshape(grid * grid, PATCH * PATCH, *array.shape[2:])


@pytest.mark.parametrize("split", ["train", "test"])
def test_dense_example_has_the_pixels_of_make_example(split: str) -> None:
    for index in range(5):
        image, object_ids, scene = make_dense_example(SYNTH, split, index)
        reference = make_example(SYNTH, split, index)
        assert np.array_equal(image, reference.image)
        assert scene.objects == reference.scene.objects
        assert object_ids.shape == image.shape[:2] and object_ids.max() <= len(scene.objects)


def test_targets_agree_with_the_pixels() -> None:
    quarter = MIN_COVERAGE * PATCH * PATCH
    centre = (PATCH // 2) * PATCH + PATCH // 2  # index of a patch's centre pixel among its P * P pixels
    centre_agrees: dict[str, list[bool]] = {"painted centre": [], "background": []}
    for index in range(60):
        image, object_ids, scene = make_dense_example(SYNTH, "test", index)
        targets_AN = patch_targets(scene, object_ids, PATCH)
        assert targets_AN.shape == (4, (SYNTH.image_size // PATCH) ** 2)
        pixels_NQ3 = _patches(image)
        for patch, (is_object, shape, color, size) in enumerate(targets_AN.T.tolist()):
            painted = {name: int((pixels_NQ3[patch] == rgb).all(axis=1).sum()) for name, rgb in COLORS.items()}
            centre_rgb = tuple(pixels_NQ3[patch, centre].tolist())
            if centre_rgb in COLORS.values():  # the centre rule would call it foreground: so does ours, same colour
                centre_agrees["painted centre"].append(bool(is_object) and COLORS[COLOR_NAMES[color]] == centre_rgb)
            if is_object:  # a quarter of the patch has the colour of an object with these attributes
                assert painted[COLOR_NAMES[color]] >= quarter, (index, patch)
                assert (SHAPES[shape], COLOR_NAMES[color], SIZES[size]) in {
                    (o.shape, o.color, o.size) for o in scene.objects
                }
            else:  # no object paints a quarter of it (two objects of one colour may, together)
                assert (shape, color, size) == (IGNORE, IGNORE, IGNORE)
                for name, pixels in painted.items():
                    assert pixels < quarter * max(1, sum(o.color == name for o in scene.objects)), (index, patch)
                centre_agrees["background"].append(max(centre_rgb) < 100)  # the background is dark
        labelled = {tuple(column) for column in targets_AN.T.tolist() if column[0] == 1}
        for obj in scene.objects:  # every object labels at least one patch
            key = (1, SHAPES.index(obj.shape), COLOR_NAMES.index(obj.color), SIZES.index(obj.size))
            assert key in labelled, (index, obj)
    # coverage labels extend the centre-pixel ones: a painted centre means foreground of that colour, a background
    # patch has a dark centre (the exceptions are patches at the edge of an object that paints under a quarter)
    assert len(centre_agrees["painted centre"]) > 200
    assert np.mean(centre_agrees["painted centre"]) > 0.95 and np.mean(centre_agrees["background"]) > 0.99


def test_patch_targets_refuses_a_patch_size_that_does_not_divide() -> None:
    _, object_ids, scene = make_dense_example(SYNTH, "train", 0)
    with pytest.raises(ValueError, match="patch_size 7"):
        patch_targets(scene, object_ids, 7)


def test_config_checks_name_the_field() -> None:
    assert get_preset("demo-encoder", "tiny") == DemoEncoderConfig()
    with pytest.raises(ConfigError, match="demo_encoder.vit"):
        DemoEncoderConfig(vit="nope")
    with pytest.raises(ConfigError, match="demo_encoder.pool_size"):
        DemoEncoderConfig(pool_size=8, batch_size=16)
    with pytest.raises(ConfigError, match="demo_encoder.steps"):
        DemoEncoderConfig(steps=0)


@pytest.fixture(scope="module")
def short_run() -> tuple[VisionTransformer, dict[str, float]]:
    return pretrain_demo_encoder(SHORT, SYNTH, progress=False)


def test_short_training_lowers_the_loss(short_run: tuple[VisionTransformer, dict[str, float]]) -> None:
    vit, metrics = short_run
    assert metrics["steps"] == SHORT.steps
    assert metrics["loss_last"] < 0.75 * metrics["loss_first"]  # the position term starts at log(64) and falls last
    assert metrics["color_acc"] > 0.5  # colour is a per-patch linear read-out: learnt first
    assert metrics["position_acc"] > 0.1  # chance: 1/64
    assert not vit.training
    for name in ("shape_acc", "size_acc", "object_acc", "background_acc", "count_acc"):
        assert 0.0 <= metrics[name] <= 1.0


def test_saved_encoder_loads_through_build_encoder(short_run, tmp_path: Path) -> None:
    vit, metrics = short_run
    path = save_demo_encoder(vit, tmp_path / "enc" / "demo_encoder.safetensors", metrics)
    encoder = build_encoder(EncoderSpec(kind="eva", preset="tiny", path=str(path)))
    for key, value in vit.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value), key
    images_BHWC = torch.from_numpy(np.stack([make_dense_example(SYNTH, "val", i)[0] for i in range(4)]))
    with torch.no_grad():
        expected_BND = vit.forward_features(pixels_for_vit(images_BHWC))
    pixels_BCHW = images_BHWC.permute(0, 3, 1, 2).float() / 255.0  # the encoder normalises [0, 1] pixels itself
    assert torch.equal(encoder(pixels_BCHW), expected_BND)
    reloaded = load_demo_encoder(path)
    assert reloaded.cfg == vit.cfg
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in vit.state_dict().items())


def test_save_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"\.safetensors"):
        save_demo_encoder(VisionTransformer(ViTConfig()), tmp_path / "enc.bin")


def test_evaluation_accepts_the_loaded_encoder(short_run, tmp_path: Path) -> None:
    from vlpretrain.lavit.demo_encoder import PatchHeads

    vit, _ = short_run
    heads = PatchHeads(vit.dim, SYNTH.max_objects)
    encoder = build_encoder(EncoderSpec(path=str(save_demo_encoder(vit, tmp_path / "e.safetensors"))))
    direct = evaluate_patch_accuracy(vit, heads, SYNTH, "val", num_images=32, bf16=False)
    wrapped = evaluate_patch_accuracy(encoder, heads, SYNTH, "val", num_images=32, bf16=False)
    assert direct == wrapped


@pytest.mark.slow
def test_default_pretraining_reaches_high_patch_accuracy() -> None:
    # no time limit: all 600 steps whatever the load, so the result does not depend on the machine's business
    cfg = dataclasses.replace(get_preset("demo-encoder", "tiny"), time_limit_s=0.0)
    vit, metrics = pretrain_demo_encoder(cfg, SYNTH, progress=False)
    print(metrics)
    assert metrics["steps"] == 600
    assert metrics["shape_acc"] >= 0.9 and metrics["color_acc"] >= 0.9 and metrics["position_acc"] >= 0.95
    assert metrics["background_acc"] >= 0.95


@pytest.mark.parametrize("count_grad", [True, False])
def test_count_target_reaches_the_features_only_when_asked(count_grad: bool) -> None:
    from vlpretrain.lavit.demo_encoder import PatchHeads

    torch.manual_seed(0)
    feats_BND = torch.randn(3, 16, 32, requires_grad=True)
    heads = PatchHeads(32, SYNTH.max_objects, count_grad=count_grad)
    loss = torch.nn.functional.cross_entropy(heads(feats_BND)["count"], torch.tensor([1, 2, 3]))
    loss.backward()
    assert heads.count.weight.grad.abs().sum() > 0  # the read-out trains either way
    reached = feats_BND.grad is not None and bool(feats_BND.grad.abs().sum() > 0)
    assert reached == count_grad


def test_attribute_embeddings_sum_one_unit_vector_per_attribute() -> None:
    from vlpretrain.lavit.demo_encoder import AttributeEmbeddings

    table = AttributeEmbeddings(dim=32, num_patches=4, seed=3)
    assert torch.allclose(table.color.norm(dim=-1), torch.ones(len(COLOR_NAMES)))
    # patch 0 background, patch 2 a foreground patch (shape 1, colour 5, size 0), patches 1 and 3 background
    targets_BAN = torch.full((1, 4, 4), IGNORE)
    targets_BAN[0, 0] = 0
    targets_BAN[0, :, 2] = torch.tensor([1, 1, 5, 0])
    target_BND = table(targets_BAN)
    assert target_BND.shape == (1, 4, 32)
    assert torch.allclose(target_BND[0, 0], table.object[0] + table.position[0])
    expected = table.object[1] + table.shape[1] + table.color[5] + table.size[0] + table.position[2]
    assert torch.allclose(target_BND[0, 2], expected)
    without_position = AttributeEmbeddings(dim=32, num_patches=0, seed=3)(targets_BAN)
    assert torch.allclose(without_position[0, 0], table.object[0])
    assert torch.equal(AttributeEmbeddings(32, 4, seed=3)(targets_BAN), target_BND)  # a pure function of the seed


def test_embed_objective_lowers_the_loss_and_its_read_outs_learn() -> None:
    cfg = dataclasses.replace(SHORT, objective="embed", eval_images=64)
    vit, metrics = pretrain_demo_encoder(cfg, SYNTH, progress=False)
    assert metrics["loss_last"] < 0.75 * metrics["loss_first"]
    assert metrics["color_acc"] > 0.25  # chance: 1/8; the heads learn from detached features


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(ConfigError, match="demo_encoder.objective"):
        DemoEncoderConfig(objective="mae")


def test_position_classes_name_the_cell_that_holds_each_patch_centre() -> None:
    from vlpretrain.lavit.demo_encoder import patch_position_classes

    assert torch.equal(patch_position_classes(64, 0), torch.arange(64))
    cells_N = patch_position_classes(64, 3)  # 8 x 8 patches of 8 px on a 64-px image, 3 x 3 cells of 21.3 px
    for n in range(64):
        row, col = divmod(n, 8)
        centre_y, centre_x = (row + 0.5) * 8, (col + 0.5) * 8
        assert cells_N[n] == int(centre_y // (64 / 3)) * 3 + int(centre_x // (64 / 3))
    assert torch.bincount(cells_N).tolist() == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    with pytest.raises(ValueError, match="square"):
        patch_position_classes(12, 3)


def test_cell_position_target_trains_a_head_over_cells() -> None:
    from vlpretrain.lavit.demo_encoder import AttributeEmbeddings, PatchHeads, dense_loss, patch_position_classes

    torch.manual_seed(0)
    heads = PatchHeads(32, SYNTH.max_objects, num_patches=16, position_grid=2)
    logits = heads(torch.randn(2, 16, 32))
    assert logits["position"].shape == (2, 16, 4)
    targets_BAN = torch.zeros(2, 4, 16, dtype=torch.long)
    _, terms = dense_loss(logits, targets_BAN, torch.tensor([0, 0]), heads.position_class)
    classes_M = patch_position_classes(16, 2).repeat(2)
    expected = torch.nn.functional.cross_entropy(logits["position"].reshape(32, 4), classes_M)
    assert terms["position"] == pytest.approx(float(expected), rel=1e-6)
    table = AttributeEmbeddings(dim=32, num_patches=16, seed=0, position_grid=2)
    target_BND = table(torch.zeros(1, 4, 16, dtype=torch.long))
    assert torch.equal(target_BND[0, 0], target_BND[0, 5])  # patches 0 and 5 share the top-left cell
    assert not torch.equal(target_BND[0, 0], target_BND[0, 2])


def test_head_weights_scale_their_terms_and_unknown_keys_are_refused() -> None:
    from vlpretrain.lavit.demo_encoder import PatchHeads, dense_loss

    torch.manual_seed(0)
    heads = PatchHeads(32, SYNTH.max_objects, num_patches=16)
    logits = heads(torch.randn(2, 16, 32))
    targets_BAN = torch.randint(0, 2, (2, 4, 16))
    counts_B = torch.tensor([1, 2])
    total, terms = dense_loss(logits, targets_BAN, counts_B)
    weighted, same_terms = dense_loss(logits, targets_BAN, counts_B, weights={"color": 3.0, "position": 0.0})
    assert same_terms == terms  # the reported terms stay unweighted
    expected = sum(terms.values()) + 2 * terms["color"] - terms["position"]
    assert float(total) == pytest.approx(sum(terms.values()), rel=1e-5)
    assert float(weighted) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="head_weights: colour"):
        DemoEncoderConfig(head_weights={"colour": 2.0})
    with pytest.raises(ConfigError, match="position_grid"):
        DemoEncoderConfig(position_grid=9)
