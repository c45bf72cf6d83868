"""Libra's training stages: what trains in stage 1 and 2, stage 2 starting from stage 1, checkpoints, KV-cached
generation (equal to full recomputation, and independent of the batch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlpretrain.data.shards import DataStream, read_records
from vlpretrain.libra.generate import answer_questions, caption_images, generate_ids
from vlpretrain.libra.lm_task import LibraLMTask, load_libra
from vlpretrain.libra.pipeline import LibraPipeline
from vlpretrain.libra.sequences import IGNORE, caption_prompt, fill_images
from vlpretrain.train.config import DataConfig
from vlpretrain.train.pretrained import save_task
from vlpretrain.train.task import build_task, task_config

SMALL_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2}


def build(name: str, **overrides: object) -> LibraLMTask:
    torch.manual_seed(0)
    return build_task(name, task_config(name, "tiny", {"llm": SMALL_LLM, **overrides}))


def first_batch(task: LibraLMTask, data: Path, batch_size: int = 4) -> dict:
    cfg = DataConfig(train=str(data / "train"), batch_size=batch_size, shuffle_buffer=0)
    return next(iter(DataStream(task.build_dataset(cfg, "train", 0, 1))))


def test_stage1_trains_only_the_image_side(shapes_data: Path) -> None:
    task = build("libra-pretrain")
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.vision.") for n in trainable)
    assert any(".k_bridge_on_language." in n for n in trainable) and "model.vision.heads.0.weight" in trainable
    batch = first_batch(task, shapes_data)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    out = task(batch)
    (out["loss"] / task.num_targets(batch)).backward()
    opt.step()
    for name, param in task.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable) or "bridge" in name and ".weight_A" in name, name  # A: zero grad at init
    codes, feats = task.tokenize_images(batch["image"])
    from vlpretrain.libra.sequences import Assembled

    asm = Assembled(batch["ids_BL"], batch["patch_BL"], batch["target_BL"], batch["attention_mask_BL"])
    _, _, labels = fill_images(asm, codes, feats, task.vocab)
    assert task.num_targets(batch) == int((labels[0, :, 1:] != IGNORE).sum())


def test_stage2_starts_from_stage1_and_trains_the_llama(shapes_data: Path, tmp_path: Path) -> None:
    stage1 = build("libra-pretrain")
    with torch.no_grad():
        for p in stage1.model.vision.parameters():
            p.add_(0.01)
    save_task(stage1, "libra-pretrain", stage1.cfg, tmp_path / "stage1")
    stage2 = build_task("libra-instruct", task_config("libra-instruct", "tiny", {"init": str(tmp_path / "stage1")}))
    for (name, a), (_, b) in zip(stage1.state_dict().items(), stage2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    trainable = {n for n, p in stage2.named_parameters() if p.requires_grad}
    assert "model.lm.model.layers.0.self_attn.q_proj.weight" in trainable and "model.lm.lm_head.weight" in trainable
    assert "model.vision.heads.0.weight" not in trainable  # no image targets in stage 2
    batch = first_batch(stage2, shapes_data)
    ids = batch["ids_BL"][0][batch["target_BL"][0]].tolist()
    eos = stage2.ids["eos"]
    assert ids.count(eos) >= 2 and ids[-1] == eos  # several answers per conversation, each ending with </s>
    out = stage2(batch)
    out["loss"].backward()
    assert all(p.grad is not None for n, p in stage2.named_parameters() if p.requires_grad)


def test_checkpoint_reload_and_cached_generation(shapes_data: Path, tmp_path: Path) -> None:
    task = build("libra-instruct", max_len=200)
    with torch.no_grad():  # make the image side matter (it starts near zero)
        for p in task.model.vision.parameters():
            p.mul_(20.0) if p.ndim == 2 else None
    folder = save_task(task, "libra-instruct", task.cfg, tmp_path / "ckpt")
    loaded, _ = load_libra(folder)
    images, records = read_records(str(shapes_data / "test"), limit=3)
    pipe = LibraPipeline(loaded)
    pixels = pipe.preprocess(images)
    prompt = caption_prompt(task.ids["bos"], task.ids["newline"])
    cached = generate_ids(loaded, [prompt] * 3, pixels, max_new_tokens=6, use_cache=True)
    full = generate_ids(loaded, [prompt] * 3, pixels, max_new_tokens=6, use_cache=False)
    assert cached == full and all(len(row) > 0 for row in cached)
    task.eval()
    assert caption_images(task, pixels, max_new_tokens=6) == caption_images(loaded, pixels, max_new_tokens=6)
    questions = [r["qa"][0]["question"] for r in records[:2]] + ["is there a red circle?"]
    batched = answer_questions(loaded, pixels, questions, max_new_tokens=3)
    alone = [answer_questions(loaded, pixels[i : i + 1], [q], max_new_tokens=3)[0] for i, q in enumerate(questions)]
    assert batched == alone  # left padding does not change an answer
    with pytest.raises(ValueError, match="questions for"):
        pipe.ask(images[:2], questions)


def test_attribute_breakdown_scores_each_kind(shapes_data: Path) -> None:
    from vlpretrain.libra.evaluate import attribute_breakdown

    _, records = read_records(str(shapes_data / "test"), limit=8)
    truth = [r["caption"] for r in records]
    assert set(attribute_breakdown(truth, records).values()) == {1.0}
    recoloured = [c.replace("red", "blue").replace("green", "blue").replace("yellow", "blue") for c in truth]
    scores = attribute_breakdown(recoloured, records)
    assert scores["caption_color_f1"] < 1.0 and scores["caption_shape_f1"] == scores["caption_size_f1"] == 1.0
