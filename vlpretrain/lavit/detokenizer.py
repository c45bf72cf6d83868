"""LaVIT's detokenizer: a conditional diffusion decoder from the tokenizer's reconstructed features back to pixels.

The tokenizer's feature decoder turns code ids into N reconstructed features [B, N, D]. A condition head projects them
to the UNet's cross-attention width: ``unet_proj`` (the official ``pixel_decoding``), or, for the SDXL-style
high-resolution variant (``highres_pixel_decoding``), two projections ``unet_proj_1``/``unet_proj_2`` concatenated on
the channel axis plus a pooled vector from the attention pool ``unet_attnpool``, which with the image size enters the
UNet's ``text_time`` added conditioning. A diffusers ``UNet2DConditionModel`` denoises pixels (the tiny preset) or the
latents of a frozen ``AutoencoderKL`` (paper sizes). Training: the noise-prediction MSE on ``DDPMScheduler`` noise;
sampling: DDIM (eta = 0, so a fixed initial noise gives a fixed image).

Classifier-free guidance: in training each image's condition is replaced by the null condition with probability
``cond_dropout``; at sampling the null and the real condition run in ONE batched UNet call (batch 2B) and are combined
as uncond + s * (cond - uncond). The null condition is all zeros (tokens and pooled vector; the official high-res
decoder's negative), or, with ``negative_tokens = L``, the stored ``negative_embeds`` [L, C] in the first L rows with
the other rows masked out (the official ``pixel_decoding/uncond_embeddings.bin``).

Parameter names follow the official files: ``condition.unet_proj*`` and ``condition.unet_attnpool.*`` are keys of
``tokenizer_decoder.bin`` / ``highres_tokenizer_decoder.bin``; ``unet.*`` and ``vae.*`` are the diffusers folders'.
diffusers is imported only when a model is built (it takes seconds to import).

Shape letters: B images, N condition tokens (patches), D feature width, C condition width, P pooled width,
Z channels of the diffused sample (3 pixels, or the VAE's latent channels), H W its side, S image side in pixels.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlpretrain.configs import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SIZE_IDS = 6  # SDXL time ids: original (h, w), crop top-left (y, x), target (h, w)


@dataclass
class DetokenizerConfig:
    """The diffusion decoder, the tokenizer it reads, and its training/sampling settings.

    The UNet, VAE and noise schedule are given as the keyword arguments of diffusers' ``UNet2DConditionModel``,
    ``AutoencoderKL`` and ``DDIMScheduler`` (the names of their ``config.json``), so an official folder converts
    without a lossy translation; unknown names are refused when the model is built.

    Args:
        tokenizer: the ``lavit-tokenizer`` checkpoint (or run) folder whose tokens are decoded; "" = a random
            tokenizer of ``tokenizer_preset`` (tests only).
        tokenizer_preset: the ``lavit-tokenizer`` preset of that random tokenizer.
        feature_dim: D, width of the tokenizer's reconstructed features (its encoder's width).
        num_patches: N, reconstructed features per image.
        image_size: S, side of the decoded images in pixels.
        proj_dims: widths of the projections concatenated into the cross-attention condition: one (``unet_proj``)
            or several (``unet_proj_1``, ``unet_proj_2``, ... as in the high-res variant); their sum is the UNet's
            ``cross_attention_dim``.
        pooled_dim: P, width of the ``unet_attnpool`` vector for SDXL-style added conditioning; 0 = none.
        pool_heads: heads of the attention pool.
        token_positions: add a learned position embedding ``condition.pos_embed`` [N, C] to the condition tokens
            (not in the official model, whose cross-attention sees the tokens as an unordered set; the tiny presets
            use it so that a small UNet learns where each patch's content goes in few steps).
        spatial_channels: C_s > 0 also lays the condition out as an image: ``spatial_proj`` maps each of the N
            reconstructed features (one per patch, in grid order) to C_s channels on the sqrt(N) x sqrt(N) patch
            grid, which is upsampled to the sample's side and concatenated to the UNet's input (its ``in_channels``
            = Z + C_s). Not in the official model (cross-attention only); the tiny presets use it because a small
            UNet trained for minutes on a CPU learns a spatially aligned condition far faster. 0 = off.
        latent: diffuse in the latent space of ``vae`` (True) or in pixel space.
        space_to_depth: f > 1 diffuses pixels folded into f x f blocks (``pixel_unshuffle``: [3, S, S] ->
            [3 f^2, S/f, S/f]), a lossless stand-in for a VAE that makes a small pixel-space UNet f^2 times cheaper
            per level (the tiny preset: f = 2). Pixel space only.
        unet: ``UNet2DConditionModel`` arguments.
        vae: ``AutoencoderKL`` arguments (used when ``latent``).
        vae_path: a diffusers ``AutoencoderKL`` folder the VAE's weights are read from when training starts
            ("" = random, tests only); a trained checkpoint holds the VAE weights itself.
        scheduler: ``DDIMScheduler`` arguments (the training ``DDPMScheduler`` gets the ones it shares).
        cond_dropout: probability that an image's condition is replaced by the null condition in training.
        negative_tokens: 0 = all-zero null condition; L > 0 = ``negative_embeds`` [L, C] in the first L rows.
        guidance_scale: default classifier-free guidance scale at sampling (1 = no guidance, one UNet call).
        sample_steps: default number of DDIM steps.
    """

    tokenizer: str = ""
    tokenizer_preset: str = "tiny"
    feature_dim: int = 128
    num_patches: int = 64
    image_size: int = 64
    proj_dims: list[int] = field(default_factory=lambda: [64])
    pooled_dim: int = 0
    pool_heads: int = 4
    token_positions: bool = False
    spatial_channels: int = 0
    latent: bool = False
    space_to_depth: int = 1
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    vae_path: str = ""
    scheduler: dict[str, Any] = field(default_factory=dict)
    cond_dropout: float = 0.1
    negative_tokens: int = 0
    guidance_scale: float = 3.0
    sample_steps: int = 25

    def __post_init__(self) -> None:
        if min(self.feature_dim, self.num_patches, self.image_size, self.sample_steps) < 1 or not self.proj_dims:
            raise ConfigError("feature_dim, num_patches, image_size, sample_steps: must be >= 1; proj_dims: not empty")
        if not 0 <= self.cond_dropout < 1:
            raise ConfigError(f"cond_dropout: {self.cond_dropout} must be in [0, 1)")
        if not 0 <= self.negative_tokens <= self.num_patches:
            raise ConfigError(f"negative_tokens: {self.negative_tokens} must be in [0, num_patches={self.num_patches}]")
        if self.guidance_scale < 0:
            raise ConfigError("guidance_scale: must be >= 0")
        if self.pooled_dim and self.feature_dim % self.pool_heads:
            raise ConfigError(f"pool_heads: feature_dim {self.feature_dim} is not divisible by {self.pool_heads}")
        if self.spatial_channels < 0 or (
            self.spatial_channels and math.isqrt(self.num_patches) ** 2 != self.num_patches
        ):
            raise ConfigError(f"spatial_channels: needs >= 0 and a square patch grid (num_patches {self.num_patches})")
        if self.space_to_depth < 1 or (self.latent and self.space_to_depth != 1):
            raise ConfigError(f"space_to_depth: {self.space_to_depth} must be >= 1, and 1 with latent diffusion")
        if self.latent and not self.vae:
            raise ConfigError("vae: latent diffusion needs the AutoencoderKL arguments")
        self._check_unet()
        prediction = self.scheduler.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ConfigError(f"scheduler.prediction_type: {prediction!r} is not one of {PREDICTION_TYPES}")

    def _check_unet(self) -> None:
        """The UNet arguments the condition head and the image size fix (cheap checks; no diffusers import)."""
        u = self.unet
        want = {"cross_attention_dim": sum(self.proj_dims), "in_channels": self.sample_channels + self.spatial_channels,
                "out_channels": self.sample_channels}  # fmt: skip
        if u.get("sample_size") is not None:
            want["sample_size"] = self.sample_side
        for key, value in want.items():
            if u.get(key) != value:
                raise ConfigError(f"unet.{key}: {u.get(key)!r}, but this config needs {value}")
        added = u.get("addition_embed_type")
        if self.pooled_dim:
            projected = self.pooled_dim + SIZE_IDS * (u.get("addition_time_embed_dim") or 0)
            if added != "text_time" or u.get("projection_class_embeddings_input_dim") != projected:
                raise ConfigError(
                    "unet: pooled_dim > 0 needs addition_embed_type 'text_time' and projection_class_embeddings_"
                    f"input_dim = pooled_dim + 6 * addition_time_embed_dim = {projected}"
                )
        elif added is not None:
            raise ConfigError(f"unet.addition_embed_type: {added!r} needs pooled_dim > 0")

    @property
    def vae_factor(self) -> int:
        """Pixels per diffused position along a side (``space_to_depth`` in pixel space)."""
        return 2 ** (len(self.vae.get("block_out_channels", [64])) - 1) if self.latent else self.space_to_depth

    @property
    def sample_channels(self) -> int:
        """Z: channels of the diffused sample."""
        return int(self.vae.get("latent_channels", 4)) if self.latent else 3 * self.space_to_depth**2

    @property
    def sample_side(self) -> int:
        """H = W: side of the diffused sample."""
        if self.image_size % self.vae_factor:
            raise ConfigError(f"image_size: {self.image_size} is not a multiple of the VAE factor {self.vae_factor}")
        return self.image_size // self.vae_factor


@dataclass
class Condition:
    """What the UNet is conditioned on.

    Attributes:
        tokens_BNC: cross-attention tokens.
        mask_BN: bool, True where a token may be attended to; None = every token.
        pooled_BP: the pooled vector of SDXL-style added conditioning, or None.
        spatial_BCGG: the condition on its G x G patch grid, concatenated to the UNet's input, or None.
    """

    tokens_BNC: Tensor
    mask_BN: Tensor | None = None
    pooled_BP: Tensor | None = None
    spatial_BCGG: Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens_BNC)

    def full_mask(self) -> Tensor:
        """The mask with None read as all True: bool [B, N]."""
        if self.mask_BN is not None:
            return self.mask_BN
        return torch.ones(self.tokens_BNC.shape[:2], dtype=torch.bool, device=self.tokens_BNC.device)

    @staticmethod
    def cat(first: Condition, second: Condition) -> Condition:
        """Both batches one after the other (the batched classifier-free-guidance call)."""
        mask = None
        if first.mask_BN is not None or second.mask_BN is not None:
            mask = torch.cat([first.full_mask(), second.full_mask()])
        pooled = None if first.pooled_BP is None else torch.cat([first.pooled_BP, second.pooled_BP])
        spatial = None if first.spatial_BCGG is None else torch.cat([first.spatial_BCGG, second.spatial_BCGG])
        return Condition(torch.cat([first.tokens_BNC, second.tokens_BNC]), mask, pooled, spatial)

    def where(self, keep_B: Tensor, other: Condition) -> Condition:
        """Per image: this condition where ``keep_B`` (bool [B]) is True, else ``other``'s."""
        tokens = torch.where(keep_B[:, None, None], self.tokens_BNC, other.tokens_BNC.to(self.tokens_BNC.dtype))
        mask = None
        if self.mask_BN is not None or other.mask_BN is not None:
            mask = torch.where(keep_B[:, None], self.full_mask(), other.full_mask())
        pooled = None
        if self.pooled_BP is not None:
            pooled = torch.where(keep_B[:, None], self.pooled_BP, other.pooled_BP.to(self.pooled_BP.dtype))
        spatial = None
        if self.spatial_BCGG is not None:
            other_spatial = other.spatial_BCGG.to(self.spatial_BCGG.dtype)
            spatial = torch.where(keep_B[:, None, None, None], self.spatial_BCGG, other_spatial)
        return Condition(tokens, mask, pooled, spatial)


class AttentionPool(nn.Module):
    """[B, N, D] -> one vector [B, P]: the mean token is prepended, learned positions are added, and the mean token's
    multi-head attention over all N + 1 tokens is projected by ``c_proj`` (CLIP's attention pool; the keys of the
    official ``unet_attnpool``). Only the first token's output is used, so only its query is computed."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.zeros(seq_len + 1, dim))
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, x_BND: Tensor) -> Tensor:
        if x_BND.shape[1] + 1 != len(self.positional_embedding):
            raise ValueError(f"attention pool: {x_BND.shape[1]} tokens, built for {len(self.positional_embedding) - 1}")
        tokens_BTD = torch.cat([x_BND.mean(dim=1, keepdim=True), x_BND], dim=1) + self.positional_embedding.to(
            x_BND.dtype
        )
        q_BH1E = rearrange(self.q_proj(tokens_BTD[:, :1]), "b t (h e) -> b h t e", h=self.heads)
        k_BHTE = rearrange(self.k_proj(tokens_BTD), "b t (h e) -> b h t e", h=self.heads)
        v_BHTE = rearrange(self.v_proj(tokens_BTD), "b t (h e) -> b h t e", h=self.heads)
        out_BH1E = F.scaled_dot_product_attention(q_BH1E, k_BHTE, v_BHTE)
        return self.c_proj(rearrange(out_BH1E, "b h t e -> b t (h e)"))[:, 0]


def projection_names(count: int) -> list[str]:
    """The official names of the feature projections: ``unet_proj``, or ``unet_proj_1``, ``unet_proj_2``, ..."""
    return ["unet_proj"] if count == 1 else [f"unet_proj_{i + 1}" for i in range(count)]


class ConditionHead(nn.Module):
    """Reconstructed features [B, N, D] -> cross-attention tokens [B, N, C] (and the pooled vector [B, P])."""

    def __init__(self, cfg: DetokenizerConfig) -> None:
        super().__init__()
        self.proj_names = projection_names(len(cfg.proj_dims))
        for name, width in zip(self.proj_names, cfg.proj_dims, strict=True):
            self.add_module(name, nn.Linear(cfg.feature_dim, width))
        width = sum(cfg.proj_dims)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, width)) if cfg.token_positions else None
        pooled, pool = cfg.pooled_dim, None
        if pooled:
            pool = AttentionPool(cfg.num_patches, cfg.feature_dim, cfg.pool_heads, pooled)
        self.unet_attnpool = pool
        self.spatial_proj = nn.Linear(cfg.feature_dim, cfg.spatial_channels) if cfg.spatial_channels else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Variance-preserving projections (std 1/sqrt(D)), zero biases; pool positions N(0, 1/D) as in CLIP;
        token positions N(0, 0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=module.in_features**-0.5)
                nn.init.zeros_(module.bias)
        if self.unet_attnpool is not None:
            pos = self.unet_attnpool.positional_embedding
            nn.init.normal_(pos, std=pos.shape[1] ** -0.5)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, feats_BND: Tensor) -> Condition:
        tokens_BNC = torch.cat([getattr(self, name)(feats_BND) for name in self.proj_names], dim=-1)
        if self.pos_embed is not None:
            tokens_BNC = tokens_BNC + self.pos_embed.to(tokens_BNC.dtype)
        pooled_BP = self.unet_attnpool(feats_BND) if self.unet_attnpool is not None else None
        spatial_BCGG = None
        if self.spatial_proj is not None:
            grid = math.isqrt(feats_BND.shape[1])
            spatial_BCGG = rearrange(self.spatial_proj(feats_BND), "b (h w) c -> b c h w", h=grid, w=grid)
        return Condition(tokens_BNC, None, pooled_BP, spatial_BCGG)


def checked_kwargs(cls: type, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """``kwargs`` if every name is an argument of ``cls``'s constructor, else a ConfigError naming the unknown ones."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} argument(s) {unknown}")
    return dict(kwargs)


def ddim_scheduler(cfg: DetokenizerConfig) -> Any:
    """A fresh DDIM sampler (it holds per-call state, so every sampling call gets its own)."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    return DDIMScheduler(**checked_kwargs(DDIMScheduler, cfg.scheduler, "model.scheduler"))


def ddpm_scheduler(cfg: DetokenizerConfig) -> Any:
    """The training noise schedule: a DDPMScheduler from the ``scheduler`` arguments it shares with DDIM."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    checked_kwargs(DDIMScheduler, cfg.scheduler, "model.scheduler")
    shared = set(inspect.signature(DDPMScheduler.__init__).parameters)
    return DDPMScheduler(**{k: v for k, v in cfg.scheduler.items() if k in shared})


class DiffusionDecoder(nn.Module):
    """Condition head + UNet (+ frozen VAE): the trainable part of the detokenizer."""

    def __init__(self, cfg: DetokenizerConfig) -> None:
        super().__init__()
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

        self.cfg = cfg
        self.condition = ConditionHead(cfg)
        self.unet = UNet2DConditionModel(**checked_kwargs(UNet2DConditionModel, cfg.unet, "model.unet"))
        self.vae = None
        if cfg.latent:
            self.vae = AutoencoderKL(**checked_kwargs(AutoencoderKL, cfg.vae, "model.vae"))
            self.vae.requires_grad_(False)
        if cfg.negative_tokens:
            self.register_buffer("negative_embeds", torch.zeros(cfg.negative_tokens, sum(cfg.proj_dims)))
        self.noise_schedule = ddpm_scheduler(cfg)

    def train(self, mode: bool = True) -> DiffusionDecoder:
        """The VAE stays in eval mode (frozen)."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # --- conditions ---

    def null_condition(self, like: Condition) -> Condition:
        """The unconditional branch's condition, shaped like ``like``: zeros, or ``negative_embeds`` + mask."""
        tokens = torch.zeros_like(like.tokens_BNC)
        mask = None
        if self.cfg.negative_tokens:
            n = self.cfg.negative_tokens
            tokens[:, :n] = self.negative_embeds.to(tokens.dtype)
            mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            mask[:, :n] = True
        pooled = None if like.pooled_BP is None else torch.zeros_like(like.pooled_BP)
        spatial = None if like.spatial_BCGG is None else torch.zeros_like(like.spatial_BCGG)
        return Condition(tokens, mask, pooled, spatial)

    def drop_condition(self, cond: Condition, p: float) -> Condition:
        """Training: each image's condition becomes the null condition with probability ``p``."""
        if p == 0:
            return cond
        keep_B = torch.rand(len(cond), device=cond.tokens_BNC.device) >= p
        return cond.where(keep_B, self.null_condition(cond))

    # --- the denoiser ---

    def predict(self, x_BZHW: Tensor, t_B: Tensor, cond: Condition) -> Tensor:
        """The UNet's prediction (noise, velocity or sample, per ``prediction_type``) [B, Z, H, W]."""
        added = None
        if cond.pooled_BP is not None:
            s = self.cfg.image_size
            size_ids = torch.tensor([s, s, 0, 0, s, s], dtype=cond.pooled_BP.dtype, device=x_BZHW.device)
            added = {"text_embeds": cond.pooled_BP, "time_ids": size_ids.expand(len(x_BZHW), -1)}
        if cond.spatial_BCGG is not None:
            grid_BCHW = F.interpolate(cond.spatial_BCGG.to(x_BZHW.dtype), size=x_BZHW.shape[-2:], mode="nearest")
            x_BZHW = torch.cat([x_BZHW, grid_BCHW], dim=1)
        return self.unet(
            x_BZHW, t_B, encoder_hidden_states=cond.tokens_BNC, encoder_attention_mask=cond.mask_BN,
            added_cond_kwargs=added,
        ).sample  # fmt: skip

    def guided_prediction(
        self, x_BZHW: Tensor, t: Tensor, cond: Condition, scale: float, batched: bool = True
    ) -> Tensor:
        """Classifier-free guidance: uncond + scale * (cond - uncond), in fp32 [B, Z, H, W].

        Args:
            x_BZHW: the current noisy sample.
            t: the timestep (a scalar tensor).
            cond: the real condition (its null twin is made here).
            scale: guidance scale; 1 = the conditional prediction alone (one UNet call of batch B).
            batched: one UNet call of batch 2B (True) or two calls of batch B (the same result; for comparison).
        """
        b = len(x_BZHW)
        if scale == 1.0:
            return self.predict(x_BZHW, t.expand(b), cond).float()
        null = self.null_condition(cond)
        if batched:
            both = self.predict(torch.cat([x_BZHW, x_BZHW]), t.expand(2 * b), Condition.cat(null, cond)).float()
            uncond, conditional = both.chunk(2)
        else:
            uncond = self.predict(x_BZHW, t.expand(b), null).float()
            conditional = self.predict(x_BZHW, t.expand(b), cond).float()
        return uncond + scale * (conditional - uncond)

    # --- pixels <-> diffused samples ---

    def to_sample_space(self, images_B3SS: Tensor) -> Tensor:
        """Images in [0, 1] -> clean samples x0 [B, Z, H, W]: pixels in [-1, 1], or scaled VAE latents (fp32)."""
        x = images_B3SS.float() * 2.0 - 1.0
        if self.vae is None:
            return F.pixel_unshuffle(x, self.cfg.space_to_depth) if self.cfg.space_to_depth > 1 else x
        with torch.autocast(x.device.type, enabled=False):
            latents = self.vae.encode(x).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def to_pixels(self, x0_BZHW: Tensor) -> Tensor:
        """Clean samples -> images [B, 3, S, S] in [0, 1] (fp32)."""
        x = x0_BZHW.float()
        if self.cfg.space_to_depth > 1:
            x = F.pixel_shuffle(x, self.cfg.space_to_depth)
        if self.vae is not None:
            with torch.autocast(x.device.type, enabled=False):
                x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    # --- training and sampling ---

    def loss(self, images_B3SS: Tensor, feats_BND: Tensor) -> Tensor:
        """Per-image diffusion loss [B]: MSE between the UNet's prediction and its target (the noise, for
        ``epsilon``) at a uniformly drawn timestep, with condition dropout in training mode."""
        with torch.no_grad():
            x0 = self.to_sample_space(images_B3SS)
        sched = self.noise_schedule
        noise = torch.randn_like(x0)
        t_B = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), device=x0.device)
        x_t = sched.add_noise(x0, noise, t_B)
        cond = self.drop_condition(self.condition(feats_BND), self.cfg.cond_dropout if self.training else 0.0)
        pred = self.predict(x_t, t_B, cond).float()
        kind = sched.config.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else sched.get_velocity(x0, noise, t_B)
        return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal starting samples [B, Z, H, W] on the CPU (same numbers on any device)."""
        side = self.cfg.sample_side
        return torch.randn(batch, self.cfg.sample_channels, side, side, generator=generator)

    @torch.no_grad()
    def sample(self, feats_BND: Tensor, noise_BZHW: Tensor, steps: int, guidance_scale: float,
               batched: bool = True, bf16: bool = False) -> Tensor:  # fmt: skip
        """DDIM sampling from the initial ``noise`` conditioned on features [B, N, D] -> images [B, 3, S, S] in [0, 1].

        Args:
            feats_BND: the tokenizer's reconstructed features.
            noise_BZHW: the initial noise (see :meth:`initial_noise`); it fixes the result.
            steps: DDIM steps.
            guidance_scale: classifier-free guidance scale (1 = off).
            batched: cond and uncond in one UNet call (True) or two.
            bf16: run the UNet under bf16 autocast (about 2x faster on CPU; the scheduler stays fp32).
        """
        if steps < 1:
            raise ValueError(f"steps: {steps} must be >= 1")
        device = feats_BND.device
        scheduler = ddim_scheduler(self.cfg)
        scheduler.set_timesteps(steps, device=device)
        x = noise_BZHW.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            cond = self.condition(feats_BND)
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(x, t)
                pred = self.guided_prediction(model_in, t, cond, guidance_scale, batched)
                x = scheduler.step(pred, t, x).prev_sample.float()
        return self.to_pixels(x)

    def flops_per_image(self) -> float:
        """Training FLOPs per image (UNet forward + backward = 3 x forward), counted on the meta device."""
        from torch.utils.flop_counter import FlopCounterMode

        side, z = self.cfg.sample_side, self.cfg.sample_channels
        with torch.device("meta"):
            meta = type(self)(self.cfg)
            x = torch.zeros(1, z, side, side)
            feats = torch.zeros(1, self.cfg.num_patches, self.cfg.feature_dim)
            with FlopCounterMode(display=False) as counter:
                meta.predict(x, torch.zeros(1, dtype=torch.long), meta.condition(feats))
        return 3.0 * counter.get_total_flops()


__all__ = [
    "AttentionPool",
    "Condition",
    "ConditionHead",
    "DetokenizerConfig",
    "DiffusionDecoder",
    "checked_kwargs",
    "ddim_scheduler",
    "ddpm_scheduler",
    "projection_names",
]
