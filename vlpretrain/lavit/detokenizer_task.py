"""Training stage ``lavit-detokenizer``: the diffusion decoder learns to redraw an image from its visual tokens.

Each batch: images -> frozen tokenizer (code ids, then the feature decoder's reconstruction [B, N, D], fp32, no
gradient) -> condition head + UNet trained with the noise-prediction loss (:class:`DiffusionDecoder`).

The tokenizer is held OUTSIDE the module tree: it is not trained, not saved in this stage's checkpoints (they hold
``detokenizer.*`` and ``tokenizer_digest`` only, like the official layout keeps ``pixel_decoding/`` apart from
``visual_tokenizer/``), and not wrapped by DDP/FSDP; it follows the batch to its device. The checkpoint records the
tokenizer's folder in its config and a SHA-256 digest of its weights, so a detokenizer is never paired silently with
another tokenizer. ``unet_proj`` (the projection to the UNet's width) belongs to this stage: the official file keeps
it in ``tokenizer_decoder.bin``, but it is trained with the diffusion decoder, so the tokenizer stage freezes its own
copy and this stage owns ``detokenizer.condition.unet_proj``.

Presets: ``tiny`` (64 px pixel-space diffusion for the demo's tokenizer, pixels folded 2 x 2 into channels, with
the spatial condition), ``tiny-highres`` (the same with the
SDXL-style pooled and size conditioning), ``paper`` (the official ``pixel_decoding``: a Stable-Diffusion-1.5-sized
latent UNet at 512 px, ``unet_proj`` 1408 -> 768). :func:`paper_highres` gives the ``highres_pixel_decoding`` sizes
(SDXL, 1024 px); it is not registered because the registry test builds every non-``paper`` preset on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlpretrain.configs import register_preset, to_dict
from vlpretrain.data.shards import collate_pairs, decode_pair
from vlpretrain.errors import UserError
from vlpretrain.lavit.detokenizer import DetokenizerConfig, DiffusionDecoder
from vlpretrain.lavit.tokenizer import DynamicTokenizer
from vlpretrain.lavit.tokenizer_task import load_frozen_tokenizer
from vlpretrain.train.pretrained import load_weights, resolve_checkpoint
from vlpretrain.train.task import model_config_from_dict

TASK = "lavit-detokenizer"
DIGEST_BYTES = 32
# Tokenizer state that does not decide its tokens or features: the frozen encoder (its own file) and unet_proj.
_NOT_DIGESTED = ("encoder.", "decoder.unet_proj.")


TINY_SPATIAL = 8  # channels of the tiny presets' spatial condition


def _tiny_unet(cross_dim: int, fold: int = 2) -> dict[str, Any]:
    """A 4.9M-parameter UNet on ``fold`` x ``fold``-folded 64 px images plus the 8-channel spatial condition. Fold 2:
    12 x 32 x 32, levels 32/16/8, cross-attention only at 8 (about 4x fewer FLOPs than a 64 px UNet); fold 4:
    48 x 16 x 16, levels 16/8/4 (about 2.7x faster again per training step on a CPU)."""
    channels = 3 * fold * fold
    return {
        "sample_size": 64 // fold, "in_channels": channels + TINY_SPATIAL, "out_channels": channels,
        "layers_per_block": 1,
        "block_out_channels": [64, 96, 128],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8, "cross_attention_dim": cross_dim,
    }  # fmt: skip


# Pixel space in [-1, 1]: a cosine schedule, clipped x0 and "trailing" timesteps (a few DDIM steps start from noise).
# The UNet predicts the clean sample (x0): after a few hundred CPU steps an x0-predicting decoder draws the objects
# where they belong (blurred), while the same UNet predicting noise still sampled pure noise (docs/detokenizer.md).
_TINY_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
    "clip_sample": True, "set_alpha_to_one": True, "timestep_spacing": "trailing",
}  # fmt: skip

# Stable Diffusion's published noise schedule and VAE (the official decoders are trained on top of them).
_SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}  # fmt: skip


def _sd_vae(sample_size: int, scaling_factor: float) -> dict[str, Any]:
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": sample_size, "scaling_factor": scaling_factor,
    }  # fmt: skip


@register_preset(TASK, "tiny")
def detokenizer_tiny() -> DetokenizerConfig:
    """The demo's decoder. No guidance by default (``guidance_scale`` 1): on tokens that carry the objects' colours
    guidance 3 cost judge agreement (0.60 -> 0.52 after 400 steps, 0.80 -> 0.30 after 1200; docs/detokenizer.md)."""
    return DetokenizerConfig(token_positions=True, spatial_channels=TINY_SPATIAL, space_to_depth=2,
                             unet=_tiny_unet(64), scheduler=dict(_TINY_SCHEDULER), guidance_scale=1.0)  # fmt: skip


@register_preset(TASK, "tiny-fold4")
def detokenizer_tiny_fold4() -> DetokenizerConfig:
    """The demo's decoder: ``tiny`` on 4 x 4-folded pixels (48 x 16 x 16). A training step costs about 1/2.7 of
    ``tiny``'s: judge agreement 0.62 / 0.72 / 0.75 after 600 / 1200 / 1600 steps, against ``tiny``'s 0.61 / 0.78
    after 600 / 1200, so at equal training time it is ahead (docs/detokenizer.md, "Folding 4 x 4")."""
    return dataclasses.replace(detokenizer_tiny(), space_to_depth=4, unet=_tiny_unet(64, fold=4))


@register_preset(TASK, "tiny-highres")
def detokenizer_tiny_highres() -> DetokenizerConfig:
    unet = _tiny_unet(64) | {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                             "projection_class_embeddings_input_dim": 64 + 6 * 8}  # fmt: skip
    return DetokenizerConfig(
        proj_dims=[32, 32],
        pooled_dim=64,
        pool_heads=4,
        token_positions=True,
        spatial_channels=TINY_SPATIAL,
        space_to_depth=2,
        unet=unet,
        scheduler=dict(_TINY_SCHEDULER),
    )


@register_preset(TASK, "paper")
def detokenizer_paper() -> DetokenizerConfig:
    """The official ``pixel_decoding`` sizes (a Stable Diffusion 1.5 UNet conditioned on 256 x 768 tokens)."""
    unet = {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "attention_head_dim": 8, "cross_attention_dim": 768,
    }  # fmt: skip
    return DetokenizerConfig(tokenizer_preset="paper", feature_dim=1408, num_patches=256, image_size=512,
                             proj_dims=[768], latent=True, unet=unet, vae=_sd_vae(512, 0.18215),
                             scheduler=dict(_SD_SCHEDULER), guidance_scale=5.0, sample_steps=50)  # fmt: skip


def paper_highres() -> DetokenizerConfig:
    """The official ``highres_pixel_decoding`` sizes: an SDXL UNet (1024 px) conditioned on 256 x (768 + 1280)
    tokens, a 1280-d pooled vector (16-head attention pool) and the image size."""
    unet = {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "cross_attention_dim": 2048,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }  # fmt: skip
    return DetokenizerConfig(tokenizer_preset="paper", feature_dim=1408, num_patches=256, image_size=1024,
                             proj_dims=[768, 1280], pooled_dim=1280, pool_heads=16, latent=True, unet=unet,
                             vae=_sd_vae(1024, 0.13025), scheduler=dict(_SD_SCHEDULER), guidance_scale=5.0,
                             sample_steps=50)  # fmt: skip


def tokenizer_digest(tokenizer: DynamicTokenizer) -> Tensor:
    """SHA-256 of the tokenizer weights that decide its tokens and features (uint8 [32])."""
    sha = hashlib.sha256()
    for key, value in sorted(tokenizer.state_dict().items()):
        if key.startswith(_NOT_DIGESTED):
            continue
        sha.update(key.encode())
        sha.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(sha.digest()), dtype=torch.uint8).clone()


class LavitDetokenizerTask(nn.Module):
    """The detokenizer stage for the training loop; one target = one image.

    Args:
        cfg: the detokenizer config.
        tokenizer: the frozen tokenizer; None = load ``cfg.tokenizer``.
    """

    config_cls = DetokenizerConfig
    target_unit = "img"

    def __init__(self, cfg: DetokenizerConfig, tokenizer: DynamicTokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.detokenizer = DiffusionDecoder(cfg)
        self.register_buffer("tokenizer_digest", torch.zeros(DIGEST_BYTES, dtype=torch.uint8))
        tokenizer = tokenizer if tokenizer is not None else load_frozen_tokenizer(cfg.tokenizer, cfg.tokenizer_preset)
        self._check_pairing(tokenizer)
        tokenizer.eval().requires_grad_(False)
        self._frozen = (tokenizer,)  # a tuple keeps it out of the module tree (see the module docstring)
        self.attached_digest = tokenizer_digest(tokenizer)
        self.tokenizer_digest.copy_(self.attached_digest)
        self._flops: float | None = None
        if cfg.latent and cfg.vae_path:
            self._load_vae(Path(cfg.vae_path))

    def _load_vae(self, folder: Path) -> None:
        """The frozen VAE's weights from a diffusers ``AutoencoderKL`` folder (strict: keys and shapes must fit)."""
        from vlpretrain.lavit.convert_detokenizer import read_diffusers_weights

        vae = self.detokenizer.vae
        state = read_diffusers_weights(folder)
        own = vae.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or bad:
            raise UserError(f"model.vae_path: {folder} does not fit model.vae: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}, shapes differ for {bad[:5]}")  # fmt: skip
        vae.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    @property
    def tokenizer(self) -> DynamicTokenizer:
        return self._frozen[0]

    def _check_pairing(self, tokenizer: DynamicTokenizer) -> None:
        got = {"feature_dim": tokenizer.encoder.dim, "num_patches": tokenizer.num_patches}
        for key, value in got.items():
            if getattr(self.cfg, key) != value:
                raise UserError(
                    f"model.{key}: the detokenizer is built for {getattr(self.cfg, key)}, its tokenizer "
                    f"({self.cfg.tokenizer or 'random ' + self.cfg.tokenizer_preset}) has {value}"
                )

    def check_digest(self, where: str) -> None:
        """After loading weights: refuse a tokenizer other than the one the detokenizer was trained with."""
        stored = self.tokenizer_digest.cpu()
        if stored.any() and not torch.equal(stored, self.attached_digest):
            trained, given = stored.numpy().tobytes().hex()[:12], self.attached_digest.numpy().tobytes().hex()[:12]
            raise UserError(
                f"{where}: this detokenizer was trained with another tokenizer (weights digest {trained}, "
                f"the given tokenizer's is {given})"
            )

    def tokenizer_on(self, device: torch.device) -> DynamicTokenizer:
        """The frozen tokenizer, moved to ``device`` first when it is elsewhere."""
        tok = self.tokenizer
        if tok.decoder.pos_embed.device != device:
            tok.to(device)
        return tok

    @torch.no_grad()
    def features(self, images_B3SS: Tensor) -> Tensor:
        """The tokenizer's reconstructed features [B, N, D] of images in [0, 1] (fp32: bf16 changes some codes)."""
        tok = self.tokenizer_on(images_B3SS.device)
        with torch.autocast(images_B3SS.device.type, enabled=False):
            ids, _ = tok.tokenize(images_B3SS.float())
            return tok.decode_codes(ids).float()

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"]
        return {"loss": self.detokenizer.loss(images, self.features(images)).sum()}

    def num_targets(self, batch: dict[str, Any]) -> int:
        return len(batch["image"])

    def flops_per_target(self) -> float:
        if self._flops is None:  # counted once, on the meta device
            self._flops = self.detokenizer.flops_per_image()
        return self._flops

    def shard_units(self) -> list[nn.Module]:
        unet = self.detokenizer.unet
        return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any:
        from vlpretrain.train.streams import pair_dataset

        decode = functools.partial(decode_pair, image_size=self.cfg.image_size)
        return pair_dataset(data_cfg, split, rank, world_size, decode=decode, collate=collate_pairs)


