"""The LaVIT detokenizer: shapes, classifier-free guidance, condition dropout, determinism, learning, the official
converter, the `reconstruct` command, the reconstruction evaluation and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlpretrain.cli import main
from vlpretrain.configs import ConfigError, get_preset
from vlpretrain.data.judge import Judge
from vlpretrain.data.shards import read_records
from vlpretrain.errors import UserError
from vlpretrain.lavit.convert_detokenizer import VARIANTS, convert_detokenizer
from vlpretrain.lavit.detokenizer import AttentionPool, Condition, DetokenizerConfig, DiffusionDecoder
from vlpretrain.lavit.detokenizer_api import Detokenizer
from vlpretrain.lavit.detokenizer_task import LavitDetokenizerTask, load_detokenizer
from vlpretrain.lavit.tokenizer import DynamicTokenizer, TokenizerConfig
from vlpretrain.lavit.tokenizer_task import LavitTokenizerTask
from vlpretrain.train.pretrained import save_task

SIDE = 32  # the micro UNet's images (the tokenizer reads them resized to its 64 px)


def micro_unet(**extra: Any) -> dict[str, Any]:
    """A two-level 32 px UNet with cross-attention at the lower level (fast enough for many tests)."""
    return {
        "sample_size": SIDE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
        "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4, "cross_attention_dim": 64,
        "norm_num_groups": 8,
    } | extra  # fmt: skip


def micro(variant: str = "pixel", **fields: Any) -> DetokenizerConfig:
    """Micro configs: "pixel", "latent" (a 2x VAE), "highres" (pooled + size ids), "negative" (stored uncond),
    "spatial" (the condition also concatenated to the UNet's input on its patch grid), "s2d" (2 x 2 pixel blocks
    folded into channels, with the spatial condition)."""
    base = get_preset("lavit-detokenizer", "tiny")
    kw: dict[str, Any] = {"image_size": SIDE, "unet": micro_unet(), "scheduler": base.scheduler, "sample_steps": 2}
    if variant == "latent":
        kw["latent"] = True
        blocks = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
        kw["vae"] = {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 4} | blocks
        kw["unet"] = micro_unet(sample_size=SIDE // 2, in_channels=4, out_channels=4)
    if variant == "highres":
        kw |= {"proj_dims": [32, 32], "pooled_dim": 16, "pool_heads": 4}
        kw["unet"] = micro_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=16 + 6 * 4)  # fmt: skip
    if variant == "negative":
        kw["negative_tokens"] = 5
    if variant == "spatial":
        kw |= {"spatial_channels": 4, "unet": micro_unet(in_channels=3 + 4)}
    if variant == "s2d":
        kw |= {"space_to_depth": 2, "spatial_channels": 4,
               "unet": micro_unet(sample_size=SIDE // 2, in_channels=12 + 4, out_channels=12)}  # fmt: skip
    return DetokenizerConfig(**(kw | fields))


def tokenizer_config() -> TokenizerConfig:
    return TokenizerConfig(codebook_size=64)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = tokenizer_config()
    return save_task(LavitTokenizerTask(cfg), "lavit-tokenizer", cfg, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def detok_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    cfg = micro(tokenizer=str(tokenizer_dir))
    return save_task(LavitDetokenizerTask(cfg), "lavit-detokenizer", cfg, tmp_path_factory.mktemp("detok"))


def task_for(cfg: DetokenizerConfig, seed: int = 0) -> LavitDetokenizerTask:
    torch.manual_seed(seed)
    return LavitDetokenizerTask(cfg, DynamicTokenizer(tokenizer_config()))


@pytest.mark.parametrize("variant", ["pixel", "latent", "highres", "negative", "spatial", "s2d"])
def test_shapes(variant: str) -> None:
    task = task_for(micro(variant, token_positions=variant == "pixel"))
    images = torch.rand(2, 3, SIDE, SIDE)
    feats = task.features(images)
    assert feats.shape == (2, 64, 128)
    cond = task.detokenizer.condition(feats)
    assert cond.tokens_BNC.shape == (2, 64, 64)
    assert (cond.pooled_BP is not None) == (variant == "highres")
    if variant == "highres":
        assert cond.pooled_BP.shape == (2, 16)
    assert (cond.spatial_BCGG is not None) == (variant in ("spatial", "s2d"))
    if variant in ("spatial", "s2d"):
        assert cond.spatial_BCGG.shape == (2, 4, 8, 8)
    loss = task.detokenizer.loss(images, feats)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    noise = task.detokenizer.initial_noise(2, torch.Generator().manual_seed(0))
    want = {"latent": (2, 4, SIDE // 2, SIDE // 2), "s2d": (2, 12, SIDE // 2, SIDE // 2)}.get(variant)
    assert noise.shape == (want or (2, 3, SIDE, SIDE))
    if variant == "s2d":  # folding pixels into channels is lossless
        back = task.detokenizer.to_pixels(task.detokenizer.to_sample_space(images))
        assert torch.allclose(back, images, atol=1e-6)
    out = task.detokenizer.sample(feats, noise, steps=2, guidance_scale=2.0)
    assert out.shape == (2, 3, SIDE, SIDE) and out.min() >= 0 and out.max() <= 1


def test_attention_pool_is_the_clip_attention_pool() -> None:
    torch.manual_seed(0)
    pool = AttentionPool(seq_len=6, dim=16, heads=4, out_dim=8)
    torch.nn.init.normal_(pool.positional_embedding)
    x = torch.randn(3, 6, 16)
    tokens = torch.cat([x.mean(1, keepdim=True), x], 1) + pool.positional_embedding
    ref, _ = F.multi_head_attention_forward(
        tokens.transpose(0, 1), tokens.transpose(0, 1), tokens.transpose(0, 1), 16, 4, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight, need_weights=False,
    )  # fmt: skip
    assert torch.allclose(pool(x), ref[0], atol=1e-6)


@pytest.mark.parametrize("variant", ["pixel", "highres", "negative", "spatial"])
def test_batched_guidance_equals_two_separate_passes(variant: str) -> None:
    task = task_for(micro(variant)).eval()
    dec = task.detokenizer
    if variant == "negative":
        dec.negative_embeds.normal_()
    feats, x = torch.randn(3, 64, 128), torch.randn(3, 3, SIDE, SIDE)
    t = torch.tensor(700)
    with torch.no_grad():
        cond = dec.condition(feats)
        batched = dec.guided_prediction(x, t, cond, 4.0, batched=True)
        separate = dec.guided_prediction(x, t, cond, 4.0, batched=False)
        uncond = dec.predict(x, t.expand(3), dec.null_condition(cond))
        conditional = dec.predict(x, t.expand(3), cond)
    assert torch.allclose(batched, separate, atol=2e-5)
    assert torch.allclose(batched, uncond + 4.0 * (conditional - uncond), atol=2e-5)
    assert not torch.allclose(uncond, conditional, atol=1e-3)  # the condition matters


def test_spatial_condition_lays_each_patch_feature_on_its_grid_cell() -> None:
    dec = task_for(micro("spatial")).detokenizer
    feats = torch.randn(1, 64, 128)
    moved = feats.clone()
    moved[0, 8 * 3 + 5] += 1.0  # patch (row 3, column 5)
    diff = (dec.condition(moved).spatial_BCGG - dec.condition(feats).spatial_BCGG).abs().sum(1)[0]
    assert diff[3, 5] > 0 and diff.sum() == diff[3, 5]
    x, t = torch.randn(1, 3, SIDE, SIDE), torch.tensor([500])
    dec.predict(x, t, dec.condition(feats)).square().mean().backward()
    assert dec.condition.spatial_proj.weight.grad.abs().sum() > 0
    dropped = dec.drop_condition(dec.condition(torch.randn(100, 64, 128)), 0.5)
    nulled = (dropped.tokens_BNC == 0).flatten(1).all(1)
    assert 0 < nulled.sum() < 100 and torch.equal(nulled, (dropped.spatial_BCGG == 0).flatten(1).all(1))


def test_spatial_condition_needs_a_square_grid_and_matching_unet_channels() -> None:
    with pytest.raises(ConfigError, match="unet.in_channels"):
        micro("spatial", unet=micro_unet())
    with pytest.raises(ConfigError, match="square patch grid"):
        micro("spatial", num_patches=60)
    with pytest.raises(ConfigError, match="space_to_depth"):
        micro("latent", space_to_depth=2)


def test_condition_dropout_replaces_whole_conditions_with_the_null_one() -> None:
    dec = task_for(micro("highres", token_positions=True)).detokenizer  # positions are part of the condition
    cond = dec.condition(torch.randn(200, 64, 128))
    torch.manual_seed(0)
    dropped = dec.drop_condition(cond, 0.3)
    zero = (dropped.tokens_BNC == 0).flatten(1).all(1)
    assert torch.equal(zero, (dropped.pooled_BP == 0).all(1))
    assert 0.2 < zero.float().mean() < 0.4
    assert torch.equal(dropped.tokens_BNC[~zero], cond.tokens_BNC[~zero])
    assert dec.drop_condition(cond, 0.0) is cond
    neg = task_for(micro("negative")).detokenizer
    neg.negative_embeds.fill_(1.0)
    cond = neg.condition(torch.randn(50, 64, 128))
    dropped = neg.drop_condition(cond, 0.5)
    nulled = (dropped.tokens_BNC[:, 5:] == 0).flatten(1).all(1)
    assert (dropped.tokens_BNC[nulled, :5] == 1).all() and not dropped.mask_BN[nulled, 5:].any()
    assert dropped.mask_BN[~nulled].all()


def test_training_loss_drops_conditions_and_eval_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    dec = task_for(micro(cond_dropout=0.5)).detokenizer
    seen: list[Condition] = []
    real = DiffusionDecoder.predict
    monkeypatch.setattr(DiffusionDecoder, "predict", lambda self, x, t, c: seen.append(c) or real(self, x, t, c))
    images, feats = torch.rand(32, 3, SIDE, SIDE), torch.randn(32, 64, 128)
    dec.train().loss(images, feats)
    dec.eval().loss(images, feats)
    zero = [(c.tokens_BNC == 0).flatten(1).all(1) for c in seen]
    assert 0 < zero[0].sum() < 32 and not zero[1].any()


def test_seeded_sampling_is_deterministic(detok_dir: Path) -> None:
    detok = Detokenizer.from_pretrained(detok_dir)
    ids = [torch.tensor([1, 2, 3]), torch.tensor([5]), torch.tensor([7, 8])]
    first = detok.decode(ids, steps=3, guidance_scale=2.0, seed=7)
    assert torch.equal(first, detok.decode(ids, steps=3, guidance_scale=2.0, seed=7))
    assert not torch.allclose(first, detok.decode(ids, steps=3, guidance_scale=2.0, seed=8))
    one_by_one = detok.decode(ids, steps=3, guidance_scale=2.0, seed=7, batch_size=1)
    assert (first - one_by_one).abs().max() < 5e-3  # the same noise per image; only float rounding differs
    separate = detok.decode(ids, steps=3, guidance_scale=2.0, seed=7, batched_cfg=False)
    assert (first - separate).abs().max() < 5e-3  # the guided difference amplifies fp32 rounding


def test_a_tiny_model_learns(shapes_data: Path) -> None:
    arrays, _ = read_records(str(shapes_data / "train"), limit=8)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    images = F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", antialias=True)
    task = task_for(micro())
    feats = task.features(images)

    def fixed_loss() -> float:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(123)
            return float(task.detokenizer.eval().loss(images.repeat(4, 1, 1, 1), feats.repeat(4, 1, 1)).mean())

    before = fixed_loss()
    opt = torch.optim.AdamW(task.parameters(), lr=2e-3)
    task.train()
    for _ in range(40):
        loss = task.detokenizer.loss(images, feats).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)


def test_training_through_the_engine_and_loading(tokenizer_dir: Path, shapes_data: Path, tmp_path: Path) -> None:
    cfg = micro(tokenizer=str(tokenizer_dir))
    run = {
        "task": "lavit-detokenizer", "model_preset": "tiny",
        "model": {k: getattr(cfg, k) for k in ("tokenizer", "image_size", "unet", "sample_steps", "spatial_channels",
                                                "space_to_depth")},
        "data": {"train": str(shapes_data / "train"), "batch_size": 4, "shuffle_buffer": 0},
        "steps": 2, "log": {"every": 1, "progress": False, "peak_tflops": 1.0}, "out_dir": str(tmp_path / "run"),
        "schedule": {"warmup_steps": 1},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(run))
    main(["train", str(tmp_path / "run.yaml")])
    detok = Detokenizer.from_pretrained(tmp_path / "run")
    assert detok.decode([torch.tensor([3, 4])], steps=1).shape == (1, 3, SIDE, SIDE)
    assert not any(k.startswith("tokenizer.") for k in detok.task.state_dict())  # not saved with the stage


def write_official(root: Path, variant: str = "lowres", vae: bool = False, legacy_vae: bool = False) -> Path:
    """A tiny official LaVIT folder: a diffusers pixel decoder + the tokenizer's decoder file, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    highres = variant == "highres"
    sub, stem = ("highres_pixel_decoding", "highres_tokenizer_decoder") if highres else VARIANTS["lowres"]
    cfg = micro("highres" if highres else "latent" if vae else "pixel")
    UNet2DConditionModel(**cfg.unet).save_pretrained(root / sub / "unet", safe_serialization=False)
    DDIMScheduler(**cfg.scheduler).save_pretrained(root / sub / "scheduler")
    if vae:
        model = AutoencoderKL(**cfg.vae)
        model.save_pretrained(root / sub / "vae")
        if legacy_vae:  # diffusers < 0.14 names for the mid-block attention
            state = {}
            for key, value in model.state_dict().items():
                for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                    key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                state[key] = value
            (root / sub / "vae" / "diffusion_pytorch_model.safetensors").unlink()
            torch.save(state, root / sub / "vae" / "diffusion_pytorch_model.bin")
    if not highres:
        torch.save(torch.randn(1, 5, 64), root / sub / "uncond_embeddings.bin")
    decoder = {"query_embed": torch.randn(1, 64, 128), "in_proj.weight": torch.randn(128, 32)}
    decoder |= {"blocks.0.norm0.weight": torch.ones(128), "decode_task_layer.0.weight": torch.randn(128, 128)}
    for name, width in [("unet_proj_1", 32), ("unet_proj_2", 32)] if highres else [("unet_proj", 64)]:
        decoder |= {f"{name}.weight": torch.randn(width, 128) * 0.1, f"{name}.bias": torch.randn(width)}
    if highres:
        decoder |= {"unet_attnpool.positional_embedding": torch.randn(65, 128)}
        for name, out in (("q_proj", 128), ("k_proj", 128), ("v_proj", 128), ("c_proj", 16)):
            decoder |= {f"unet_attnpool.{name}.weight": torch.randn(out, 128) * 0.1,
                        f"unet_attnpool.{name}.bias": torch.randn(out)}  # fmt: skip
    (root / "visual_tokenizer").mkdir(parents=True, exist_ok=True)
    torch.save(decoder, root / "visual_tokenizer" / f"{stem}.bin")
    return root


