"""EVA-CLIP-style Vision Transformer: our own implementation whose parameter names are the official ones.

Architecture choices (those of EVA-CLIP ViT-g/14, the frozen encoder of LaVIT):
- patch embedding by a strided Conv2d, a CLS token and learned absolute positions ``pos_embed`` [1, 1+N, D];
- pre-norm blocks: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; LayerNorm eps 1e-6, computed in fp32;
- attention: one bias-free ``qkv`` Linear plus separate ``q_bias`` and ``v_bias`` (k has NO bias: the qkv bias is
  ``cat(q_bias, 0, v_bias)``), run through ``F.scaled_dot_product_attention``;
- MLP: ``fc1 -> exact (erf) GELU -> fc2`` with hidden size ``int(width * mlp_ratio)`` (EVA-g: int(1408 * 4.3637) =
  6144); no layer scale, no drop path, no dropout, no relative position bias, no RoPE;
- features for LaVIT = the LAST block's output BEFORE the final ``norm``, CLS dropped: [B, N, D]. ``norm`` and
  ``head`` exist only so that official files load strictly, key for key.

``state_dict()`` keys are exactly those of ``eva_vitg_psz14.bin`` (see :func:`official_key_names`), so loading an
official file is an identity key map checked name by name and shape by shape (:meth:`VisionTransformer.load_official`).

Shape letters: B batch, C channels (3), H/W image height/width, G grid side (image_size // patch_size),
N = G*G patches, T = 1 + N tokens (CLS first), D width, K heads, E head dim (D // K), F MLP hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlpretrain.configs import ConfigError, register_preset
from vlpretrain.core.key_rules import listed
from vlpretrain.errors import UserError

QKVBias = Literal["qv", "qkv", "none"]


@dataclass
class ViTConfig:
    """Size and variant of a :class:`VisionTransformer`.

    Args:
        image_size: input side in pixels (square images).
        patch_size: patch side in pixels; must divide ``image_size``.
        width: token dimension D.
        depth: number of blocks.
        heads: attention heads; must divide ``width``.
        mlp_ratio: MLP hidden size = ``int(width * mlp_ratio)`` (truncated, as in EVA).
        qkv_bias: "qv" (EVA: ``q_bias`` and ``v_bias``, no k bias), "qkv" (a plain ``qkv.bias``) or "none".
        ln_eps: LayerNorm epsilon.
        head_out: output size of the ``head`` Linear (EVA-CLIP g: 1024); 0 = no head (no ``head.*`` keys).
    """

    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: QKVBias = "qv"
    ln_eps: float = 1e-6
    head_out: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vit.{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vit.patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        if self.width % self.heads:
            raise ConfigError(f"vit.heads: {self.heads} does not divide width {self.width}")
        if self.mlp_ratio <= 0 or self.mlp_hidden < 1:
            raise ConfigError(f"vit.mlp_ratio: {self.mlp_ratio} gives an empty MLP for width {self.width}")
        if self.qkv_bias not in ("qv", "qkv", "none"):
            raise ConfigError(f"vit.qkv_bias: {self.qkv_bias!r} is not one of 'qv', 'qkv', 'none'")
        if not self.ln_eps > 0:
            raise ConfigError(f"vit.ln_eps: must be > 0, got {self.ln_eps}")
        if self.head_out < 0:
            raise ConfigError(f"vit.head_out: must be >= 0 (0 = no head), got {self.head_out}")

    @property
    def grid_size(self) -> int:
        """G, patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N = G * G."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        """E = D // K."""
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        """F = int(D * mlp_ratio)."""
        return int(self.width * self.mlp_ratio)


@register_preset("vit", "eva-g-14")
def vit_eva_g_14() -> ViTConfig:
    """EVA-CLIP ViT-g/14, LaVIT's frozen encoder (about 1.0B parameters; N = 256, D = 1408)."""
    return ViTConfig(
        image_size=224, patch_size=14, width=1408, depth=40, heads=16, mlp_ratio=4.3637, qkv_bias="qv", head_out=1024
    )


@register_preset("vit", "tiny")
def vit_tiny() -> ViTConfig:
    """The demo's encoder on 64 px shapes-world images (N = 64, D = 128; about 0.8M parameters)."""
    return ViTConfig()


@register_preset("vit", "small")
def vit_small() -> ViTConfig:
    """ViT-S/16-like, 6 blocks (224 px, N = 196, D = 384; about 11M parameters)."""
    return ViTConfig(image_size=224, patch_size=16, width=384, depth=6, heads=6)


