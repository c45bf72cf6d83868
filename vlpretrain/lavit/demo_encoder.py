"""The CPU demo's frozen vision encoder: the ``tiny`` ViT pretrained on shapes-world images by dense supervision.

LaVIT's tokenizer learns to compress the patch features of a FROZEN encoder: its selector keeps the patches that
matter and its decoder must reconstruct the features of all of them. That only means something when the features
say what is in each patch. A randomly initialised ViT does not (its features are a fixed random function of the
pixels, unrelated to objects), and LaVIT's own EVA-CLIP ViT-g/14 is far too large for the demo.

Objective (and why): dense per-patch attribute supervision. Every patch of the 8 x 8 grid gets targets from the
scene's ground truth: whether an object covers the patch centre and, if one does, its shape, colour and size; each
image also gets its object count. Linear heads read the last block's output (through a LayerNorm) and are thrown
away after training; only the ViT is kept. This is the cheapest way on a CPU to get patch features that linearly
encode object identity per location, which is what LaVIT's selector must keep and its decoder must reconstruct. A
contrastive (CLIP-style) objective would need a text encoder and far more compute to learn the same facts; a
reconstruction objective (MAE) spends its capacity on backgrounds and textures.

Targets come from a per-object mask rendered exactly as the image is drawn (the renderer's random jitter replayed
with the same generator), so a patch is foreground iff its centre pixel is painted by an object.

Training: AdamW, warm-up then cosine decay, bf16 autocast, on a pool of training images generated up front in
worker processes (see :func:`pretrain_demo_encoder` for the measured speeds). The default recipe takes about TODO
on 2 idle cores and reaches TODO.

Shape letters: B images, H W pixels, G patches per side, N = G * G patches, D feature width, O objects of an image,
A the four per-patch targets (object, shape, colour, size), K classes of one head.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from vlpretrain.configs import ConfigError, from_dict, get_preset, list_presets, register_preset, to_dict
from vlpretrain.core.encoders import EvaEncoder
from vlpretrain.core.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
from vlpretrain.core.vit import VisionTransformer, ViTConfig
from vlpretrain.data.synthetic import (
    _RADIUS,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    SynthConfig,
    _shape_points,
    example_rng,
    render_scene,
    sample_scene,
)
from vlpretrain.errors import UserError

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
PATCH_HEADS: dict[str, int] = {"object": 2, "shape": len(SHAPES), "color": len(COLOR_NAMES), "size": len(SIZES)}
IGNORE = -100  # target of the attribute heads on background patches
CONFIG_SUFFIX = ".json"
MIN_COVERAGE = 0.25  # fraction of a patch an object must paint to label it, see patch_targets


@dataclass
class DemoEncoderConfig:
    """Which ViT to pretrain for the demo, and the training recipe.

    Args:
        vit: a ``vit`` preset (its ``image_size`` must equal the data's).
        steps: optimisation steps.
        batch_size: images per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 5% of it).
        weight_decay: AdamW weight decay on matrices (not on norms, biases, positions or the CLS token).
        warmup_steps: steps of linear warm-up.
        pool_size: most training images generated up front (uint8, 12 KiB each at 64 px); longer runs revisit them.
        data_workers: processes generating the pool (0: the calling process).
        bf16: forward and backward under bfloat16 autocast.
        time_limit_s: wall-clock budget of the optimisation loop; when it runs out the learning-rate schedule has
            already decayed to its end (progress is the larger of the step and time fractions) and training stops
            early. 0 = no limit (then the run is a pure function of the seed).
        eval_images: test-split images of the final accuracy report.
        seed: seed of the ViT and head initialisation and of the training image indices.
    """

    vit: str = "tiny"
    steps: int = 240
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    pool_size: int = 20_000
    data_workers: int = 2
    bf16: bool = True
    time_limit_s: float = 0.0
    eval_images: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if f"vit/{self.vit}" not in list_presets("vit"):
            known = ", ".join(name.split("/", 1)[1] for name in list_presets("vit"))
            raise ConfigError(f"demo_encoder.vit: unknown vit preset {self.vit!r} (known: {known})")
        for name in ("steps", "batch_size", "eval_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo_encoder.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"demo_encoder.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"demo_encoder.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"demo_encoder.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.pool_size < self.batch_size:
            raise ConfigError(f"demo_encoder.pool_size: {self.pool_size} is smaller than batch_size {self.batch_size}")
        if self.data_workers < 0:
            raise ConfigError(f"demo_encoder.data_workers: must be >= 0, got {self.data_workers}")
        if self.time_limit_s < 0:
            raise ConfigError(f"demo_encoder.time_limit_s: must be >= 0 (0 = no limit), got {self.time_limit_s}")


@register_preset("demo-encoder", "tiny")
def demo_encoder_tiny() -> DemoEncoderConfig:
    """The demo's encoder: the ``tiny`` ViT (64 px, N = 64, D = 128) on the default shapes world."""
    return DemoEncoderConfig()