@pytest.mark.parametrize(("variant", "vae"), [("lowres", True), ("highres", False)])
def test_converter_reproduces_the_official_decoder(variant: str, vae: bool, tokenizer_dir: Path, tmp_path: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sub = "highres_pixel_decoding" if variant == "highres" else "pixel_decoding"
    root = write_official(tmp_path / "official", variant, vae=vae, legacy_vae=vae)
    out = convert_detokenizer(root, tmp_path / "out", variant, tokenizer=str(tokenizer_dir), pool_heads=4)
    task, config = load_detokenizer(out)
    dec = task.detokenizer
    assert config["converted_from"]["unused_keys"]["query_embed"] == 1
    source = UNet2DConditionModel.from_pretrained(root / sub / "unet").eval()
    official = torch.load(root / "visual_tokenizer" / Path(config["converted_from"]["files"]["decoder"]).name)
    feats = torch.randn(2, 64, 128)
    names = ["unet_proj_1", "unet_proj_2"] if variant == "highres" else ["unet_proj"]
    tokens = torch.cat([F.linear(feats, official[f"{n}.weight"], official[f"{n}.bias"]) for n in names], -1)
    x, t = torch.randn(2, dec.cfg.sample_channels, dec.cfg.sample_side, dec.cfg.sample_side), torch.tensor([10, 900])
    added = None
    with torch.no_grad():
        cond = dec.condition(feats)
        if variant == "highres":
            pool = AttentionPool(64, 128, 4, 16)
            pool.load_state_dict({k.removeprefix("unet_attnpool."): v for k, v in official.items() if "attnpool" in k})
            added = {
                "text_embeds": pool(feats),
                "time_ids": torch.tensor([[SIDE, SIDE, 0, 0, SIDE, SIDE]] * 2, dtype=torch.float),
            }
            assert torch.allclose(cond.pooled_BP, added["text_embeds"], atol=1e-6)
        want = source(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        assert torch.allclose(cond.tokens_BNC, tokens, atol=1e-6)
        assert torch.allclose(dec.predict(x, t, cond), want, atol=1e-5)
        if vae:
            ref = AutoencoderKL.from_pretrained(root / sub / "vae").eval()
            assert torch.allclose(dec.vae.decode(x).sample, ref.decode(x).sample, atol=1e-5)
            negative = torch.load(root / sub / "uncond_embeddings.bin")[0]
            null = dec.null_condition(cond)
            assert torch.equal(null.tokens_BNC[:, :5], negative.expand(2, -1, -1)) and null.mask_BN[:, :5].all()
    flags = ["--highres", "--pool-heads", "4"] if variant == "highres" else []
    main(["convert", "lavit-detokenizer", str(root), str(tmp_path / "cli"), *flags])
    assert Path(tmp_path / "cli" / "model.safetensors").is_file()


def test_converter_errors_name_the_file_and_key(tmp_path: Path) -> None:
    root = write_official(tmp_path / "o")
    decoder_file = root / "visual_tokenizer" / "tokenizer_decoder.bin"
    good = torch.load(decoder_file)
    with pytest.raises(UserError, match="highres_pixel_decoding"):
        convert_detokenizer(root, tmp_path / "x", "highres")
    torch.save(good | {"bogus.weight": torch.zeros(1)}, decoder_file)
    with pytest.raises(UserError, match=r"tokenizer_decoder.bin: unexpected keys \[bogus.weight\]"):
        convert_detokenizer(root, tmp_path / "x")
    torch.save({k: v for k, v in good.items() if k != "unet_proj.bias"}, decoder_file)
    with pytest.raises(UserError, match=r"missing keys \[unet_proj.bias\]"):
        convert_detokenizer(root, tmp_path / "x")
    torch.save(good | {"unet_proj.bias": torch.zeros(65)}, decoder_file)
    with pytest.raises(UserError, match=r"unet_proj.bias: file \(65,\), model \(64,\)"):
        convert_detokenizer(root, tmp_path / "x")
    with pytest.raises(UserError, match="no such folder"):
        convert_detokenizer(tmp_path / "nowhere", tmp_path / "x")


def test_reconstruct_command(detok_dir: Path, tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "a.png"
    Image.new("RGB", (50, 40), (200, 20, 20)).save(png)
    out = tmp_path / "out"
    main(["reconstruct", str(png), str(png), "--checkpoint", str(detok_dir), "--out", str(out), "--steps", "2"])
    rows = json.loads((out / "tokens.json").read_text())
    assert [r["output"] for r in rows] == ["a.png", "a_1.png"] and rows[0]["tokens"] > 0
    assert Image.open(out / "a.png").size == (2 * SIDE + 4, SIDE)
    capsys.readouterr()
    for args, message in [
        ([str(tmp_path / "missing.png"), "--checkpoint", str(detok_dir)], "missing.png"),
        ([str(png), "--checkpoint", str(tmp_path / "nope")], "nope"),
        ([str(png), "--checkpoint", str(tokenizer_dir)], "expected 'lavit-detokenizer'"),
        ([str(detok_dir / "config.json"), "--checkpoint", str(detok_dir)], "config.json"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(["reconstruct", *args, "--out", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_token_ids_and_mismatched_checkpoints(detok_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    detok = Detokenizer.from_pretrained(detok_dir)
    for ids, message in [
        ([], "no token sequences"),
        ([torch.tensor([1]), torch.tensor([], dtype=torch.long)], "sequence 1: empty"),
        ([[1, 2], []], "sequence 1: empty"),
        ([torch.tensor([64])], r"token id 64 is outside the codebook \[0, 64\)"),
        ([torch.tensor([-1])], "token id -1"),
        ([torch.tensor([1.0])], "integer ids"),
        ([torch.zeros(65, dtype=torch.long)], "65 tokens, more than"),
    ]:
        with pytest.raises(ValueError, match=message):
            detok.decode(ids, steps=1)
    torch.manual_seed(5)
    other = tmp_path / "other_tok"
    save_task(LavitTokenizerTask(tokenizer_config()), "lavit-tokenizer", tokenizer_config(), other)
    with pytest.raises(UserError, match="trained with another tokenizer"):
        Detokenizer.from_pretrained(detok_dir, tokenizer=other)
    with pytest.raises(UserError, match="model.feature_dim: the detokenizer is built for 96, its tokenizer"):
        LavitDetokenizerTask(micro(feature_dim=96), DynamicTokenizer(tokenizer_config()))
    bad = tmp_path / "bad"
    cfg = micro(tokenizer=str(tokenizer_dir), proj_dims=[32], unet=micro_unet(cross_attention_dim=32))
    save_task(task_for(cfg), "lavit-detokenizer", micro(tokenizer=str(tokenizer_dir)), bad)
    with pytest.raises(UserError, match="unet_proj.*shape"):
        Detokenizer.from_pretrained(bad)


def test_eval_reconstruction(detok_dir: Path, shapes_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from vlpretrain.data.judge import save_judge
    from vlpretrain.eval.reconstruction import eval_reconstruction, pairs_grid, reconstruct_images, run

    images, records = read_records(str(shapes_data / "test"), limit=4)
    detok = Detokenizer.from_pretrained(detok_dir)
    judge = Judge(get_preset("judge", "tiny"))
    metrics = eval_reconstruction(detok, images, records, judge, steps=1, batch_size=3)
    recon, stats = reconstruct_images(detok, images, steps=1, batch_size=3)
    assert len(recon) == 4 and recon[0].shape == (SIDE, SIDE, 3) and recon[0].dtype == np.uint8
    assert stats["images"] == 4 and stats["tokens_mean"] > 0 and stats["empty_sequences"] == 0
    assert {"agree_count", "agree_colors", "agree_shapes", "agree_mean", "truth_mean", "judge_mean"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in metrics if k.startswith(("agree", "truth", "judge")))
    assert pairs_grid(images, recon, columns=2).size == (2 * (2 * SIDE + 4 + 8), 2 * (SIDE + 8))

    def perfect(ids, *_, **__):  # a decoder that returns the originals: the judge must agree with itself
        return torch.stack([torch.from_numpy(np.array(Image.fromarray(im).resize((SIDE, SIDE), Image.BICUBIC)))
                            .permute(2, 0, 1).float() / 255 for im in images[: len(ids)]])  # fmt: skip

    save_judge(judge, tmp_path / "judge")  # the whole evaluation from folders, as the quality run calls it
    metrics = run(detok_dir, shapes_data / "test", tmp_path / "judge", limit=2, steps=1, grid=tmp_path / "grid.png")
    assert metrics["images"] == 2 and "truth_mean" in metrics and (tmp_path / "grid.png").is_file()
    monkeypatch.setattr(detok, "decode", perfect)
    metrics = eval_reconstruction(detok, images, None, judge, batch_size=4)
    assert metrics["agree_mean"] == 1.0 and "truth_mean" not in metrics
