"""LCL: loss pieces against hand-computed values, read-outs and masks, layouts, tied projections, the task's losses.

The models here are tiny (32 px images with patch 8: N = 16; widths 32) so that the file runs in seconds.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlpretrain.configs import ConfigError
from vlpretrain.data.shards import DataStream
from vlpretrain.lcl.config import LCLConfig
from vlpretrain.lcl.loss import contrastive_loss_sum, generation_loss_sum, regression_loss_sum
from vlpretrain.lcl.sequences import document_ids, document_pairs, pair_ids, place_images
from vlpretrain.lcl.task import LCLTask
from vlpretrain.lcl.vocab import LCLVocab
from vlpretrain.train.config import DataConfig
from vlpretrain.train.task import task_config

VOCAB = LCLVocab(pad=0, sot=1, eot=2, img=10, soi=11, eoi=12, size=13)
N = 16  # patches of the tiny test encoder


def tiny_cfg(**model) -> LCLConfig:
    base = {"vit": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 96}, "max_len": 96}  # fmt: skip
    return task_config("lcl", "tiny", base | model)


def tiny_task(**model) -> LCLTask:
    torch.manual_seed(0)
    return LCLTask(tiny_cfg(**model))


# ------------------------------------------------------------------------------------------------- loss pieces


def test_contrastive_loss_matches_hand_computed_values() -> None:
    eye = torch.eye(2)
    loss, count = contrastive_loss_sum(eye, eye, torch.tensor(1.0))
    # logits = I: each of the 2 rows, in both directions, is -log(e / (e + 1)) = log(1 + 1/e)
    assert count == 2 and loss.item() == pytest.approx(0.5 * 4 * math.log(1 + math.exp(-1)), rel=1e-6)
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss, _ = contrastive_loss_sum(image, text, torch.tensor(2.0))
    # logits 2 * image @ text.T = [[0, 2], [1.6, 1.2]]; labels on the diagonal
    i2t = -math.log(1 / (1 + math.exp(2))) - math.log(math.exp(1.2) / (math.exp(1.6) + math.exp(1.2)))
    t2i = -math.log(1 / (1 + math.exp(1.6))) - math.log(math.exp(1.2) / (math.exp(2) + math.exp(1.2)))
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)


def test_contrastive_loss_sum_over_count_is_clips_symmetric_mean() -> None:
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    loss, count = contrastive_loss_sum(image, text, torch.tensor(10.0))
    logits = 10.0 * image @ text.T
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert (loss / count).item() == pytest.approx(clip.item(), rel=1e-6)


def test_contrastive_loss_single_pair_is_zero_and_no_pair_is_finite() -> None:
    one = F.normalize(torch.randn(1, 4), dim=-1)
    assert contrastive_loss_sum(one, one.flip(-1), torch.tensor(14.3))[0].item() == 0.0
    image = torch.zeros(0, 4, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    loss, count = contrastive_loss_sum(image, torch.zeros(0, 4), scale)
    loss.backward()
    assert count == 0 and loss.item() == 0.0 and scale.grad is not None and torch.isfinite(scale.grad)


def test_generation_and_regression_sums() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    assert generation_loss_sum(logits, torch.tensor([1, 1])).item() == pytest.approx(
        -math.log(3 / 4) - math.log(1 / 4), rel=1e-6
    )
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    assert regression_loss_sum(pred, target).item() == pytest.approx((1 + 4) / 2 + (9 + 1) / 2)


# ---------------------------------------------------------------------------------------------------- layouts


def test_pair_layouts_and_document_cut() -> None:
    block = [VOCAB.soi, *[VOCAB.img] * 3, VOCAB.eoi]
    assert pair_ids([5, 6], VOCAB, 3, True, 64) == [*block, 5, 6, VOCAB.eot]
    assert pair_ids([5, 6], VOCAB, 3, False, 64) == [VOCAB.sot, 5, 6, *block]
    assert pair_ids(list(range(3, 40)), VOCAB, 3, False, 12) == [VOCAB.sot, 3, 4, 5, 6, 7, *block]
    items = [("text", [5, 6]), ("image", "a"), ("text", [7]), ("image", "b")]
    ids, kept = document_ids(items, VOCAB, 3, 64)
    assert ids == [VOCAB.sot, 5, 6, *block, 7, *block, VOCAB.eot] and kept == ["a", "b"]
    ids, kept = document_ids(items, VOCAB, 3, 11)  # the cut falls inside the second block: it is dropped
    assert ids == [VOCAB.sot, 5, 6, *block, 7, VOCAB.eot] and kept == ["a"]
    ids, kept = document_ids(items, VOCAB, 3, 5)  # inside the first block: no image left
    assert ids == [VOCAB.sot, 5, 6, VOCAB.eot] and kept == []


def test_place_images_and_document_pairs() -> None:
    items = [("text", [1]), ("text", [5]), ("image", "a"), ("text", [7]), ("image", "b")]
    assert place_images(items, 0.0, random.Random(0)) == items
    moved = place_images(items, 1.0, random.Random(0))
    assert moved == [("text", [1]), ("image", "a"), ("text", [5]), ("image", "b"), ("text", [7])]
    assert document_pairs(items, image_after_text=True) == [("a", [5]), ("b", [7])]
    assert document_pairs(moved, image_after_text=False) == [("a", [5]), ("b", [7])]


# ------------------------------------------------------------------------------------------ model read-outs


def _ids(task: LCLTask, rows: list[list[int]]) -> torch.Tensor:
    length = max(map(len, rows))
    return torch.tensor([r + [task.vocab.pad] * (length - len(r)) for r in rows])


def test_contrastive_readout_skips_position_zero_and_generation_targets() -> None:
    task = tiny_task()
    v = task.vocab
    block = [v.soi, *[v.img] * N, v.eoi]
    ids = _ids(task, [[*block, 20, 21, v.eot], [v.sot, 20, *block, 22, *block]])  # 3 images, the 1st at position 0
    pooled, tokens = task.encode_image(torch.randn(3, 3, 32, 32))
    hidden = task.run_sequences(ids, tokens)
    image, text = task.contrastive_features(ids, hidden, pooled)
    assert image.shape == text.shape == (2, 32)
    assert torch.allclose(image, F.normalize(pooled[1:], dim=-1), atol=1e-6)
    soi_rows, soi_cols = (ids == v.soi).nonzero().T
    keep = soi_cols > 0
    expected = F.normalize(task.text.project(hidden[soi_rows[keep], soi_cols[keep]]), dim=-1)
    assert torch.allclose(text, expected, atol=1e-6)
    mask = task.generation_mask(ids)
    targets = ids[:, 1:][mask]
    assert set(targets.tolist()) == {20, 21, 22, v.eot, v.soi}  # <soi> and <eot> predicted, never <img>/<eoi>/pad
    assert int(mask[1].sum()) == 4  # 20, <soi>, 22, <soi> (the row ends without <eot>)


def test_image_tokens_enter_the_lm_in_reading_order() -> None:
    task = tiny_task()
    v = task.vocab
    block = [v.soi, *[v.img] * N, v.eoi]
    ids = _ids(task, [[v.sot, *block, *block, v.eot]])
    tokens = torch.randn(2, N, 32)
    embeds = task.interleave(ids, tokens)
    assert torch.equal(embeds[0, 2 : 2 + N], tokens[0]) and torch.equal(embeds[0, 4 + N : 4 + 2 * N], tokens[1])
    with pytest.raises(ValueError, match="slots"):
        task.interleave(ids, tokens[:1])


def test_alibi_block_matches_naive_attention_with_distance_penalties() -> None:
    from vlpretrain.lcl.text import CausalBlock, alibi_bias

    bias = alibi_bias(2, 3)  # slopes 2^-4, 2^-8
    assert bias[0, 2, 0] == -2 / 16 and bias[1, 1, 0] == -1 / 256 and bias[0, 0, 1] == float("-inf")
    cfg = tiny_cfg(text={"width": 32, "layers": 1, "heads": 2, "context_length": 96, "alibi": True})
    torch.manual_seed(0)
    block, x = CausalBlock(cfg.text), torch.randn(2, 7, 32)
    q, k, v = block.attn.project(block.norm1(x))  # [B, H, L, 16]
    scores = q @ k.transpose(-1, -2) / math.sqrt(16) + alibi_bias(2, 7)
    naive = x + block.attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    naive = naive + block.mlp(block.norm2(naive))
    assert torch.allclose(block(x, alibi_bias(2, 7)), naive, atol=1e-5)
    assert not torch.allclose(block(x, alibi_bias(2, 7)), block(x), atol=1e-3)  # the penalties change attention
    task = tiny_task(text={"width": 32, "layers": 1, "heads": 2, "context_length": 96, "alibi": True})
    embeds = torch.randn(1, 9, 32)
    later = embeds.clone()
    later[0, 5:] += 1.0
    assert torch.allclose(task.text(embeds)[0, :5], task.text(later)[0, :5], atol=1e-6)  # still causal
    assert not tiny_cfg().text.alibi  # the official model has none


# ------------------------------------------------------------------------------------------ tied projections


def test_pooled_latent_is_a_per_head_convex_combination_of_the_lm_tokens() -> None:
    task = tiny_task(pool_heads=2)
    pool = task.pool
    x = torch.randn(3, N, 32)
    pooled, tokens = pool(x)
    weights = pool.attention_weights(x)  # [B, H, N]
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2)) and (weights >= 0).all()
    values = pool.values(x)  # the per-head slices of the LM tokens before the shared output projection
    assert torch.allclose(tokens, values @ pool.proj.weight.T, atol=1e-5)
    f = values.shape[-1] // 2
    mixed = torch.cat([torch.einsum("bn,bnf->bf", weights[:, h], values[..., h * f : (h + 1) * f]) for h in range(2)],
                      dim=-1)  # fmt: skip
    assert torch.allclose(pooled, mixed @ pool.proj.weight.T, atol=1e-5)


def test_tied_projections_stay_tied_through_training() -> None:
    task = tiny_task()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2)
    v = task.vocab
    block = [v.soi, *[v.img] * N, v.eoi]
    batch = {"pixels": torch.randn(2, 3, 32, 32), "input_ids": _ids(task, [[v.sot, 20, *block, 21, *block, v.eot]])}
    for _ in range(3):
        opt.zero_grad()
        task(batch)["loss"].backward()
        opt.step()
    assert {n for n, _ in task.pool.named_parameters()} == {
        "query_token", "q_bias", "k_bias", "v_bias", "norm_q.weight", "norm_q.bias", "norm_k.weight", "norm_k.bias",
        "norm_v.weight", "norm_v.bias", "q.weight", "k.weight", "v.weight", "proj.weight"}  # fmt: skip
    with torch.no_grad():  # uniform attention (no query signal): the pooled latent is the mean of the LM's tokens
        task.pool.q.weight.zero_()
        task.pool.q_bias.zero_()
        pooled, tokens = task.encode_image(batch["pixels"])
    assert torch.allclose(pooled, tokens.mean(dim=1), atol=1e-5)


# ---------------------------------------------------------------------------------------------- task losses


@pytest.mark.parametrize("objective", ["lcl", "emu"])
def test_task_loss_is_gen_mean_plus_weighted_image_term(objective: str) -> None:
    task = tiny_task(objective=objective, con_weight=0.3)
    v = task.vocab
    block = [v.soi, *[v.img] * N, v.eoi]
    ids = _ids(task, [[v.sot, 20, *block, 21, 22, *block, v.eot], [*block, 23, v.eot], [v.sot, 24, *block]])
    batch = {"pixels": torch.randn(4, 3, 32, 32), "input_ids": ids}
    out = task(batch)
    targets = task.num_targets(batch)
    pooled, tokens = task.encode_image(batch["pixels"])
    hidden = task.run_sequences(ids, tokens)
    gen = F.cross_entropy(*task.generation_logits(ids, hidden))
    if objective == "lcl":
        image, text = task.contrastive_features(ids, hidden, pooled)
        logits = task.logit_scale.exp() * image @ text.T
        labels = torch.arange(len(image))
        term = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        predicted, has_context = task.predicted_latents(ids, hidden)
        term = (predicted - pooled[has_context]).pow(2).mean()
    assert targets == int(task.generation_mask(ids).sum()) == 10  # 6 + 2 + 2
    assert (out["loss"] / targets).item() == pytest.approx((gen + 0.3 * term).item(), rel=1e-5)


def _encoder_grad_norm(objective: str, image_token_grad: bool) -> float:
    """Norm of the ViT's gradient after one backward of the task loss on a two-image document."""
    task = tiny_task(objective=objective, image_token_grad=image_token_grad)
    v = task.vocab
    block = [v.soi, *[v.img] * N, v.eoi]
    ids = _ids(task, [[v.sot, 20, *block, 21, 22, *block, 23, v.eot], [v.sot, 24, *block, 25, v.eot]])
    torch.manual_seed(1)
    task({"pixels": torch.randn(3, 3, 32, 32), "input_ids": ids})["loss"].backward()
    grads = [p.grad.flatten() for p in task.visual.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def test_image_token_grad_false_keeps_only_the_pooled_latent_path() -> None:
    # generation only: with the LM's image tokens detached nothing reaches the encoder
    assert _encoder_grad_norm("gen", True) > 0 and _encoder_grad_norm("gen", False) == 0.0
    # LCL: the contrastive target (the pooled latent) still trains the encoder, but L_gen no longer does
    detached, full = _encoder_grad_norm("lcl", False), _encoder_grad_norm("lcl", True)
    assert detached > 0 and abs(detached - full) > 1e-6 * full


def test_logit_scale_is_clamped_before_use() -> None:
    task = tiny_task(objective="clip")
    with torch.no_grad():
        task.logit_scale.fill_(9.0)
    v = task.vocab
    batch = {"pixels": torch.randn(2, 3, 32, 32), "input_ids": _ids(task, [[v.sot, 20, v.soi], [v.sot, 21, v.soi]])}
    out = task(batch)
    assert task.logit_scale.item() == pytest.approx(math.log(100)) and out["scale"].item() == pytest.approx(100.0)
    assert task.num_targets(batch) == 2


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="pool_heads"):
        tiny_cfg(pool_heads=3)
    with pytest.raises(ConfigError, match="max_len"):
        tiny_cfg(max_len=10)
    with pytest.raises(ConfigError, match="special_ids"):
        tiny_cfg(tokenizer="")


