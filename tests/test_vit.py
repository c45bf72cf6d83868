"""Our EVA-style ViT (official key names, loading, attention, features) and the frozen-encoder adapters."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlpretrain.configs import ConfigError, get_preset, list_presets
from vlpretrain.core.encoders import EncoderSpec, EvaEncoder, HFVisionEncoder, build_encoder
from vlpretrain.core.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
from vlpretrain.core.vit import VisionTransformer, ViTConfig, official_key_names, resample_pos_embed
from vlpretrain.errors import UserError

# 32 px, patch 8 -> N = 16; odd-sized MLP ratio as in EVA; a head as in the official file.
MICRO = ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_ratio=4.3637, head_out=24)


def expected_official_keys(depth: int, with_head: bool) -> set[str]:
    """EVA-CLIP ViT names written out from the naming rule (independently of the model code)."""
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias"}
    for i in range(depth):
        block = f"blocks.{i}."
        keys |= {block + n for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
        keys |= {block + n for n in ("attn.qkv.weight", "attn.q_bias", "attn.v_bias")}
        keys |= {block + n for n in ("attn.proj.weight", "attn.proj.bias")}
        keys |= {block + f"mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    if with_head:
        keys |= {"head.weight", "head.bias"}
    return keys


def random_state(cfg: ViTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the official layout with non-trivial values everywhere (biases and LayerNorms included)."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_presets_and_shapes() -> None:
    assert {"vit/eva-g-14", "vit/tiny", "vit/small"} <= set(list_presets("vit"))
    eva = get_preset("vit", "eva-g-14")
    sizes = (eva.num_patches, eva.width, eva.depth, eva.heads, eva.head_dim, eva.mlp_hidden, eva.head_out)
    assert sizes == (256, 1408, 40, 16, 88, 6144, 1024)
    tiny = get_preset("vit", "tiny")
    assert (tiny.image_size, tiny.num_patches, tiny.width) == (64, 64, 128)
    model = VisionTransformer(tiny)
    features = model.forward_features(pixels(3, 64))
    assert features.shape == (3, 64, 128) and torch.isfinite(features).all()
    assert model(pixels(1, 64)).shape == (1, 64, 128)
    with pytest.raises(ValueError, match="expected pixels"):
        model(pixels(1, 32))


@pytest.mark.parametrize(
    ("field", "value"),
    [("patch_size", 7), ("heads", 5), ("depth", 0), ("qkv_bias", "k"), ("ln_eps", 0.0), ("head_out", -1)],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"vit.{field}"):
        replace(ViTConfig(), **{field: value})


def test_key_names_are_the_official_ones() -> None:
    model = VisionTransformer(MICRO)
    names = list(model.state_dict())
    assert set(names) == expected_official_keys(MICRO.depth, with_head=True)
    assert names == official_key_names(MICRO)
    assert not any(n.endswith("attn.qkv.bias") or "k_bias" in n for n in names)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, n = MICRO.width, MICRO.num_patches
    assert shapes["cls_token"] == (1, 1, d) and shapes["pos_embed"] == (1, n + 1, d)
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * d, d) and shapes["blocks.0.attn.q_bias"] == (d,)
    assert shapes["blocks.1.mlp.fc1.weight"] == (int(d * 4.3637), d) and shapes["head.weight"] == (24, d)
    headless = VisionTransformer(replace(MICRO, head_out=0))
    assert set(headless.state_dict()) == expected_official_keys(MICRO.depth, with_head=False)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_official_layout_round_trips_bit_exactly(tmp_path: Path, suffix: str) -> None:
    state = random_state(MICRO)
    path = tmp_path / f"eva{suffix}"
    torch.save(state, path) if suffix == ".bin" else save_file(state, str(path))
    model = VisionTransformer(MICRO).load_official(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    reference = VisionTransformer(MICRO)
    reference.load_state_dict(state)
    x = normalize(pixels())
    assert torch.equal(model.forward_features(x), reference.forward_features(x))
    direct = VisionTransformer.from_official(MICRO, path)  # no random init: meta device, then assigned
    assert all(torch.equal(v, state[k]) for k, v in direct.state_dict().items())
    assert torch.equal(direct.forward_features(x), reference.forward_features(x))
    half = VisionTransformer.from_official(MICRO, path, dtype=torch.bfloat16)
    assert half.pos_embed.dtype == torch.bfloat16 and half.forward_features(x.bfloat16()).dtype == torch.bfloat16


def _refused(tmp_path: Path, state: dict[str, torch.Tensor], cfg: ViTConfig = MICRO, **kwargs: bool) -> str:
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        VisionTransformer(cfg).load_official(path, **kwargs)
    return str(info.value)


def test_bad_files_are_refused_with_the_key_named(tmp_path: Path) -> None:
    state = random_state(MICRO)
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.v_bias"}
    assert "missing keys [blocks.1.attn.v_bias]" in _refused(tmp_path, missing)
    k_bias = state | {"blocks.0.attn.k_bias": torch.zeros(MICRO.width)}
    assert "unexpected keys [blocks.0.attn.k_bias]" in _refused(tmp_path, k_bias)
    qkv_bias = state | {"blocks.0.attn.qkv.bias": torch.zeros(3 * MICRO.width)}
    assert "blocks.0.attn.qkv.bias" in _refused(tmp_path, qkv_bias)
    wrong = state | {"blocks.0.mlp.fc1.weight": torch.zeros(128, MICRO.width)}
    message = _refused(tmp_path, wrong)
    assert "blocks.0.mlp.fc1.weight" in message and "(128, 32)" in message and "(139, 32)" in message
    with pytest.raises(UserError, match="blocks.0.mlp.fc1.weight"):
        VisionTransformer.from_official(MICRO, tmp_path / "bad.bin")
    no_head = {k: v for k, v in state.items() if not k.startswith("head.")}
    assert "head.weight" in _refused(tmp_path, no_head)  # a headless file needs head_out=0
    VisionTransformer(replace(MICRO, head_out=0)).load_official(tmp_path / "bad.bin")
    assert "flat mapping" in _refused(tmp_path, {"model": state})  # wrapped state dicts are not unwrapped silently
    (tmp_path / "eva.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        VisionTransformer(MICRO).load_official(tmp_path / "eva.bin")
    (tmp_path / "eva.txt").write_text("x")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        VisionTransformer(MICRO).load_official(tmp_path / "eva.txt")


def test_attention_matches_a_naive_reference() -> None:
    state = random_state(MICRO, seed=1)
    model = VisionTransformer(MICRO)
    model.load_state_dict(state)
    attn = model.blocks[0].attn
    x_BTD = torch.randn(2, 17, MICRO.width)
    w = attn.qkv.weight
    d, heads = MICRO.width, MICRO.heads
    q = x_BTD @ w[:d].T + attn.q_bias
    k = x_BTD @ w[d : 2 * d].T  # no k bias
    v = x_BTD @ w[2 * d :].T + attn.v_bias
    split = lambda t: t.view(2, 17, heads, d // heads).transpose(1, 2)  # noqa: E731  [B, K, T, E]
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(2, 17, d)
    expected = out @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x_BTD), expected, atol=1e-5, rtol=1e-5)


def test_features_come_before_the_final_norm_and_layers_match() -> None:
    model = VisionTransformer(MICRO)
    model.load_state_dict(random_state(MICRO))
    x = normalize(pixels())
    with torch.no_grad():
        before = model.forward_features(x)
        model.norm.weight.mul_(3.0).add_(1.0)
        model.norm.bias.add_(1.0)
        assert torch.equal(model.forward_features(x), before)
        first, last, again = model.forward_features(x, layers=[0, -1, 1])
    assert torch.equal(last, before) and torch.equal(again, before)
    assert first.shape == before.shape and not torch.allclose(first, before)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_features(x, layers=[2])


def test_pos_embed_resampling(tmp_path: Path) -> None:
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos, 4) is pos  # identity when the grid matches
    bigger = resample_pos_embed(pos, 6)
    assert bigger.shape == (1, 37, 8) and torch.equal(bigger[:, :1], pos[:, :1])
    path = tmp_path / "eva.safetensors"
    save_file(random_state(MICRO), str(path))
    wide = replace(MICRO, image_size=48)  # grid 6 instead of 4
    with pytest.raises(UserError, match=r"pos_embed.*\(1, 17, 32\).*\(1, 37, 32\)"):
        VisionTransformer(wide).load_official(path)
    model = VisionTransformer(wide).load_official(path, interpolate_pos_embed=True)
    assert model.pos_embed.shape == (1, 37, 32)
    assert model.forward_features(normalize(pixels(1, 48))).shape == (1, 36, 32)


def test_eva_encoder_normalises_resizes_and_stays_frozen(tmp_path: Path) -> None:
    path = tmp_path / "eva.bin"
    torch.save(random_state(MICRO), path)
    model = VisionTransformer(MICRO).load_official(path)
    encoder = EvaEncoder(model)
    assert (encoder.image_size, encoder.num_patches, encoder.dim) == (32, 16, 32)
    x = pixels()
    features = encoder(x)
    assert features.shape == (2, 16, 32) and not features.requires_grad
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(features, model.forward_features((x - mean) / std))
    parent = torch.nn.Sequential(encoder).train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert parent[0](pixels(1, 50)).shape == (1, 16, 32)  # any size: resized to 32
    images = [Image.new("RGB", (70, 40), (200, 30, 10)), Image.new("L", (20, 20), 128)]
    assert encoder.preprocess(images).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        encoder(normalize(x))
    layers = encoder.layer_features(x, [0, -1])
    assert len(layers) == 2 and torch.equal(layers[1], features)


def test_build_encoder_from_spec(tmp_path: Path) -> None:
    a, b = build_encoder(EncoderSpec()), build_encoder(EncoderSpec())
    assert isinstance(a, EvaEncoder) and (a.num_patches, a.dim) == (64, 128)
    x = pixels(1, 64)
    assert torch.equal(a(x), b(x))  # a random frozen encoder is the same in every stage (seeded)
    path = tmp_path / "tiny.bin"
    torch.save(a.model.state_dict(), path)
    wide = build_encoder(EncoderSpec(preset="tiny", path=str(path), image_size=96))
    assert wide.num_patches == 144 and wide(x).shape == (1, 144, 128)
    with pytest.raises(ConfigError, match="encoder.preset"):
        EncoderSpec(preset="nope")
    with pytest.raises(ConfigError, match="encoder.path"):
        EncoderSpec(kind="hf")


def _hf_models(tmp_path: Path) -> dict[str, tuple[Path, torch.nn.Module]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    models = {
        "clip": CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **sizes)),
        "siglip": SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **sizes)),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        out[name] = (tmp_path / name, model.eval())
    return out


def test_hf_vision_encoders_match_the_hf_models(tmp_path: Path) -> None:
    x = pixels(2, 32)
    for name, (path, reference) in _hf_models(tmp_path).items():
        encoder = build_encoder(EncoderSpec(kind="hf", path=str(path)))
        assert isinstance(encoder, HFVisionEncoder)
        mean, std = ((0.5,) * 3, (0.5,) * 3) if name == "siglip" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        with torch.no_grad():
            out = reference(pixel_values=normalize(x, mean, std), output_hidden_states=True)
        hidden = out.hidden_states[-1]  # the last layer's output, before post_layernorm
        expected = hidden[:, 1:] if name == "clip" else hidden
        features = encoder(x)
        assert features.shape == (2, 16, 32) and (encoder.num_patches, encoder.dim) == (16, 32)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
        if name == "clip":
            torch.testing.assert_close(features, out.last_hidden_state[:, 1:], atol=1e-5, rtol=1e-5)
        first = encoder.layer_features(x, [0])[0]
        torch.testing.assert_close(first, out.hidden_states[1][:, 1:] if name == "clip" else out.hidden_states[1])
        assert not any(p.requires_grad for p in encoder.parameters())
        wide = HFVisionEncoder(path, image_size=48)
        assert wide.num_patches == 36 and wide(x).shape == (2, 36, 32)
    clip_path = tmp_path / "clip"
    weights = load_file(str(clip_path / "model.safetensors"))
    name = next(k for k in weights if k.endswith("encoder.layers.1.mlp.fc2.weight"))
    save_file({k: v for k, v in weights.items() if k != name}, str(clip_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing weights .*layers\.1\.mlp\.fc2\.weight"):
        HFVisionEncoder(clip_path)  # HF alone would fill the hole with random weights
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="not a CLIP or SigLIP"):
        HFVisionEncoder(tmp_path / "llama")
    with pytest.raises(UserError, match="no config.json"):
        HFVisionEncoder(tmp_path / "missing")