def load_detokenizer(
    path: str | Path, tokenizer: DynamicTokenizer | str | Path | None = None
) -> tuple[LavitDetokenizerTask, dict[str, Any]]:
    """A ``lavit-detokenizer`` checkpoint (or run, or converted) folder with its tokenizer, in eval mode.

    Args:
        path: the folder.
        tokenizer: the tokenizer to pair it with, or its folder; None = the folder recorded in the config.

    Raises:
        UserError: not a detokenizer folder, no tokenizer recorded or found, weights that do not fit the config
            (key and shapes named), or a tokenizer other than the one it was trained with.
    """
    folder = resolve_checkpoint(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: no config.json")
    config = json.loads(config_file.read_text())
    if config.get("task") != TASK:
        raise UserError(f"{folder}: a '{config.get('task')}' checkpoint, expected '{TASK}'")
    cfg: DetokenizerConfig = model_config_from_dict(TASK, config["model"])
    cfg.vae_path = ""  # the checkpoint holds the VAE's weights
    if isinstance(tokenizer, str | Path):
        cfg.tokenizer, tokenizer = str(tokenizer), None
    if tokenizer is None and not cfg.tokenizer:
        raise UserError(f"{folder}: no tokenizer recorded in config.json; pass one (--tokenizer DIR)")
    if tokenizer is None and not Path(cfg.tokenizer).exists():
        raise UserError(f"{folder}: its tokenizer {cfg.tokenizer} is not there; pass the tokenizer (--tokenizer DIR)")
    task = LavitDetokenizerTask(cfg, tokenizer)
    load_weights(task, folder / "model.safetensors")
    task.check_digest(str(folder))
    return task.eval(), config


def save_detokenizer(decoder: DiffusionDecoder, out_dir: str | Path, extra: dict[str, Any] | None = None,
                     digest: Tensor | None = None) -> Path:  # fmt: skip
    """Write ``decoder`` as a loadable ``lavit-detokenizer`` folder without building a tokenizer (converters).

    The weights are the task's state dict (``detokenizer.*`` and ``tokenizer_digest``, all zeros = unknown).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"detokenizer.{k}": v.detach().contiguous().clone() for k, v in decoder.state_dict().items()}
    state["tokenizer_digest"] = digest if digest is not None else torch.zeros(DIGEST_BYTES, dtype=torch.uint8)
    save_file(state, str(out / "model.safetensors"))
    config = {"task": TASK, "model": to_dict(decoder.cfg)} | (extra or {})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


__all__ = [
    "LavitDetokenizerTask",
    "load_detokenizer",
    "paper_highres",
    "save_detokenizer",
    "tokenizer_digest",
]