# ----------------------------------------------------------------------------------------------------------------
# targets


def render_object_ids(scene: Scene, rng: random.Random, jitter: float) -> np.ndarray:
    """Which object paints each pixel: uint8 [H, W], 0 = background, i + 1 = ``scene.objects[i]``.

    Mirrors :func:`~vlpretrain.data.synthetic.render_scene` draw call for draw call (same centres, radii and
    polygons, later objects over earlier ones), so pass ``rng`` in the state ``render_scene`` received.
    """
    if len(scene.objects) > 254:
        raise ValueError(f"render_object_ids: {len(scene.objects)} objects do not fit in uint8 ids")
    size, cell = scene.image_size, scene.image_size / scene.grid
    ids = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ids)
    for index, obj in enumerate(scene.objects, start=1):
        r = _RADIUS[obj.size] * cell
        cx = (obj.col + 0.5 + rng.uniform(-jitter, jitter)) * cell
        cy = (obj.row + 0.5 + rng.uniform(-jitter, jitter)) * cell
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=index)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=index)
    return np.asarray(ids)


def make_dense_example(synth: SynthConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray, Scene]:
    """Image ``index`` of ``split`` (the same pixels as ``make_example(synth, split, index).image``) with its
    object-id map: (uint8 [H, W, 3], uint8 [H, W], scene); captions and questions are not generated."""
    rng = example_rng(synth.seed, split, index)
    scene = sample_scene(synth, split, index, rng)
    jitter_state = rng.getstate()
    image = render_scene(scene, rng, synth.jitter)
    rng.setstate(jitter_state)
    return image, render_object_ids(scene, rng, synth.jitter), scene


def patch_targets(scene: Scene, object_ids: np.ndarray, patch_size: int, min_coverage: float = MIN_COVERAGE) -> Tensor:
    """Per-patch targets of one image from its object-id map.

    A patch is foreground when one object paints at least ``min_coverage`` of its pixels, and then it takes that
    object's attributes (the one painting the most, should two qualify). With the default quarter every object of
    the default shapes world has at least one foreground patch, where labelling by the patch's centre pixel leaves
    about 11% of the small objects without any (measured on 500 test images).

    Args:
        scene: the image's ground truth.
        object_ids: uint8 [H, W] from :func:`render_object_ids`.
        patch_size: the ViT's patch side P (must divide H and W).
        min_coverage: fraction of the patch's P * P pixels an object must paint.

    Returns:
        long [A, N] in raster patch order with A = (object 0/1, shape, colour, size); the attributes are
        :data:`IGNORE` on background patches.
    """
    height, width = object_ids.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_targets: patch_size {patch_size} does not divide the image ({height} x {width})")
    num_ids = 1 + len(scene.objects)  # id 0 = background
    ids_NP = rearrange(object_ids, "(gh ph) (gw pw) -> (gh gw) (ph pw)", ph=patch_size, pw=patch_size).astype(np.int64)
    offsets_N1 = num_ids * np.arange(len(ids_NP))[:, None]
    pixels_NO = np.bincount((ids_NP + offsets_N1).ravel(), minlength=len(ids_NP) * num_ids).reshape(-1, num_ids)
    pixels_NO[:, 0] = 0  # the background never wins: it is what is left
    best_N = pixels_NO.argmax(axis=1)
    ids_N = torch.from_numpy(np.where(pixels_NO.max(axis=1) >= min_coverage * patch_size**2, best_N, 0))
    table_OA = torch.full((1 + len(scene.objects), 4), IGNORE, dtype=torch.long)  # row 0 = background
    table_OA[0, 0] = 0
    for row, obj in enumerate(scene.objects, start=1):
        attributes = (1, SHAPES.index(obj.shape), COLOR_NAMES.index(obj.color), SIZES.index(obj.size))
        table_OA[row] = torch.tensor(attributes)
    return table_OA[ids_N].T.contiguous()  # [A, N]


