"""The unified LM for users: Pipeline batching and seeding, the caption/ask/generate/eval commands, bad input, the
official converter, and the quality evaluation's scoring."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lavit_lm import CODES, micro_config, micro_tokenizer, tokenizer_folder
from transformers import LlamaConfig, LlamaForCausalLM

from vlpretrain.cli import main
from vlpretrain.core.text_tokenizer import train_word_tokenizer
from vlpretrain.data.judge import objects_from_record
from vlpretrain.data.shards import read_records
from vlpretrain.data.synthetic import SynthConfig, make_example
from vlpretrain.errors import UserError
from vlpretrain.eval.lm_quality import eval_text_to_image, eval_vqa, parse_caption, score_captions
from vlpretrain.lavit.convert_lm import convert_lm
from vlpretrain.lavit.generate import SamplingConfig, understanding_inputs
from vlpretrain.lavit.lm_task import LavitLMTask, load_lm
from vlpretrain.lavit.merger import TokenMerger
from vlpretrain.lavit.pipeline import Pipeline
from vlpretrain.lavit.rerank import CANDIDATE_SEED_STRIDE, caption_logprob
from vlpretrain.train.pretrained import save_task

SIDE = 32  # the micro detokenizer's images


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A micro tokenizer, a micro LM trained with it (random weights), a micro detokenizer, and test images."""
    from vlpretrain.configs import get_preset
    from vlpretrain.lavit.detokenizer import DetokenizerConfig
    from vlpretrain.lavit.detokenizer_task import LavitDetokenizerTask

    root = tmp_path_factory.mktemp("lm")
    tok = tokenizer_folder(root / "tok")
    cfg = micro_config(tokenizer=str(tok))
    torch.manual_seed(0)
    lm = save_task(LavitLMTask(cfg, micro_tokenizer()), "lavit-lm", cfg, root / "lm")
    unet = {"sample_size": SIDE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4,
            "cross_attention_dim": 64, "norm_num_groups": 8}  # fmt: skip
    dcfg = DetokenizerConfig(tokenizer=str(tok), image_size=SIDE, unet=unet, sample_steps=1,
                             scheduler=get_preset("lavit-detokenizer", "tiny").scheduler)  # fmt: skip
    detok = save_task(LavitDetokenizerTask(dcfg), "lavit-detokenizer", dcfg, root / "detok")
    images = []
    for i in range(3):
        path = root / f"img{i}.png"
        Image.fromarray(make_example(SynthConfig(), "test", i).image).save(path)
        images.append(path)
    return SimpleNamespace(root=root, tok=tok, lm=lm, detok=detok, images=images)


def test_pipeline_results_do_not_depend_on_batching(folders: SimpleNamespace) -> None:
    pipe = Pipeline.from_pretrained(folders.lm)
    assert pipe.detokenizer is None
    images = [str(p) for p in folders.images]
    kw = {"min_new_tokens": 2, "max_new_tokens": 6}
    assert pipe.caption(images, batch_size=1, **kw) == pipe.caption(images, batch_size=3, **kw)
    questions = ["what color is the circle?", "how many objects are there?", "is there a red square?"]
    assert pipe.ask(images, questions, batch_size=1) == pipe.ask(images, questions, batch_size=2)
    texts = ["one object: a small red circle in the center.", "two objects", "three objects"]
    sampling = SamplingConfig(min_tokens=2, max_tokens=8)
    codes = pipe.generate_codes(texts, sampling=sampling, seed=3, batch_size=3)
    assert [c.tolist() for c in codes] == [c.tolist() for c in pipe.generate_codes(texts, sampling=sampling, seed=3,
                                                                                    batch_size=1)]  # fmt: skip
    assert all(2 <= len(c) <= 8 for c in codes)
    mixed = pipe.prompts(texts[:2], [images[0], None])
    image_codes = pipe.images.encode([images[0]])[0]
    assert mixed[0][: len(image_codes)] == (image_codes + pipe.model.vocab.code_offset).tolist()  # codes, no [IMG]
    assert mixed[0][-1] == pipe.model.vocab.img_start and mixed[1] == pipe.prompts(texts[1:2])[0]