@pytest.mark.parametrize("objective", ["lcl", "clip"])
def test_document_batches_from_shapes_world(objective: str, shapes_data: Path) -> None:
    task = tiny_task(objective=objective)
    data = DataConfig(train=str(shapes_data / "train" / "docs.jsonl"), batch_size=3, shuffle_buffer=0)
    batch = next(iter(DataStream(task.build_dataset(data, "train", 0, 1))))
    ids, pixels = batch["input_ids"], batch["pixels"]
    assert pixels.shape[1:] == (3, 32, 32) and int((ids == task.vocab.soi).sum()) == len(pixels) > 0
    if objective == "lcl":
        assert len(ids) == 3 and int((ids == task.vocab.img).sum()) == N * len(pixels)
        assert (ids[:, 0] == task.vocab.sot).all()
    else:
        assert len(ids) == len(pixels) and (ids == task.vocab.img).sum() == 0
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in task.parameters() if p.requires_grad
    )


def test_documents_as_pairs_gives_one_pair_row_per_image(shapes_data: Path) -> None:
    data = DataConfig(train=str(shapes_data / "train" / "docs.jsonl"), batch_size=3, shuffle_buffer=0)
    clip = next(iter(DataStream(tiny_task(objective="clip").build_dataset(data, "train", 0, 1))))
    task = tiny_task(data={"documents_as_pairs": True, "image_first_prob": 0.5})
    batch = next(iter(DataStream(task.build_dataset(data, "train", 0, 1))))
    ids, v = batch["input_ids"], task.vocab
    assert len(ids) == len(batch["pixels"]) == len(clip["input_ids"]) > 3
    assert ((ids == v.soi).sum(dim=1) == 1).all() and int((ids == v.img).sum()) == N * len(ids)
    image_first = ids[:, 0] == v.soi
    assert 0 < int(image_first.sum()) < len(ids)  # both layouts occur
    for row, first, clip_row in zip(ids.tolist(), image_first.tolist(), clip["input_ids"].tolist(), strict=True):
        text = [t for t in clip_row if t not in (v.pad, v.sot, v.soi)]  # the image's own sentence
        real = [t for t in row if t not in (v.pad, v.img)]
        assert real == ([v.soi, v.eoi, *text, v.eot] if first else [v.sot, *text, v.soi, v.eoi])
    assert torch.isfinite(task(batch)["loss"])


@pytest.mark.parametrize("name", ["lcl_tiny.yaml", "lcl_paper.yaml", "lcl_synth.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    from vlpretrain.configs import load_config
    from vlpretrain.data.synthetic import SynthConfig
    from vlpretrain.train.config import TrainConfig

    path = Path(__file__).resolve().parent.parent / "configs" / name
    if name == "lcl_synth.yaml":
        assert load_config(SynthConfig, "synth", path).grid == 2
        return
    cfg = load_config(TrainConfig, "train", path)
    model = task_config(cfg.task, cfg.model_preset, cfg.model)
    assert cfg.task == "lcl" and model.objective == "lcl" and model.con_weight == 0.1
