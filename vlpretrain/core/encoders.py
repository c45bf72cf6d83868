"""Frozen image encoders behind one small interface: pixels in [0, 1] -> patch features [B, N, D].

A :class:`FrozenEncoder` owns its preprocessing (resize to its input size, then its own mean/std normalisation), is
always in eval mode with ``requires_grad=False`` and runs without autograd, so a system can hold one inside a trained
model without ever training it by accident. Implementations:

- :class:`EvaEncoder`: our :class:`~vlpretrain.core.vit.VisionTransformer` (LaVIT's EVA-CLIP ViT-g/14, or a tiny
  one for the demo), CLIP mean/std;
- :class:`HFVisionEncoder`: a local HF ``CLIPVisionModel`` (CLIP mean/std, CLS dropped) or ``SiglipVisionModel``
  (0.5/0.5, no CLS) folder; features are the last encoder layer's output before ``post_layernorm``.

:func:`build_encoder` makes one from a typed :class:`EncoderSpec`.

Shape letters: B batch, C channels (3), H/W image height/width, S the encoder's input side, N patches, D width.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vlpretrain.configs import ConfigError, get_preset, list_presets
from vlpretrain.core.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize, to_tensor
from vlpretrain.core.vit import VisionTransformer, ViTConfig
from vlpretrain.errors import UserError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RANGE_SLACK = 1e-3  # pixels may overshoot [0, 1] by rounding, not by a wrong normalisation


class FrozenEncoder(nn.Module):
    """Base of the frozen encoders: ``encoder(pixels [B, 3, H, W] in [0, 1]) -> [B, N, D]``.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`encode` (and, where possible,
    :meth:`encode_layers`) on already normalised [B, 3, S, S] pixels, then call :meth:`freeze`.

    Attributes:
        image_size: S, the side images are resized to.
        num_patches: N, feature tokens per image.
        dim: D, feature size.
        mean, std: per-channel normalisation applied after resizing.
    """

    image_size: int
    num_patches: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def freeze(self) -> None:
        """eval mode and ``requires_grad=False`` on every parameter."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stays in eval mode whatever a parent module asks (``model.train()`` must not unfreeze it)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels_BCHW: Tensor) -> Tensor:
        """Patch features of images in [0, 1].

        Args:
            pixels_BCHW: float [B, 3, H, W] in [0, 1], any H and W (resized bicubic to S x S when they differ).

        Returns:
            [B, N, D] in the encoder's dtype, on its device.
        """
        return self.encode(self.prepare(pixels_BCHW))

    @torch.no_grad()
    def layer_features(self, pixels_BCHW: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """Outputs of the given blocks (0-based, -1 = last), CLS dropped: one [B, N, D] per index."""
        return self.encode_layers(self.prepare(pixels_BCHW), list(layers))

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """Pillow images of any size -> [B, 3, S, S] in [0, 1], resized with Pillow's bicubic (the official path;
        resizing tensors in :meth:`forward` is close to it but not bit-identical)."""
        if not images:
            raise ValueError("preprocess: no images")
        return torch.stack([to_tensor(resize(image, self.image_size)) for image in images])

    def prepare(self, pixels_BCHW: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised [B, 3, S, S] in the encoder's dtype and device."""
        if pixels_BCHW.ndim != 4 or pixels_BCHW.shape[1] != 3 or not pixels_BCHW.is_floating_point():
            raise ValueError(
                f"encoder: expected float pixels [B, 3, H, W], got {pixels_BCHW.dtype} {tuple(pixels_BCHW.shape)}"
            )
        low, high = torch.aminmax(pixels_BCHW)
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise ValueError(
                f"encoder: pixels must be in [0, 1] (the encoder normalises them itself), got [{low:.3f}, {high:.3f}]"
            )
        param = next(self.parameters())
        x_BCHW = pixels_BCHW.to(device=param.device, dtype=torch.float32)
        if x_BCHW.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x_BCHW = F.interpolate(x_BCHW, size=size, mode="bicubic", align_corners=False, antialias=True)
            x_BCHW = x_BCHW.clamp(0.0, 1.0)
        return normalize(x_BCHW, self.mean, self.std).to(param.dtype)  # [B, 3, S, S]

    def encode(self, x_BCSS: Tensor) -> Tensor:
        """Normalised [B, 3, S, S] -> [B, N, D]."""
        raise NotImplementedError

    def encode_layers(self, x_BCSS: Tensor, layers: list[int]) -> list[Tensor]:
        """Normalised [B, 3, S, S] -> one [B, N, D] per block index."""
        raise NotImplementedError(f"{type(self).__name__} does not expose intermediate layers")


class EvaEncoder(FrozenEncoder):
    """Our EVA-style :class:`VisionTransformer`, frozen, with CLIP normalisation (LaVIT's encoder).

    Args:
        model: the ViT (its weights are frozen in place).
    """

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model
        self.image_size = model.cfg.image_size
        self.num_patches = model.num_patches
        self.dim = model.dim
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        self.freeze()

    def encode(self, x_BCSS: Tensor) -> Tensor:
        return self.model.forward_features(x_BCSS)

    def encode_layers(self, x_BCSS: Tensor, layers: list[int]) -> list[Tensor]:
        return self.model.forward_features(x_BCSS, layers=layers)


class HFVisionEncoder(FrozenEncoder):
    """A local HF CLIP or SigLIP vision tower, frozen.

    Features are the last encoder layer's hidden states before ``post_layernorm`` (which is replaced by an identity,
    and SigLIP's pooling head is dropped, since neither is used); CLIP's CLS token is dropped, SigLIP has none.
    Normalisation comes from the folder's ``preprocessor_config.json`` when it has ``image_mean``/``image_std``,
    else CLIP's or SigLIP's defaults.

    Args:
        path: a folder with ``config.json`` of model type ``clip``/``clip_vision_model`` or
            ``siglip``/``siglip_vision_model`` and its weights; read with ``local_files_only=True``.
        image_size: input side S; None = the model's. Another size interpolates the position embeddings
            (HF's ``interpolate_pos_encoding``).
        dtype: parameter dtype.
    """

    def __init__(self, path: str | Path, image_size: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers import CLIPVisionModel, SiglipVisionModel

        path = Path(path)
        model_type = _hf_model_type(path)
        if model_type in ("clip", "clip_vision_model"):
            model_cls, self.has_cls, mean, std = CLIPVisionModel, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        elif model_type in ("siglip", "siglip_vision_model"):
            model_cls, self.has_cls, mean, std = SiglipVisionModel, False, SIGLIP_MEAN, SIGLIP_STD
        else:
            raise UserError(f"{path}/config.json: model_type {model_type!r} is not a CLIP or SigLIP vision model")
        self.model = _load_hf_strictly(model_cls, path, dtype)
        self.mean, self.std = _hf_norm_stats(path, mean, std)
        _drop_post_layernorm(self.model, path)
        config = self.model.config
        self.image_size = image_size or config.image_size
        if self.image_size % config.patch_size:
            raise UserError(f"{path}: image_size {self.image_size} is not a multiple of patch_size {config.patch_size}")
        self.interpolate = self.image_size != config.image_size
        self.num_patches = (self.image_size // config.patch_size) ** 2
        self.dim = config.hidden_size
        self.depth = config.num_hidden_layers
        self.freeze()

    def encode(self, x_BCSS: Tensor) -> Tensor:
        out = self.model(pixel_values=x_BCSS, interpolate_pos_encoding=self.interpolate)
        hidden_BTD = out.last_hidden_state  # post_layernorm is an identity, see __init__
        return hidden_BTD[:, 1:] if self.has_cls else hidden_BTD

    def encode_layers(self, x_BCSS: Tensor, layers: list[int]) -> list[Tensor]:
        for index in layers:
            if not -self.depth <= index < self.depth:
                raise ValueError(f"layer_features: layer {index} is out of range for depth {self.depth}")
        out = self.model(pixel_values=x_BCSS, interpolate_pos_encoding=self.interpolate, output_hidden_states=True)
        # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
        hidden = [out.hidden_states[index % self.depth + 1] for index in layers]
        return [h_BTD[:, 1:] if self.has_cls else h_BTD for h_BTD in hidden]


# The parts of a full CLIP/SigLIP checkpoint that a vision tower does not use.
_TEXT_SIDE = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def _load_hf_strictly(model_cls: type, path: Path, dtype: torch.dtype) -> nn.Module:
    """``from_pretrained`` that refuses missing or mismatched weights (HF would initialise them at random) and
    unexpected ones, except the text side of a full dual-encoder checkpoint."""
    model, info = model_cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, output_loading_info=True)
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(_TEXT_SIDE)]
    mismatched = [str(k) for k in info["mismatched_keys"]]
    for what, keys in (("missing", info["missing_keys"]), ("unexpected", unexpected), ("mismatched", mismatched)):
        if keys:
            shown = ", ".join(sorted(keys)[:8]) + (f", ... and {len(keys) - 8} more" if len(keys) > 8 else "")
            raise UserError(f"{path}: {what} weights for {model_cls.__name__}: {shown}")
    return model


def _hf_model_type(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: not an HF model folder (no config.json)")
    try:
        return str(json.loads(config_file.read_text()).get("model_type", ""))
    except (json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"{config_file}: not a JSON object: {err}") from err


def _hf_norm_stats(
    path: Path, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    processor_file = path / "preprocessor_config.json"
    if not processor_file.is_file():
        return mean, std
    data = json.loads(processor_file.read_text())
    file_mean, file_std = data.get("image_mean", mean), data.get("image_std", std)
    if len(file_mean) != 3 or len(file_std) != 3:
        raise UserError(f"{processor_file}: image_mean and image_std need 3 values each")
    return tuple(map(float, file_mean)), tuple(map(float, file_std))


def _drop_post_layernorm(model: nn.Module, path: Path) -> None:
    """Features are taken before ``post_layernorm``; SigLIP applies it to the whole last_hidden_state, so remove it
    (and SigLIP's attention-pooling head, which would read normalised states and is not used)."""
    tower = getattr(model, "vision_model", model)  # older transformers nest the modules one level down
    if not isinstance(getattr(tower, "post_layernorm", None), nn.LayerNorm):
        raise UserError(f"{path}: {type(model).__name__} has no post_layernorm (unsupported transformers layout)")
    tower.post_layernorm = nn.Identity()
    if getattr(tower, "use_head", False):
        tower.use_head = False
        del tower.head


@dataclass
class EncoderSpec:
    """Which frozen encoder to build.

    Args:
        kind: "eva" (our ViT, a ``vit`` preset) or "hf" (a local CLIP/SigLIP vision folder).
        preset: the ``vit`` preset for "eva" (``eva-g-14``, ``small``, ``tiny``); ignored for "hf".
        path: "eva": an official-layout checkpoint file ("" = random weights from ``seed``); "hf": the folder.
        image_size: input side; 0 = the preset's or the model's. For "eva" another size resamples the checkpoint's
            position grid (bicubic); for "hf" it turns on HF's ``interpolate_pos_encoding``.
        dtype: parameter dtype ("float32", "bfloat16" or "float16").
        seed: seed of the random weights when "eva" has no ``path`` (a random frozen encoder must be the same in
            every stage that uses it).
    """

    kind: Literal["eva", "hf"] = "eva"
    preset: str = "tiny"
    path: str = ""
    image_size: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("eva", "hf"):
            raise ConfigError(f"encoder.kind: {self.kind!r} is not one of 'eva', 'hf'")
        if self.kind == "eva" and f"vit/{self.preset}" not in list_presets("vit"):
            known = ", ".join(name.split("/", 1)[1] for name in list_presets("vit"))
            raise ConfigError(f"encoder.preset: unknown vit preset {self.preset!r} (known: {known})")
        if self.kind == "hf" and not self.path:
            raise ConfigError("encoder.path: kind 'hf' needs a local HF folder")
        if self.image_size < 0:
            raise ConfigError(f"encoder.image_size: must be >= 0 (0 = the model's), got {self.image_size}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"encoder.dtype: {self.dtype!r} is not one of {', '.join(_DTYPES)}")


def build_encoder(spec: EncoderSpec) -> FrozenEncoder:
    """A frozen encoder (on the CPU) from ``spec``; see :class:`EncoderSpec`."""
    dtype = _DTYPES[spec.dtype]
    if spec.kind == "hf":
        return HFVisionEncoder(spec.path, image_size=spec.image_size or None, dtype=dtype)
    cfg: ViTConfig = get_preset("vit", spec.preset)
    resized = bool(spec.image_size) and spec.image_size != cfg.image_size
    if resized:
        try:
            cfg = replace(cfg, image_size=spec.image_size)
        except ConfigError as err:
            raise ConfigError(f"encoder.image_size: {err}") from err
    if spec.path:
        return EvaEncoder(VisionTransformer.from_official(cfg, spec.path, interpolate_pos_embed=resized, dtype=dtype))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = VisionTransformer(cfg)
    return EvaEncoder(model.to(dtype))