def test_generate_with_a_detokenizer_gives_seeded_pixels(folders: SimpleNamespace) -> None:
    pipe = Pipeline.from_pretrained(folders.lm, detokenizer=folders.detok)
    sampling = SamplingConfig(min_tokens=2, max_tokens=6)
    out = pipe.generate(["two objects", "one object"], sampling=sampling, seed=1)
    assert out.images is not None and out.images.shape == (2, 3, SIDE, SIDE)
    again = pipe.generate(["two objects", "one object"], sampling=sampling, seed=1)
    assert torch.equal(out.images, again.images)


def test_caption_logprob_matches_one_unpadded_row_per_image(folders: SimpleNamespace) -> None:
    pipe = Pipeline.from_pretrained(folders.lm)
    model = pipe.model
    pixels = pipe.pixels([str(p) for p in folders.images])
    texts = ["one object: a small red circle in the center.", "two objects", ""]
    batched = caption_logprob(model, pixels, texts)
    for b, text in enumerate(texts):  # naive: [IMG] v [/IMG] text </s> alone, full log-softmax, sum over the text
        ids = model.encode_text(text) + [model.eos_id]
        with torch.no_grad():
            embeds, _, _ = understanding_inputs(model, pixels[b : b + 1], [ids])
            logp = model.lm(inputs_embeds=embeds).logits[0].float().log_softmax(dim=-1)
        want = sum(logp[len(embeds[0]) - len(ids) - 1 + i, t] for i, t in enumerate(ids))
        assert batched[b].item() == pytest.approx(float(want), abs=1e-3)
    assert torch.equal(pipe.caption_score(pixels, texts, batch_size=1), pipe.caption_score(pixels, texts))
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        caption_logprob(model, pixels, texts[:2])


def test_best_of_n_keeps_the_candidate_the_scorer_prefers(folders: SimpleNamespace) -> None:
    pipe = Pipeline.from_pretrained(folders.lm, detokenizer=folders.detok)
    sampling = SamplingConfig(min_tokens=2, max_tokens=6)
    texts = ["two objects", "one object", "three objects"]
    draws = [pipe.generate(texts, sampling=sampling, seed=5 + j * CANDIDATE_SEED_STRIDE) for j in range(3)]
    assert all(not torch.equal(draws[0].images[b], draws[j].images[b]) for j in (1, 2) for b in range(3))
    brightness = lambda images, prompts: images.mean(dim=(1, 2, 3))  # noqa: E731
    best = pipe.generate(texts, sampling=sampling, seed=5, candidates=3, scorer=brightness)
    for b in range(len(texts)):
        j = max(range(3), key=lambda j: brightness(draws[j].images, texts)[b].item())
        assert torch.equal(best.images[b], draws[j].images[b])
        assert best.codes[b].tolist() == draws[j].codes[b].tolist()
        assert best.scores[b].item() == pytest.approx(brightness(draws[j].images, texts)[b].item())
    assert all(torch.equal(best.candidates[j].images, draws[j].images) for j in range(3))  # every drawing kept
    assert draws[0].scores is None  # one candidate: the plain drawing, unscored
    assert draws[0].candidates == []
    own = pipe.generate(texts, sampling=sampling, seed=5, candidates=2)  # the default scorer: the LM's caption score
    scores = torch.stack([pipe.caption_score(d.images, texts) for d in draws[:2]])
    assert torch.allclose(own.scores, scores.max(dim=0).values)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        pipe.generate(texts, candidates=0)
    with pytest.raises(ValueError, match="needs pixels"):
        Pipeline.from_pretrained(folders.lm).generate(texts, candidates=2)