class _DenseChunks(Dataset):
    """Chunk k: examples [first + k * chunk, first + (k + 1) * chunk) of ``split``, clipped to ``count``, as
    (images uint8 [n, H, W, 3], patch targets int8 [n, A, N], counts int8 [n]); a pure function of the indices."""

    def __init__(self, synth: SynthConfig, split: str, first: int, count: int, patch_size: int, chunk: int = 256):
        self.synth, self.split, self.first, self.count = synth, split, first, count
        self.patch_size, self.chunk = patch_size, chunk

    def __len__(self) -> int:
        return -(-self.count // self.chunk)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        start = self.first + k * self.chunk
        stop = min(start + self.chunk, self.first + self.count)
        images, targets, counts = [], [], []
        for index in range(start, stop):
            image, object_ids, scene = make_dense_example(self.synth, self.split, index)
            images.append(torch.from_numpy(image.copy()))
            targets.append(patch_targets(scene, object_ids, self.patch_size).to(torch.int8))
            counts.append(len(scene.objects))
        return torch.stack(images), torch.stack(targets), torch.tensor(counts, dtype=torch.int8)


def make_dense_pool(
    synth: SynthConfig, split: str, count: int, patch_size: int, first: int = 0, workers: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` examples of ``split`` from index ``first`` with their targets, generated in ``workers`` processes.

    Returns:
        images uint8 [B, H, W, 3], patch targets int8 [B, A, N] (see :func:`patch_targets`), object counts int8 [B].
    """
    if count < 1:
        raise ValueError(f"make_dense_pool: count must be >= 1, got {count}")
    chunks = DataLoader(_DenseChunks(synth, split, first, count, patch_size), batch_size=None, num_workers=workers)
    images, targets, counts = zip(*chunks, strict=True)
    return torch.cat(images), torch.cat(targets), torch.cat(counts)


# ----------------------------------------------------------------------------------------------------------------
# heads, loss, evaluation


class PatchHeads(nn.Module):
    """Training-only read-outs of the ViT's patch features: a LayerNorm, then one Linear per patch for the four
    per-patch targets and one on the mean-pooled patches for the object count.

    Args:
        dim: D, the ViT width.
        max_objects: the largest object count (the count head has ``max_objects + 1`` classes).
    """

    def __init__(self, dim: int, max_objects: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.patch = nn.Linear(dim, sum(PATCH_HEADS.values()))
        self.count = nn.Linear(dim, max_objects + 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Unit/zero LayerNorm, trunc-normal(0.02) weights, zero biases."""
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        for linear in (self.patch, self.count):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, feats_BND: Tensor) -> dict[str, Tensor]:
        """Patch features [B, N, D] -> logits ``{"object": [B, N, 2], "shape": [B, N, 5], "color": [B, N, 8],
        "size": [B, N, 2], "count": [B, max_objects + 1]}``."""
        x_BND = self.norm(feats_BND)
        logits = dict(zip(PATCH_HEADS, self.patch(x_BND).split(list(PATCH_HEADS.values()), dim=-1), strict=True))
        logits["count"] = self.count(x_BND.mean(dim=1))
        return logits


def dense_loss(logits: dict[str, Tensor], targets_BAN: Tensor, counts_B: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Sum of the cross-entropies: objectness on every patch, attributes on foreground patches, count per image.

    Args:
        logits: :class:`PatchHeads` output.
        targets_BAN: long [B, A, N] from :func:`patch_targets`.
        counts_B: long [B] object counts.

    Returns:
        The loss (a scalar) and each term as a float.
    """
    terms = {
        name: F.cross_entropy(rearrange(logits[name].float(), "b n k -> (b n) k"), targets_BAN[:, i].flatten(),
                              ignore_index=IGNORE)
        for i, name in enumerate(PATCH_HEADS)
    }  # fmt: skip
    terms["count"] = F.cross_entropy(logits["count"].float(), counts_B)
    total = torch.stack(list(terms.values())).sum()
    return total, {name: float(value.detach()) for name, value in terms.items()}


def pixels_for_vit(images_BHWC: Tensor) -> Tensor:
    """uint8 images [B, H, W, 3] -> the ViT's input [B, 3, H, W], CLIP-normalised as :class:`EvaEncoder` does."""
    # contiguous: a channels-last input sends the patch conv's bf16 backward down a path ~20x slower (1 s per step)
    x_BCHW = rearrange(images_BHWC, "b h w c -> b c h w").contiguous().float().div_(255.0)
    return normalize(x_BCHW, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@torch.no_grad()
def evaluate_patch_accuracy(
    encoder: VisionTransformer | EvaEncoder,
    heads: PatchHeads,
    synth: SynthConfig | None = None,
    split: str = "test",
    num_images: int = 500,
    batch_size: int = 250,
    bf16: bool = True,
) -> dict[str, float]:
    """Accuracy of the heads on fresh images of ``split`` (indices 0 .. num_images - 1).

    Args:
        encoder: the ViT, or an :class:`EvaEncoder` wrapping one (e.g. the one ``build_encoder`` loads).
        heads: the heads trained with it.
        synth: the data set (default: ``SynthConfig()``).
        split: "train", "val" or "test".
        num_images: images to score.
        batch_size: images per forward pass.
        bf16: run the ViT under bfloat16 autocast.

    Returns:
        ``shape_acc``, ``color_acc``, ``size_acc`` over foreground patches (ground truth), ``object_acc`` (foreground
        patches called foreground), ``background_acc`` (background patches called background), ``count_acc`` (per
        image) and ``foreground_fraction``.
    """
    synth = synth or SynthConfig()
    vit = encoder.model if isinstance(encoder, EvaEncoder) else encoder
    images, targets, counts = make_dense_pool(synth, split, num_images, vit.cfg.patch_size)
    was_training = vit.training
    vit.eval()
    heads.eval()
    correct = dict.fromkeys(("shape", "color", "size", "object", "background", "count"), 0)
    for start in range(0, num_images, batch_size):
        x_BCHW = pixels_for_vit(images[start : start + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = heads(vit.forward_features(x_BCHW.to(next(vit.parameters()).dtype)))
        targets_BAN = targets[start : start + batch_size].long()
        foreground_BN = targets_BAN[:, 0] == 1
        predicted = {name: logits[name].argmax(dim=-1) for name in logits}
        for i, name in enumerate(("shape", "color", "size"), start=1):
            correct[name] += int((predicted[name] == targets_BAN[:, i])[foreground_BN].sum())
        correct["object"] += int((predicted["object"] == 1)[foreground_BN].sum())
        correct["background"] += int((predicted["object"] == 0)[~foreground_BN].sum())
        correct["count"] += int((predicted["count"] == counts[start : start + batch_size].long()).sum())
    vit.train(was_training)
    num_foreground = int((targets[:, 0] == 1).sum())
    num_background = targets[:, 0].numel() - num_foreground
    metrics = {f"{name}_acc": correct[name] / max(num_foreground, 1) for name in ("shape", "color", "size", "object")}
    metrics["background_acc"] = correct["background"] / max(num_background, 1)
    metrics["count_acc"] = correct["count"] / num_images
    metrics["foreground_fraction"] = num_foreground / targets[:, 0].numel()
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# training


def _optimizer(params: list[tuple[str, nn.Parameter]], cfg: DemoEncoderConfig) -> torch.optim.AdamW:
    """AdamW, decaying matrices only: norms, biases, positions and the CLS token are not decayed."""
    decay = [p for name, p in params if p.ndim >= 2 and name not in ("pos_embed", "cls_token")]
    no_decay = [p for name, p in params if not (p.ndim >= 2 and name not in ("pos_embed", "cls_token"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _lr_at(progress: float, step: int, cfg: DemoEncoderConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 5% of ``cfg.lr`` as ``progress`` goes to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    warm = cfg.warmup_steps / cfg.steps
    t = min(max((progress - warm) / max(1.0 - warm, 1e-9), 0.0), 1.0)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_dense(
    cfg: DemoEncoderConfig, synth: SynthConfig, progress: bool = True
) -> tuple[VisionTransformer, PatchHeads, dict[str, float]]:
    """Train a ViT and its heads from scratch with :func:`dense_loss` (see :func:`pretrain_demo_encoder`).

    Returns:
        The ViT and the heads (both in eval mode) and training statistics: ``steps`` run, ``data_s`` and ``train_s``
        (seconds generating the pool and optimising), ``loss_first`` and ``loss_last`` (mean loss of the first and
        last 10 steps).
    """
    vit_cfg: ViTConfig = get_preset("vit", cfg.vit)
    if vit_cfg.image_size != synth.image_size:
        raise ConfigError(
            f"demo_encoder.vit: preset {cfg.vit!r} takes {vit_cfg.image_size} px images, the data are "
            f"{synth.image_size} px"
        )
    torch.manual_seed(cfg.seed)
    vit = VisionTransformer(vit_cfg).train()
    heads = PatchHeads(vit_cfg.width, synth.max_objects).train()
    named = [*vit.named_parameters(), *(("heads." + n, p) for n, p in heads.named_parameters())]
    optimizer = _optimizer(named, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
    fields = TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}")
    with Progress(*columns, fields, TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("demo encoder: generating data", total=cfg.steps, loss="-", lr="-")
        start = time.perf_counter()
        pool_size = min(cfg.steps * cfg.batch_size, cfg.pool_size)
        images, targets, counts = make_dense_pool(
            synth, "train", pool_size, vit_cfg.patch_size, cfg.seed * 10_000_000, cfg.data_workers
        )
        data_s = time.perf_counter() - start
        bar.update(task, description="demo encoder: training")
        order, cursor, step, losses = torch.randperm(pool_size, generator=generator), 0, 0, []
        start = time.perf_counter()
        while step < cfg.steps:
            # schedule: by steps, or by time when the budget would run out first
            elapsed = time.perf_counter() - start
            done = max(step / cfg.steps, elapsed / cfg.time_limit_s if cfg.time_limit_s else 0.0)
            if done >= 1.0:
                break
            lr = _lr_at(done, step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # data: shuffled epochs over the pool
            if cursor + cfg.batch_size > pool_size:
                order, cursor = torch.randperm(pool_size, generator=generator), 0
            idx = order[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            x_BCHW = pixels_for_vit(images[idx])
            # step
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16), sdpa_kernel(SDPBackend.MATH):
                logits = heads(vit.forward_features(x_BCHW))
            loss, _ = dense_loss(logits, targets[idx].long(), counts[idx].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            # log
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, loss=f"{np.mean(losses[-10:]):.3f}", lr=f"{lr:.1e}")
        train_s = time.perf_counter() - start
    stats = {"steps": float(step), "data_s": data_s, "train_s": train_s}
    stats |= {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    return vit.eval(), heads.eval(), stats


def pretrain_demo_encoder(
    cfg: DemoEncoderConfig, synth_cfg: SynthConfig | None = None, progress: bool = True
) -> tuple[VisionTransformer, dict[str, float]]:
    """Pretrain the demo's frozen encoder by dense per-patch attribute supervision (module docstring: why).

    Args:
        cfg: the ViT preset and the recipe.
        synth_cfg: the shapes world to train on (default: ``SynthConfig()``); test images of it are scored.
        progress: show a rich progress bar.

    Returns:
        The ViT (eval mode; its heads are discarded) and metrics: the statistics of :func:`train_dense` and the
        test accuracies of :func:`evaluate_patch_accuracy`.
    """
    synth_cfg = synth_cfg or SynthConfig()
    vit, heads, stats = train_dense(cfg, synth_cfg, progress)
    accuracy = evaluate_patch_accuracy(vit, heads, synth_cfg, "test", cfg.eval_images, bf16=cfg.bf16)
    return vit, stats | accuracy


# ----------------------------------------------------------------------------------------------------------------
# checkpoint


def save_demo_encoder(vit: VisionTransformer, path: str | Path, metrics: dict[str, float] | None = None) -> Path:
    """Write the ViT's state dict (official EVA key names) to ``path`` (``.safetensors``) and its config to the same
    name with ``.json``, so that ``build_encoder(EncoderSpec(kind="eva", preset=..., path=path))`` loads it.

    Args:
        vit: the pretrained ViT.
        path: the weights file; must end in ``.safetensors``. Parent folders are created.
        metrics: recorded in the json (e.g. the accuracies of :func:`pretrain_demo_encoder`).

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: the demo encoder is saved as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in vit.state_dict().items()}
    save_file(state, str(path))
    meta = {"vit": to_dict(vit.cfg), "metrics": metrics or {}}
    path.with_suffix(CONFIG_SUFFIX).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_demo_encoder(path: str | Path) -> VisionTransformer:
    """The ViT written by :func:`save_demo_encoder`, rebuilt from its ``.json`` config, in eval mode."""
    path = Path(path)
    config_path = path.with_suffix(CONFIG_SUFFIX)
    if not config_path.is_file():
        raise UserError(f"{path}: no {config_path.name} next to it (not written by save_demo_encoder)")
    try:
        vit_cfg = from_dict(ViTConfig, json.loads(config_path.read_text())["vit"], "vit.")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{config_path}: not a demo encoder config ({err})") from err
    return VisionTransformer.from_official(vit_cfg, path).eval()
