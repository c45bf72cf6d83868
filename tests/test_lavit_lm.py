"""LaVIT's unified LM: vocabulary layout, sequences and loss masks, packing parity, the frozen tokenizer's outputs,
learning, and training through the engine with separate learning rates.

The helpers at the top (micro LLaMA, micro tokenizer) are imported by the other ``test_lavit_lm_*`` files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vlpretrain.cli import main
from vlpretrain.configs import ConfigError
from vlpretrain.core.llm import LlamaSpec
from vlpretrain.data.shards import DataStream
from vlpretrain.errors import UserError
from vlpretrain.lavit.generate import visual_length_limits
from vlpretrain.lavit.lm_task import LavitLMTask
from vlpretrain.lavit.model import LavitLMConfig, build_language_model, init_code_rows_from_codebook
from vlpretrain.lavit.packing import IGNORE, first_fit_decreasing, pack_samples, padding_waste
from vlpretrain.lavit.sequences import (
    VISUAL_SLOT,
    Sample,
    generation_sample,
    plan_batch,
    text_sample,
    understanding_sample,
    vqa_prompt,
)
from vlpretrain.lavit.tokenizer import DynamicTokenizer, TokenizerConfig
from vlpretrain.lavit.tokenizer_task import LavitTokenizerTask
from vlpretrain.lavit.vocab import VisualVocab
from vlpretrain.train.config import DataConfig, OptimConfig
from vlpretrain.train.optim import build_optimizer
from vlpretrain.train.pretrained import save_task

CODES = 64


def micro_llm() -> LlamaSpec:
    """Two layers of width 32 with grouped-query attention (4 heads, 2 key/value heads)."""
    return LlamaSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=160)


def micro_config(**fields) -> LavitLMConfig:
    return LavitLMConfig(**({"llm": micro_llm(), "max_len": 160, "qa_ratio": 0.5} | fields))


def micro_tokenizer(seed: int = 0) -> DynamicTokenizer:
    """The tiny tokenizer with a 64-code book, random weights, its keep threshold set so that about 40% of the
    patches are kept (the count varies per image)."""
    torch.manual_seed(seed)
    tok = DynamicTokenizer(TokenizerConfig(codebook_size=CODES)).eval()
    with torch.no_grad():
        logp = tok.token_predictor(tok.encoder(torch.rand(8, 3, 64, 64)))
        tok.token_predictor.keep_threshold.fill_(float(torch.quantile((logp[..., 0] - logp[..., 1]).flatten(), 0.6)))
    return tok


def micro_task(seed: int = 0, **fields) -> LavitLMTask:
    tok = micro_tokenizer(seed)
    torch.manual_seed(seed)
    return LavitLMTask(micro_config(**fields), tok)


def tokenizer_folder(root: Path, seed: int = 0) -> Path:
    """A saved lavit-tokenizer folder holding :func:`micro_tokenizer`."""
    cfg = TokenizerConfig(codebook_size=CODES)
    task = LavitTokenizerTask(cfg)
    task.tokenizer.load_state_dict(micro_tokenizer(seed).state_dict())
    return save_task(task, "lavit-tokenizer", cfg, root)


def first_batch(task: LavitLMTask, data: Path, batch_size: int = 6) -> dict:
    cfg = DataConfig(train=str(data / "train"), batch_size=batch_size, shuffle_buffer=0)
    return next(iter(DataStream(task.build_dataset(cfg, "train", 0, 1))))


@pytest.fixture(scope="module")
def task() -> LavitLMTask:
    return micro_task().eval()


# ----------------------------------------------------------------------------------------------- vocabulary


def test_official_id_layout() -> None:
    vocab = VisualVocab(32000, 16384)
    assert (vocab.img_start, vocab.img_end, vocab.code_offset, vocab.size) == (32000, 32001, 32002, 48386)
    codes = torch.tensor([0, 5, 16383])
    assert vocab.code_ids(codes).tolist() == [32002, 32007, 48385]
    assert torch.equal(vocab.codes(vocab.code_ids(codes)), codes)
    with pytest.raises(ValueError, match="visual codes"):
        vocab.codes(torch.tensor([32001]))


def test_model_vocabulary_is_text_plus_markers_plus_codes_and_untied(task: LavitLMTask) -> None:
    text = len(task.text_tokenizer)
    assert task.vocab.text_size == text and task.vocab.img_start == text and task.vocab.code_offset == text + 2
    assert task.lm.get_input_embeddings().num_embeddings == text + 2 + CODES
    assert task.lm.get_output_embeddings().weight.shape[0] == text + 2 + CODES
    assert task.lm.get_input_embeddings().weight.data_ptr() != task.lm.lm_head.weight.data_ptr()


def test_a_text_llama_folder_is_extended_like_word_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)  # fmt: skip
    source = LlamaForCausalLM(config)
    source.save_pretrained(tmp_path / "llama")
    vocab = VisualVocab(500, 4096)
    lm = build_language_model(dataclasses.replace(micro_llm(), path=str(tmp_path / "llama")), vocab)
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert emb.shape == head.shape == (500 + 2 + 4096, 32)
    assert torch.equal(emb[:500], source.get_input_embeddings().weight)  # text rows kept
    assert emb.data_ptr() != head.data_ptr() and not lm.config.tie_word_embeddings  # untied
    for table in (emb, head):  # new rows ~ N(0, 0.02), not copies of the text rows' mean
        assert abs(float(table[500:].detach().std()) - config.initializer_range) < 0.002
        assert abs(float(table[500:].detach().mean())) < 0.002
    with pytest.raises(UserError, match="embedding rows"):
        build_language_model(dataclasses.replace(micro_llm(), path=str(tmp_path / "llama")), VisualVocab(400, 8))


def test_codebook_code_rows_are_projections_of_the_centred_codebook() -> None:
    normal, codebook = micro_task(seed=3), micro_task(seed=3, code_rows_init="codebook")
    vocab, offset = codebook.vocab, codebook.vocab.code_offset
    assert normal.state_dict().keys() == codebook.state_dict().keys()  # checkpoints unchanged
    for key, value in normal.state_dict().items():
        assert value.shape == codebook.state_dict()[key].shape, key
    cb_KC = codebook.tokenizer.quantize.codebook
    unit_KC = F.normalize(cb_KC - cb_KC.mean(dim=0), dim=1)
    for table in ("model.embed_tokens.weight", "lm_head.weight"):
        rows_KH = codebook.lm.state_dict()[table][offset:]
        assert rows_KH.shape == (vocab.codebook_size, 32)
        assert torch.equal(codebook.lm.state_dict()[table][:offset], normal.lm.state_dict()[table][:offset])
        proj_CH = torch.linalg.lstsq(unit_KC, rows_KH).solution  # rows = unit codes @ one [C, H] matrix, exactly
        assert torch.allclose(unit_KC @ proj_CH, rows_KH, atol=1e-5)
        assert not torch.allclose(normal.lm.state_dict()[table][offset:], rows_KH)
        assert 0.5 * 0.02 < float(rows_KH.std()) < 2 * 0.02  # the word embeddings' scale


def test_codebook_code_rows_keep_the_codes_similarities_at_width_256() -> None:
    torch.manual_seed(0)
    vocab = VisualVocab(10, 256)
    lm = build_language_model(LlamaSpec(hidden_size=256, intermediate_size=64, num_layers=1, num_heads=4,
                                        num_kv_heads=4, max_positions=16), vocab)  # fmt: skip
    cb_KC = F.normalize(torch.randn(256, 32) + 0.5, dim=1)  # a shared direction, as trained codebooks have
    init_code_rows_from_codebook(lm, vocab, cb_KC)
    unit_KC = F.normalize(cb_KC - cb_KC.mean(dim=0), dim=1)
    code_sim = (unit_KC @ unit_KC.T).flatten()
    for table in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
        rows_KH = F.normalize(table[vocab.code_offset :].detach(), dim=1)
        row_sim = (rows_KH @ rows_KH.T).flatten()
        assert float(torch.corrcoef(torch.stack([code_sim, row_sim]))[0, 1]) > 0.9
    random_sim = F.normalize(torch.randn(256, 256), dim=1)
    assert float(torch.corrcoef(torch.stack([code_sim, (random_sim @ random_sim.T).flatten()]))[0, 1]) < 0.9
    with pytest.raises(ValueError, match="codebook has 8 codes"):
        init_code_rows_from_codebook(lm, vocab, cb_KC[:8])
    with pytest.raises(ConfigError, match="code_rows_init"):
        micro_config(code_rows_init="kmeans")


def test_a_folder_with_visual_rows_keeps_them_under_codebook_init(tmp_path: Path) -> None:
    vocab = VisualVocab(500, 8)
    config = LlamaConfig(vocab_size=vocab.size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    source = LlamaForCausalLM(config)
    source.save_pretrained(tmp_path / "llama")
    spec = dataclasses.replace(micro_llm(), path=str(tmp_path / "llama"))
    lm = build_language_model(spec, vocab, F.normalize(torch.randn(8, 32), dim=1))
    assert torch.equal(lm.get_input_embeddings().weight, source.get_input_embeddings().weight)
    assert torch.equal(lm.get_output_embeddings().weight, source.get_output_embeddings().weight)


def test_training_from_a_folder_records_its_sizes(tmp_path: Path) -> None:
    text_size = micro_task().vocab.text_size
    config = LlamaConfig(vocab_size=text_size, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=200,
                         rms_norm_eps=1e-5)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    task = LavitLMTask(micro_config(llm=LlamaSpec(path=str(tmp_path / "llama")), max_len=200), micro_tokenizer())
    spec = task.cfg.llm  # what the checkpoint's config.json records, so that loading rebuilds the same LLaMA
    assert (spec.hidden_size, spec.num_layers, spec.num_kv_heads, spec.max_positions) == (48, 1, 2, 200)
    assert spec.rms_norm_eps == 1e-5 and task.lm.get_input_embeddings().num_embeddings == text_size + 2 + CODES
    LlamaConfig(**(config.to_dict() | {"hidden_act": "gelu"})).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="hidden_act"):
        LavitLMTask(micro_config(llm=LlamaSpec(path=str(tmp_path / "other")), max_len=200), micro_tokenizer())


# ----------------------------------------------------------------------------------------------- sequences


def test_sequences_and_their_targets() -> None:
    vocab = VisualVocab(10, 20)
    und = understanding_sample(vocab, image=3, num_visual=2, prompt=[5, 6], answer=[7], eos=2)
    assert und.ids == [10, VISUAL_SLOT, VISUAL_SLOT, 11, 5, 6, 7, 2]
    assert und.targets == [False] * 6 + [True, True]  # the answer and </s> only
    gen = generation_sample(vocab, text=[4, 5], codes=[0, 19])
    assert gen.ids == [4, 5, 10, 12, 31, 11]
    assert gen.targets == [False, False, False, True, True, True]  # codes and [/IMG], not [IMG] or the text
    txt = text_sample([4, 5], bos=1, eos=2)
    assert txt.ids == [1, 4, 5, 2] and txt.targets == [False, True, True, True]
    with pytest.raises(ValueError):
        Sample([1, 2], [True, True])
    assert vqa_prompt("What COLOR is the circle?") == "Question: what color is the circle Answer:"
    two = understanding_sample(vocab, image=3, num_visual=1, prompt=[5], answer=[7], eos=2, more_turns=[([6], [8, 9])])
    assert two.ids == [10, VISUAL_SLOT, 11, 5, 7, 2, 6, 8, 9, 2]
    assert two.targets == [False] * 4 + [True, True, False, True, True, True]  # each answer and its </s>


def test_plan_mixes_both_orders_and_text_in_every_batch() -> None:
    examples = [{"caption": f"cap {i}", "qa": [{"question": "q?", "answer": "a"}], "key": f"k{i}"} for i in range(8)]
    plans, docs = plan_batch(examples, lambda s: [len(w) for w in s.split()], 0.5, 1.0, 2.0, seed=0)
    assert [p.kind for p in plans] == ["understand"] * 4 + ["generate"] * 4
    assert all(p.prompt and p.answer == [1] for p in plans[:4])  # qa_ratio 1: all VQA
    assert len(docs) == 16
    few, _ = plan_batch(examples[:2], lambda s: [1], 0.05, 0.0, 0.0, seed=0)
    assert [p.kind for p in few] == ["understand", "generate"]  # at least one of each
    again, _ = plan_batch(examples, lambda s: [len(w) for w in s.split()], 0.5, 0.5, 2.0, seed=3)
    assert again == plan_batch(examples, lambda s: [len(w) for w in s.split()], 0.5, 0.5, 2.0, seed=3)[0]


def test_caption_drop_trains_the_unconditional_context_of_guidance() -> None:
    examples = [{"caption": "a red circle", "qa": [], "key": f"k{i}"} for i in range(400)]
    tokenize = lambda s: [len(w) for w in s.split()]  # noqa: E731
    plans, _ = plan_batch(examples, tokenize, 0.25, 0.0, 0.0, seed=1, caption_drop=0.2)
    gen = [p for p in plans if p.kind == "generate"]
    dropped = sum(p.text == [] for p in gen)
    assert 0.12 < dropped / len(gen) < 0.28  # 300 draws at p = 0.2
    assert all(p.answer == [1, 3, 6] for p in plans if p.kind == "understand")  # understanding keeps its caption
    assert plans == plan_batch(examples, tokenize, 0.25, 0.0, 0.0, seed=1, caption_drop=0.2)[0]  # deterministic
    kept, _ = plan_batch(examples, tokenize, 0.25, 0.0, 0.0, seed=1)
    assert all(p.text == [1, 3, 6] for p in kept if p.kind == "generate")  # default 0: the official, no drops
    vocab = VisualVocab(100, 16)
    sample = generation_sample(vocab, [], [5, 7])
    assert sample.ids[0] == vocab.img_start  # exactly the sampler's unconditional context, then the codes
    assert sample.targets == [False, True, True, True]
    with pytest.raises(ConfigError, match="caption_drop"):
        LavitLMConfig(caption_drop=1.5)


def test_a_vqa_sample_asks_qa_turns_distinct_questions_of_its_image() -> None:
    qa = [{"question": f"q{j}?", "answer": f"a{j}"} for j in range(5)]
    examples = [{"caption": "Answer:", "qa": qa, "key": f"k{i}"} for i in range(6)]
    words = {
        w: n for n, w in enumerate(["Question:", "Answer:", *[f"q{j}" for j in range(5)], *[f"a{j}" for j in range(5)]])
    }
    plans, _ = plan_batch(examples, lambda s: [words[w] for w in s.split()], 1.0, 1.0, 0.0, seed=0, qa_turns=3)
    for plan in plans:
        turns = [(plan.prompt, plan.answer), *plan.more_turns]
        assert len(turns) == 3 and len({tuple(p) for p, _ in turns}) == 3  # three different questions
        assert all(p[1] - 2 == a[0] - 7 for p, a in turns)  # each with its own answer
    assert len({tuple(p.prompt) for p in plans}) > 1  # random order: not always the same first question
    many, _ = plan_batch(examples, lambda s: [words[w] for w in s.split()], 1.0, 1.0, 0.0, seed=0, qa_turns=9)
    assert all(len(p.more_turns) == 4 for p in many)  # at most every question of the image
    with pytest.raises(ConfigError, match="qa_turns"):
        LavitLMConfig(qa_turns=0)


def test_prepared_batch_targets_are_exactly_the_loss_masks(task: LavitLMTask, shapes_data: Path) -> None:
    batch = first_batch(task, shapes_data)
    packed = task.prepare(batch)
    labels, ids, kinds = packed["labels"], packed["input_ids"], packed["kinds"]
    targets = labels != IGNORE
    assert task.num_targets(batch) == int(targets[:, 1:].sum())
    assert torch.equal(labels[targets], ids[targets])
    vocab = task.vocab
    und, gen, txt = kinds == 1, kinds == 2, kinds == 3
    assert not vocab.is_visual(labels[targets & und]).any()  # understanding: text targets only
    assert vocab.is_visual(labels[targets & gen]).all()  # generation: codes and [/IMG] only
    assert not (labels[targets & gen] == vocab.img_start).any()
    n_gen = sum(p.kind == "generate" for p in batch["plans"])
    assert int((labels == vocab.img_end).sum()) == n_gen  # every generated image is closed once
    assert int(targets[txt].sum()) == sum(len(d) + 1 for d in batch["docs"])  # all but <s>
    kept = packed["keep_BN"].sum(dim=1)
    assert len(packed["slot_row"]) == int(kept.sum())  # one slot per kept patch of every understanding image
    frozen = task.frozen_visual(batch["image"], [p.kind == "generate" for p in batch["plans"]])
    assert int((labels[targets] >= vocab.code_offset).sum()) == sum(len(c) for c in frozen.codes if c is not None)


def test_several_questions_per_image_reach_the_loss_with_one_end_each(shapes_data: Path) -> None:
    """With ``qa_turns`` 3 every VQA sample of a real batch asks up to three questions (every record has at least
    two): each answer is closed by a target ``</s>``, and the questions themselves are not targets."""
    task = micro_task(qa_turns=3, qa_ratio=1.0, understand_ratio=1.0, text_ratio=0.0).eval()
    batch = first_batch(task, shapes_data)
    turns = [1 + len(p.more_turns) for p in batch["plans"]]
    assert all(p.kind == "understand" for p in batch["plans"]) and min(turns) >= 2 and max(turns) == 3
    labels = task.prepare(batch)["labels"]
    assert int((labels == task.eos_id).sum()) == sum(turns)
    answers = sum(len(a) for p in batch["plans"] for a in [p.answer, *(t[1] for t in p.more_turns)])
    assert int((labels != IGNORE).sum()) == answers + sum(turns)


def test_frozen_visual_gives_the_tokenizers_codes(task: LavitLMTask) -> None:
    images = torch.rand(4, 3, 64, 64)
    ids, keep = task.tokenizer.tokenize(images)
    frozen = task.frozen_visual(images, [True, False, True, True])
    assert torch.equal(frozen.keep_BN.bool(), keep)
    assert frozen.codes[1] is None
    for b in (0, 2, 3):
        assert torch.equal(frozen.codes[b], ids[b])
    assert len({int(k) for k in keep.sum(dim=1)}) > 1  # the micro tokenizer keeps different counts
    # the understanding path starts as the tokenizer's merger (kept rows), then vit_proj
    merged, valid = task.tokenizer.causal_encoder(frozen.x_BND, frozen.keep_BN, dense=False)
    ours, ours_valid = task.visual(frozen.x_BND, frozen.keep_BN)
    assert torch.equal(valid, ours_valid)
    torch.testing.assert_close(ours[valid], task.visual.vit_proj(merged)[valid])


def test_visual_keep_all_is_the_fixed_length_baseline(shapes_data: Path) -> None:
    """``visual_keep="all"``: every patch becomes a visual token in both image orders, so every understanding image
    fills N slots and every generated image has N codes (the dynamic tokenizer keeps fewer)."""
    fixed = micro_task(visual_keep="all").eval()
    n = fixed.tokenizer.num_patches
    batch = first_batch(fixed, shapes_data)
    packed = fixed.prepare(batch)
    assert bool(packed["keep_BN"].all()) and len(packed["slot_row"]) == n * len(packed["keep_BN"])
    gen = [p.kind == "generate" for p in batch["plans"]]
    codes = fixed.frozen_visual(batch["image"], gen).codes
    assert [len(c) for c in codes if c is not None] == [n] * sum(gen)
    dynamic = micro_task().eval()
    assert int(dynamic.prepare(first_batch(dynamic, shapes_data))["keep_BN"].sum()) < int(packed["keep_BN"].sum())


# ----------------------------------------------------------------------------------------------- packing


def test_first_fit_decreasing() -> None:
    lengths = [70, 50, 40, 30, 30, 20, 10, 5]
    bins = first_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 255 tokens: the optimum
    with pytest.raises(ValueError):
        first_fit_decreasing([101], 100)


def _separate_logits(task: LavitLMTask, sample: Sample, visual_BKH: torch.Tensor | None) -> torch.Tensor:
    """The sample alone: its own row, plain causal attention, positions 0..n-1."""
    packed = pack_samples([sample], len(sample), task.pad_id)
    emb = task.embed(packed["input_ids"], visual_BKH, packed)
    return task.lm(inputs_embeds=emb, use_cache=False).logits[0]


def test_a_packed_row_gives_the_logits_and_loss_of_its_samples_run_alone(task: LavitLMTask) -> None:
    images = torch.rand(2, 3, 64, 64)
    frozen = task.frozen_visual(images, [False, True])
    k0 = int(frozen.keep_BN[0].sum())
    codes = frozen.codes[1].tolist()
    samples = [
        understanding_sample(task.vocab, 0, k0, task.encode_text("question: how many objects are there? answer:"),
                             task.encode_text("two"), task.eos_id),
        generation_sample(task.vocab, task.encode_text("two objects: a small red circle"), codes),
        text_sample(task.encode_text("a short story about shapes."), task.bos_id, task.eos_id),
    ]  # fmt: skip
    row_len = sum(len(s) for s in samples) + 5  # one row, with padding at the end
    packed = pack_samples(samples, row_len, task.pad_id)
    assert packed["input_ids"].shape[0] == 1
    packed["x_BND"], packed["keep_BN"] = frozen.x_BND[:1], frozen.keep_BN[:1]
    with torch.no_grad():
        visual_BKH = task.visual(frozen.x_BND[:1], frozen.keep_BN[:1])[0]
        logits = task.logits(packed)[0]
        col = 0
        for s in samples:  # packed in batch order
            alone = _separate_logits(task, s, visual_BKH if s.image >= 0 else None)
            torch.testing.assert_close(logits[col : col + len(s)], alone, rtol=1e-4, atol=1e-5)
            col += len(s)
        out = task({"_packed": packed})
        targets = packed["labels"][0, 1:]
        ref = F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="sum")
        torch.testing.assert_close(out["loss"], ref)
    assert padding_waste(packed) == pytest.approx(5 / row_len)


def test_packing_waste_on_a_real_batch_is_small(shapes_data: Path) -> None:
    task = micro_task(max_len=160)
    packed = task.prepare(first_batch(task, shapes_data, batch_size=16))
    assert packed["truncated"] == 0
    assert padding_waste(packed) < 0.1, padding_waste(packed)


# ----------------------------------------------------------------------------------------------- training


def test_the_lm_learns_a_fixed_batch(shapes_data: Path) -> None:
    task = micro_task(seed=1).train()
    batch = first_batch(task, shapes_data, batch_size=4)
    n = task.num_targets(batch)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        out = task(batch)
        (out["loss"] / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()) / n)
    assert losses[-1] < 0.6 * losses[0], losses
    chance = math.log(task.vocab.size)
    assert float(out["ce_generate"]) < 0.7 * chance and float(out["ce_understand"]) < 0.7 * chance
    task.eval()
    samples = task.sample()  # the loop's sample phase: a caption, and the length of a generated image
    assert samples["caption"] and 0 < int(samples["generated_tokens"]) <= visual_length_limits(64)[1]


def test_separate_learning_rates_for_the_llm_and_the_visual_part(task: LavitLMTask) -> None:
    opt = build_optimizer(task, OptimConfig(lr=5e-5, lr_groups={"visual.": 1.5e-4}))
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in task.named_parameters():
        assert by_param[id(p)] == (1.5e-4 if name.startswith("visual.") else 5e-5), name
    assert any(n.startswith("visual.merger.") for n, _ in task.named_parameters())
    frozen = micro_task(train_merger=False)
    assert not any(p.requires_grad for p in frozen.visual.merger.parameters())
    still = micro_task(train_vit_proj=False)
    assert not any(p.requires_grad for p in still.visual.vit_proj.parameters())
    opt = build_optimizer(still, OptimConfig(lr=5e-5))
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in still.visual.vit_proj.parameters())
    assert any(id(p) in optimised for p in still.visual.merger.parameters())


def test_training_through_the_engine_then_loading(shapes_data: Path, tmp_path: Path) -> None:
    from vlpretrain.lavit.lm_task import load_lm

    tok = tokenizer_folder(tmp_path / "tok")
    run = {
        "task": "lavit-lm", "model_preset": "tiny",
        "model": {"llm": dataclasses.asdict(micro_llm()), "max_len": 160, "tokenizer": str(tok)},
        "data": {"train": str(shapes_data / "train"), "val": str(shapes_data / "val"), "batch_size": 4,
                 "shuffle_buffer": 0},
        "optim": {"lr": 1e-3, "lr_groups": {"visual.": 3e-3}},
        "steps": 2, "log": {"every": 1, "progress": False, "peak_tflops": 1.0, "eval_batches": 1},
        "out_dir": str(tmp_path / "run"), "schedule": {"warmup_steps": 1},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(run))
    main(["train", str(tmp_path / "run.yaml")])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"ce_understand", "ce_generate", "ce_text", "pad_frac"} <= records[0].keys()
    assert any("val_loss" in r for r in records)
    lm, _ = load_lm(tmp_path / "run")
    assert not any(k.startswith("tokenizer.") for k in lm.state_dict())  # the frozen tokenizer is not saved
    assert lm.tokenizer_digest.any()


def test_init_starts_from_another_runs_weights_and_loading_does_not_need_it(tmp_path: Path) -> None:
    from vlpretrain.lavit.lm_task import load_lm

    tok = tokenizer_folder(tmp_path / "tok")
    cfg = micro_config(tokenizer=str(tok))
    torch.manual_seed(1)
    first = LavitLMTask(cfg)
    save_task(first, "lavit-lm", cfg, tmp_path / "stage1")
    torch.manual_seed(2)  # another random init: only loading can make the two equal
    second = LavitLMTask(dataclasses.replace(cfg, init=str(tmp_path / "stage1"), text_ratio=0.0))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    save_task(second, "lavit-lm", second.cfg, tmp_path / "stage2")
    (tmp_path / "stage1" / "model.safetensors").unlink()
    loaded, _ = load_lm(tmp_path / "stage2")  # its own weights; the init folder is gone
    assert torch.equal(loaded.lm.lm_head.weight, first.lm.lm_head.weight)


def test_init_from_an_lm_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    cfg = micro_config(tokenizer=str(tokenizer_folder(tmp_path / "tok0", seed=0)))
    save_task(LavitLMTask(cfg), "lavit-lm", cfg, tmp_path / "stage1")
    other = micro_config(tokenizer=str(tokenizer_folder(tmp_path / "tok1", seed=1)), init=str(tmp_path / "stage1"))
    with pytest.raises(UserError, match="another visual tokenizer"):
        LavitLMTask(other)
    wider = micro_config(tokenizer=cfg.tokenizer, init=str(tmp_path / "stage1"),
                         llm=dataclasses.replace(micro_llm(), intermediate_size=96))  # fmt: skip
    with pytest.raises(UserError, match="has shape"):
        LavitLMTask(wider)


def test_whitened_visual_input_is_fitted_in_training_and_saved(shapes_data: Path, tmp_path: Path) -> None:
    from vlpretrain.lavit.lm_task import load_lm

    cfg = micro_config(tokenizer=str(tokenizer_folder(tmp_path / "tok")), whiten_visual=1.0)
    task = LavitLMTask(cfg).train()
    assert not bool(task.visual.whiten.fitted)
    task(first_batch(task, shapes_data))["loss"].backward()  # the first training batch fits the map
    dim = task.tokenizer.encoder.dim
    assert bool(task.visual.whiten.fitted) and not torch.equal(task.visual.whiten.map_DD, torch.eye(dim))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.visual.merger.parameters())
    save_task(task, "lavit-lm", cfg, tmp_path / "lm")
    loaded, _ = load_lm(tmp_path / "lm")
    x_BND, keep_BN = torch.randn(2, 64, dim), torch.rand(2, 64) < 0.4
    task.eval()
    assert torch.equal(loaded.visual(x_BND, keep_BN)[0], task.visual(x_BND, keep_BN)[0])
    with pytest.raises(ConfigError, match="whiten_visual"):
        micro_config(whiten_visual=-1.0)