def test_commands(folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lm = str(folders.lm)
    main(["caption", *map(str, folders.images[:2]), "--checkpoint", lm, "--min-new-tokens", "2", "--max-new-tokens",
          "5"])  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == list(map(str, folders.images[:2])) and all(r["caption"] for r in rows)
    main(["ask", str(folders.images[0]), "what color is the circle?", "--checkpoint", lm])
    assert capsys.readouterr().out.strip()
    out = tmp_path / "gen"
    main(["generate", "one object: a small red circle.", "--out", str(out), "--seed", "4", "--num", "2",
          "--checkpoint", lm, "--detokenizer", str(folders.detok), "--max-tokens", "6",
          "--image", str(folders.images[1]), "--candidates", "2"])  # fmt: skip
    written = json.loads((out / "tokens.json").read_text())
    assert [r["seed"] for r in written] == [4, 5] and all(1 <= r["tokens"] <= 6 for r in written)
    assert all(r["caption_logprob"] < 0 for r in written)  # best of 2 by the LM's caption score
    assert Image.open(out / "image_1.png").size == (SIDE, SIDE)


def test_eval_command_writes_metrics_and_samples(folders: SimpleNamespace, shapes_data: Path, tmp_path: Path) -> None:
    main(["eval", "lm", "--checkpoint", str(folders.lm), "--data", str(shapes_data), "--limit", "3",
          "--judge", str(tmp_path / "no-judge"), "--out", str(tmp_path / "eval")])  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["caption_attr_f1"] <= 1 and 0 <= metrics["vqa_accuracy"] <= 1
    assert "t2i_prompt_match" not in metrics  # no judge: text-to-image is skipped
    samples = json.loads((tmp_path / "eval" / "samples.json").read_text())
    assert len(samples["captions"]) == 3 and samples["answers"]


def test_eval_draws_best_of_n_and_scores_the_single_drawing_too(folders: SimpleNamespace, shapes_data: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import inspect

    import vlpretrain.data.judge as judge_module
    from vlpretrain.cli.lavit_lm import eval_lm
    from vlpretrain.eval.lm_quality import EVAL_CANDIDATES, EVAL_GUIDANCE, EVAL_TOP_K, run

    seen = []

    class Judge:  # sees one object in every drawing; records the pixels it was shown
        def read(self, images):
            seen.append(images.clone())
            return [objects_from_record({"objects": [{"color": "red", "shape": "circle", "size": "small", "row": 0,
                                                      "col": 0}], "grid": 3})] * len(images)  # fmt: skip

    monkeypatch.setattr(judge_module, "load_judge", lambda path: Judge())
    sampling = SamplingConfig(guidance_scale=1.5, top_k=300, min_tokens=2, max_tokens=6)
    metrics = run(folders.lm, shapes_data / "test", "judge", folders.detok, limit=3, t2i_limit=2, seed=2,
                  sampling=sampling, candidates=2)  # fmt: skip
    pipe = Pipeline.from_pretrained(folders.lm, detokenizer=folders.detok)
    prompts = [r["caption"] for r in read_records(str(shapes_data / "test"), limit=2)[1]]
    assert torch.equal(seen[0], pipe.generate(prompts, sampling=sampling, seed=2, candidates=2).images)
    assert torch.equal(seen[1], pipe.generate(prompts, sampling=sampling, seed=2).images)
    assert {"t2i_prompt_match", "t2i_single_prompt_match", "t2i_single_tokens_mean"} <= set(metrics)
    defaults = {k: p.default.default for k, p in inspect.signature(eval_lm).parameters.items()}  # typer.Option
    assert (defaults["guidance"], defaults["top_k"], defaults["candidates"]) == (EVAL_GUIDANCE, EVAL_TOP_K,
                                                                                 EVAL_CANDIDATES)  # fmt: skip


def _error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_gives_one_clear_line(folders: SimpleNamespace, tmp_path: Path, capsys) -> None:
    lm = str(folders.lm)
    err = _error_line(["generate", " ".join(["red"] * 300), "--out", str(tmp_path / "o"), "--checkpoint", lm], capsys)
    assert "context" in err
    err = _error_line(["generate", "red", "--out", str(tmp_path / "o"), "--checkpoint", lm, "--candidates", "2"],
                      capsys)  # fmt: skip
    assert err.startswith("error: --candidates") and "detokenizer" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert str(broken) in _error_line(["caption", str(broken), "--checkpoint", lm], capsys)
    text_lm = tmp_path / "text_lm"
    text_lm.mkdir()
    (text_lm / "config.json").write_text(json.dumps({"task": "text-lm", "model": {}}))
    save_file({"x": torch.zeros(1)}, str(text_lm / "model.safetensors"))
    assert "no visual vocabulary" in _error_line(["caption", str(folders.images[0]), "--checkpoint", str(text_lm)],
                                                 capsys)  # fmt: skip
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((Path(lm) / "config.json").read_text())
    state = load_file(str(Path(lm) / "model.safetensors"))
    text_rows = load_lm(lm)[0].vocab.text_size
    for key in ("lm.model.embed_tokens.weight", "lm.lm_head.weight"):
        state[key] = state[key][:text_rows].contiguous()
    save_file(state, str(cut / "model.safetensors"))
    assert "no visual vocabulary" in _error_line(["ask", str(folders.images[0]), "what?", "--checkpoint", str(cut)],
                                                 capsys)  # fmt: skip


# ----------------------------------------------------------------------------------------------- converter


def write_official(root: Path, vocab_extra: int = 0) -> tuple[Path, LlamaForCausalLM, dict[str, torch.Tensor]]:
    """A tiny official ``language_model/`` folder: a word-level text tokenizer, an HF LLaMA (vocabulary text + 2 +
    64 codes, RMSNorm eps 1e-5, RoPE base 5000, an old rotary buffer in the file) and ``visual_weight.bin``."""
    torch.manual_seed(0)
    folder = root / "language_model"
    folder.mkdir(parents=True)
    text = train_word_tokenizer(["a red circle on the left of a blue square", "one two three objects"])
    text.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(text) + 2 + CODES + vocab_extra, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0,
                         tie_word_embeddings=False)  # fmt: skip
    source = LlamaForCausalLM(config).eval()
    config.save_pretrained(folder)
    state = dict(source.state_dict()) | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    torch.save(state, folder / "pytorch_model.bin")
    merger = TokenMerger(128, 2, 4, 512)
    visual = {f"causal_encoder.{k}": v.clone() for k, v in merger.state_dict().items()}
    visual |= {"vit_proj.weight": torch.randn(32, 128), "vit_proj.bias": torch.randn(32)}
    torch.save(visual, folder / "visual_weight.bin")
    return root, source, visual


def test_converter_reproduces_the_official_language_model(folders: SimpleNamespace, tmp_path: Path, capsys) -> None:
    official, source, visual = write_official(tmp_path / "official")
    main(["convert", "lavit-lm", str(official), str(tmp_path / "out"), "--tokenizer", str(folders.tok),
          "--max-len", "128"])  # fmt: skip
    assert "rotary_emb.inv_freq" in capsys.readouterr().out  # reported as known and unused
    task, config = load_lm(tmp_path / "out")
    assert config["model"]["text_tokenizer"] == "text_tokenizer" and task.lm.config.rms_norm_eps == 1e-5
    ids = torch.randint(0, task.vocab.size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(task.lm(ids).logits, source(ids).logits, rtol=0, atol=1e-6)
    for key, value in visual.items():
        ours = key.replace("causal_encoder.", "visual.merger.").replace("vit_proj.", "visual.vit_proj.")
        assert torch.equal(task.state_dict()[ours], value), key


def test_converter_errors_name_the_file_and_key(folders: SimpleNamespace, tmp_path: Path) -> None:
    official, _, visual = write_official(tmp_path / "a")
    torch.save(visual | {"token_predictor.in_conv.1.weight": torch.zeros(1)}, official / "language_model" /
               "visual_weight.bin")  # fmt: skip
    with pytest.raises(UserError, match=r"visual_weight.bin: unexpected keys token_predictor"):
        convert_lm(official, tmp_path / "out_a", tokenizer=str(folders.tok))
    torch.save(visual | {"vit_proj.weight": torch.zeros(32, 64)}, official / "language_model" / "visual_weight.bin")
    with pytest.raises(UserError, match=r"vit_proj.weight: file \(32, 64\), model \(32, 128\)"):
        convert_lm(official, tmp_path / "out_b", tokenizer=str(folders.tok))
    (official / "language_model" / "visual_weight.bin").unlink()
    with pytest.raises(UserError, match="missing .*visual_weight.bin"):
        convert_lm(official, tmp_path / "out_c", tokenizer=str(folders.tok))
    other, _, _ = write_official(tmp_path / "b", vocab_extra=3)
    with pytest.raises(UserError, match="vocab_size"):
        convert_lm(other, tmp_path / "out_d", tokenizer=str(folders.tok))


# ----------------------------------------------------------------------------------------------- quality


def test_caption_scores() -> None:
    examples = [make_example(SynthConfig(), "test", i) for i in range(40)]
    records = [ex.scene.record() for ex in examples]
    perfect = score_captions([ex.caption for ex in examples], records)
    assert perfect["caption_attr_f1"] == perfect["caption_object_f1"] == perfect["caption_count_acc"] == 1.0
    objects, count = parse_caption("two objects: a small red circle at the top left and a large blue cross in the "
                                   "center. the red circle is left of the blue cross.")  # fmt: skip
    assert count == 2 and objects[1] == {"size": "large", "color": "blue", "shape": "cross", "position": "center"}
    circle = {"shape": "circle", "color": "red", "size": "small", "row": 0, "col": 0}
    record = {"grid": 3, "objects": [circle, {"shape": "cross", "color": "blue", "size": "large", "row": 1, "col": 1}]}
    half = score_captions(["two objects: a small red circle at the top left"], [record])
    assert half["caption_attr_precision"] == 1.0 and half["caption_attr_recall"] == 0.5
    wrong = score_captions(["two objects: a small green circle at the top left and a large blue cross in the "
                            "center"], [record])  # fmt: skip
    assert wrong["caption_attr_f1"] == pytest.approx(7 / 8) and wrong["caption_object_f1"] == pytest.approx(0.5)


def test_vqa_and_text_to_image_scores() -> None:
    examples = [make_example(SynthConfig(), "test", i) for i in range(6)]
    records = [ex.scene.record() | {"caption": ex.caption, "qa": ex.qa} for ex in examples]
    images = [ex.image for ex in examples]
    truth = [q["answer"] for ex in examples for q in ex.qa]  # in the order eval_vqa asks

    class Fake:
        def ask(self, imgs, questions, batch_size=32):
            assert len(questions) == len(truth)
            return [answer.upper() + "." for answer in truth]

        def generate(self, texts, sampling=None, seed=0, batch_size=16, candidates=1):
            return SimpleNamespace(codes=[torch.arange(5)] * len(texts), images=torch.zeros(len(texts), 3, 8, 8))

    metrics, rows = eval_vqa(Fake(), images, records)
    assert metrics["vqa_accuracy"] == 1.0 and metrics["vqa_count"] == 1.0  # case and punctuation do not count
    assert len(rows) == sum(len(ex.qa) for ex in examples)
    judge = SimpleNamespace(read=lambda imgs: [objects_from_record(r)[:1] for r in records])  # sees one object
    t2i, _ = eval_text_to_image(Fake(), records, judge)
    single = np.mean([len(r["objects"]) == 1 for r in records])
    assert t2i["t2i_count"] == pytest.approx(single) and t2i["t2i_tokens_mean"] == 5