def official_key_names(cfg: ViTConfig) -> list[str]:
    """The state-dict key names of an EVA-CLIP ViT file with this config, in module order."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(cfg.depth):
        attn = [f"blocks.{i}.attn.qkv.weight"]
        if cfg.qkv_bias == "qkv":
            attn.append(f"blocks.{i}.attn.qkv.bias")
        elif cfg.qkv_bias == "qv":
            attn = [f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias", *attn]
        keys += [f"blocks.{i}.norm1.weight", f"blocks.{i}.norm1.bias", *attn]
        keys += [f"blocks.{i}.attn.proj.{p}" for p in ("weight", "bias")]
        keys += [f"blocks.{i}.norm2.{p}" for p in ("weight", "bias")]
        keys += [f"blocks.{i}.mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")]
    keys += ["norm.weight", "norm.bias"]
    if cfg.head_out:
        keys += ["head.weight", "head.bias"]
    return keys


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as EVA's), returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: [B, 3, H, W] -> [B, N, D] (row-major over the grid)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels_BCHW: Tensor) -> Tensor:
        return rearrange(self.proj(pixels_BCHW), "b d gh gw -> b (gh gw) d")  # [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention with EVA's q/v-only bias."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias == "qkv")
        if cfg.qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(cfg.width))
            self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def qkv_bias(self) -> Tensor | None:
        """The [3D] bias of the fused projection: ``cat(q_bias, zeros, v_bias)`` for EVA (k has no bias)."""
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def forward(self, x_BTD: Tensor) -> Tensor:
        qkv_BT3D = F.linear(x_BTD, self.qkv.weight, self.qkv_bias())
        q_BKTE, k_BKTE, v_BKTE = rearrange(qkv_BT3D, "b t (three k e) -> three b k t e", three=3, k=self.heads)
        out_BKTE = F.scaled_dot_product_attention(q_BKTE, k_BKTE, v_BKTE)  # scale 1/sqrt(E), no mask
        return self.proj(rearrange(out_BKTE, "b k t e -> b t (k e)"))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_BTD)))  # [B, T, F] inside


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        return x_BTD + self.mlp(self.norm2(x_BTD))


class VisionTransformer(nn.Module):
    """EVA-CLIP-style ViT; ``forward`` = :meth:`forward_features` (LaVIT's patch features).

    Args:
        cfg: sizes and variant.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))  # [1, 1, D]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))  # [1, T, D]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(cfg.width, eps=cfg.ln_eps)  # unused for features; kept for strict loading
        self.head = nn.Linear(cfg.width, cfg.head_out) if cfg.head_out else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """EVA's init: trunc-normal(0.02) weights and tokens, zero biases, LayerNorm (1, 0); the residual outputs
        (``attn.proj``, ``mlp.fc2``) of block i (1-based) divided by sqrt(2i); the head scaled by 1e-3."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention) and module.q_bias is not None:
                nn.init.zeros_(module.q_bias)
                nn.init.zeros_(module.v_bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(1e-3)

    @property
    def num_patches(self) -> int:
        """N, feature tokens per image."""
        return self.cfg.num_patches

    @property
    def dim(self) -> int:
        """D, feature size."""
        return self.cfg.width

    def embed(self, pixels_BCHW: Tensor) -> Tensor:
        """Normalised pixels [B, 3, H, W] (H = W = image_size) -> block input tokens [B, T, D], CLS first."""
        size = self.cfg.image_size
        if pixels_BCHW.ndim != 4 or tuple(pixels_BCHW.shape[1:]) != (3, size, size):
            raise ValueError(
                f"VisionTransformer: expected pixels [B, 3, {size}, {size}], got {tuple(pixels_BCHW.shape)}"
            )
        x_BND = self.patch_embed(pixels_BCHW)
        cls_B1D = self.cls_token.expand(x_BND.shape[0], -1, -1)
        return torch.cat((cls_B1D, x_BND), dim=1) + self.pos_embed  # [B, T, D]

    @overload
    def forward_features(self, pixels_BCHW: Tensor, layers: None = None) -> Tensor: ...

    @overload
    def forward_features(self, pixels_BCHW: Tensor, layers: list[int] | tuple[int, ...]) -> list[Tensor]: ...

    def forward_features(
        self, pixels_BCHW: Tensor, layers: list[int] | tuple[int, ...] | None = None
    ) -> Tensor | list[Tensor]:
        """Patch features, CLS dropped, before the final norm.

        Args:
            pixels_BCHW: normalised pixels [B, 3, H, W] with H = W = ``cfg.image_size``.
            layers: block indices (0-based, negative from the end: -1 is the last block) whose outputs to return;
                None returns the last block's output only. Blocks after the deepest one asked for are not run.

        Returns:
            [B, N, D], or with ``layers`` a list of [B, N, D], one per index in the order given.
        """
        x_BTD = self.embed(pixels_BCHW)
        if layers is None:
            for block in self.blocks:
                x_BTD = block(x_BTD)
            return x_BTD[:, 1:]
        wanted = [self._block_index(i) for i in layers]
        if not wanted:
            raise ValueError("forward_features: layers is empty")
        outputs: dict[int, Tensor] = {}
        for index, block in enumerate(self.blocks[: max(wanted) + 1]):
            x_BTD = block(x_BTD)
            if index in wanted:
                outputs[index] = x_BTD[:, 1:]
        return [outputs[i] for i in wanted]

    def forward(self, pixels_BCHW: Tensor) -> Tensor:
        """Same as :meth:`forward_features` without ``layers``: [B, 3, H, W] -> [B, N, D]."""
        return self.forward_features(pixels_BCHW)

    def _block_index(self, index: int) -> int:
        depth = self.cfg.depth
        if not -depth <= index < depth:
            raise ValueError(f"forward_features: layer {index} is out of range for depth {depth}")
        return index % depth

    def load_official(self, path: str | Path, interpolate_pos_embed: bool = False) -> VisionTransformer:
        """Load an EVA-CLIP-layout state dict (e.g. LaVIT's ``eva_vitg_psz14.bin``) key for key.

        Args:
            path: a ``.bin``/``.pt``/``.pth`` file (read with ``torch.load(weights_only=True)``) or ``.safetensors``,
                holding a flat ``{name: tensor}`` mapping with the official names.
            interpolate_pos_embed: when the file's position grid differs from ``cfg``'s, resample it (bicubic over
                the grid, CLS position kept). Without it such a file is refused.

        Returns:
            self, with every parameter overwritten (cast to this model's dtype).

        Raises:
            UserError: unreadable file, missing or unexpected keys (named), or a shape mismatch (key and both shapes).
        """
        self.load_state_dict(self._checked_official_state(Path(path), interpolate_pos_embed), strict=True)
        return self

    @classmethod
    def from_official(
        cls,
        cfg: ViTConfig,
        path: str | Path,
        interpolate_pos_embed: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> VisionTransformer:
        """A model built straight from an official file, skipping the random init (built on the meta device, then
        the file's tensors are assigned): for EVA-g that saves the time and memory of 1B random weights.

        Args:
            cfg: the config the file must match.
            path, interpolate_pos_embed: as in :meth:`load_official` (same checks, same errors).
            dtype: parameter dtype (the file's tensors are cast to it).
        """
        with torch.device("meta"):
            model = cls(cfg)
        state = model._checked_official_state(Path(path), interpolate_pos_embed)
        state = {key: value.to(dtype) for key, value in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def _checked_official_state(self, path: Path, interpolate_pos_embed: bool) -> dict[str, Tensor]:
        """The file's tensors under this model's key names, every name and shape checked."""
        state = read_state_dict(path)
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            parts = [f"missing keys {listed(missing, brackets=True)}"] if missing else []
            parts += [f"unexpected keys {listed(unexpected, brackets=True)}"] if unexpected else []
            raise UserError(f"{path}: not an EVA ViT state dict for this config: {'; '.join(parts)}")
        mapped = {key: state[key] for key in expected}  # our names are the official names: an identity map
        pos = mapped["pos_embed"]
        resamplable = pos.ndim == 3 and pos.shape[-1] == self.cfg.width and _is_square(pos.shape[1] - 1)
        if interpolate_pos_embed and resamplable and pos.shape != expected["pos_embed"].shape:
            mapped["pos_embed"] = resample_pos_embed(pos, self.cfg.grid_size)
        for key, value in mapped.items():
            if value.shape != expected[key].shape:
                hint = " (pass interpolate_pos_embed=True to resample the grid)" if key == "pos_embed" else ""
                raise UserError(
                    f"{path}: shape mismatch for {key}: file {tuple(value.shape)}, model "
                    f"{tuple(expected[key].shape)}{hint}"
                )
        return mapped


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` mapping from a ``.safetensors`` or ``.bin``/``.pt``/``.pth`` file."""
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".bin", ".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, .pt or .pth)")
    except UserError:
        raise
    except Exception as err:  # torch/safetensors raise many types for a bad file
        raise UserError(f"{path}: cannot read checkpoint: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat mapping of names to tensors (a bare state dict)")
    return state


def resample_pos_embed(pos_embed_1TD: Tensor, grid_size: int) -> Tensor:
    """Resample learned absolute positions to another square grid (bicubic over the grid, CLS position kept).

    Args:
        pos_embed_1TD: [1, 1 + G*G, D] with the CLS position first.
        grid_size: the new G'.

    Returns:
        [1, 1 + G'*G', D] in the input dtype; the input itself when G' = G.
    """
    num_patches = pos_embed_1TD.shape[1] - 1
    if pos_embed_1TD.ndim != 3 or pos_embed_1TD.shape[0] != 1 or not _is_square(num_patches):
        raise ValueError(f"resample_pos_embed: expected [1, 1 + G*G, D], got {tuple(pos_embed_1TD.shape)}")
    old_grid = math.isqrt(num_patches)
    if old_grid == grid_size:
        return pos_embed_1TD
    cls_11D, grid_1ND = pos_embed_1TD[:, :1], pos_embed_1TD[:, 1:]
    grid_1DGG = rearrange(grid_1ND.float(), "1 (gh gw) d -> 1 d gh gw", gh=old_grid)
    grid_1DGG = F.interpolate(grid_1DGG, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    grid_1ND = rearrange(grid_1DGG, "1 d gh gw -> 1 (gh gw) d").to(pos_embed_1TD.dtype)
    return torch.cat((cls_11D, grid_1ND), dim=1)


def _is_square(n: int) -> bool:
    return n >= 1 and math.isqrt(n) ** 2 == n
