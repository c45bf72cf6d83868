"""The CPU demo's frozen vision encoder: the ``tiny`` ViT pretrained on shapes-world images by dense supervision.

LaVIT's tokenizer learns to compress the patch features of a FROZEN encoder: its selector keeps the patches that
matter and its decoder must reconstruct the features of all of them. That only means something when the features
say what is in each patch. A randomly initialised ViT does not (its features are a fixed random function of the
pixels, unrelated to objects), and LaVIT's own EVA-CLIP ViT-g/14 is far too large for the demo.

Objective (and why): dense per-patch attribute supervision. Every patch of the 8 x 8 grid gets targets from the
scene's ground truth: whether an object covers it and, if one does, that object's shape, colour and size; each patch
also learns where it is: the cell of the scene's 3 x 3 object grid that holds it (``position_target``,
``position_grid``). A count head reads the image's object count from
detached features, as a report only (``count_target``). Linear heads read the last block's output (through a
LayerNorm) and are thrown away after training; only the ViT is kept. This is the cheapest way on a CPU to get patch
features that linearly encode object identity per location, which is what LaVIT's selector must keep and its decoder
must reconstruct. A contrastive (CLIP-style) objective would need a text encoder and far more compute to learn the
same facts; a reconstruction objective (MAE) spends its capacity on backgrounds and textures.

An alternative objective (``objective: embed``, :class:`AttributeEmbeddings`) makes each patch feature regress
onto a fixed sum of one random vector per attribute value, so that the share of the feature variance each attribute
gets is chosen rather than learnt: under the cross-entropies colour ends up a small share and the tokenizer's
codes, which spend themselves on the largest components, drop it (docs/lavit.md, "Feature geometry").

Targets come from a per-object mask drawn exactly as the image is (the renderer's jitter replayed with the same
generator): a patch belongs to the object that paints at least a quarter of it (:func:`patch_targets`).

Recipe (:class:`DemoEncoderConfig`), each choice measured on this 2-core CPU:

- patch embedding initialised to PCA-whiten image patches: the per-patch shape read-out sits near chance for a few
  hundred steps before it takes off, and whitening brings the take-off forward (batch 64, 800 steps, val shape
  accuracy at steps 300/500/800: 0.33/0.40/0.60 from a random init, 0.54/0.95/0.99 whitened);
- learning rate held at 3e-3 and decayed linearly over the last 30% only (500 whitened steps: 0.78 shape accuracy
  with a cosine schedule, 0.97 with this one; a cosine schedule from 5e-3 was still at 0.37);
- batch 64 (on the same 25.6k images, 800 steps of batch 32 reached 0.75 shape accuracy, 400 of batch 64 0.90),
  bf16 autocast (a step is 1.6x faster than in fp32: 0.18 s vs
  0.28 s), the math attention kernel (faster than the flash one for 65 tokens), the thread count picked while
  training (:class:`_ThreadPicker`);
- 600 steps on a pool of 20k images generated up front in two processes: on 2 idle cores about 7 s of data,
  107-109 s of training and 118 s in all, with test-split accuracies on foreground patches of 0.976 (shape), 0.998
  (colour), 0.987 (size), background patches 0.997-0.998, object count 0.998-1.0 (seeds 0, 1, 2) while the count
  loss still shaped the features (0.37-0.41 from the detached read-out now). On busy cores
  ``time_limit_s`` stops training early (462 steps in 150 s still gave 0.94 shape accuracy).

Shape letters: B images, H W pixels, P patch side, S = P * P pixels of a patch, Q = 3 * S values of a patch, G patches
per side, N = G * G patches, M patches of a batch, D feature width, O object ids of an image (background included),
A the four per-patch targets (object, shape, colour, size), K classes of a head or principal directions kept.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
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
WHITENING_EPS = 1e-2  # see init_patch_embed_whitening
WHITENING_IMAGES = 2048  # training images whose patches set the whitening
THREAD_PROBE_PERIOD = 50  # steps between two timings of each thread count, see _ThreadPicker
OBJECTIVES = ("classify", "embed", "embed+classify")  # see DemoEncoderConfig.objective
EMBEDDED = (*PATCH_HEADS, "position")  # the attributes of AttributeEmbeddings
HEAD_TERMS = (*PATCH_HEADS, "count", "position")  # the cross-entropies of dense_loss
MIN_COVERAGE = 0.25  # fraction of a patch an object must paint to label it, see patch_targets


@dataclass
class DemoEncoderConfig:
    """Which ViT to pretrain for the demo, and the training recipe.

    Args:
        vit: a ``vit`` preset (its ``image_size`` must equal the data's).
        steps: optimisation steps.
        batch_size: images per step.
        lr: peak AdamW learning rate (see ``decay_fraction``).
        weight_decay: AdamW weight decay on matrices (not on norms, biases, positions or the CLS token).
        warmup_steps: steps of linear warm-up.
        decay_fraction: the last fraction of the run, during which the learning rate decays linearly to 5% of
            ``lr`` (before it, the rate stays at ``lr``: the shape read-out only takes off after a few hundred steps
            at a high rate, and a cosine schedule lowers it too early).
        pool_size: most training images generated up front (uint8, 12 KiB each at 64 px); longer runs revisit them.
        data_workers: processes generating the pool (0: the calling process).
        bf16: forward and backward under bfloat16 autocast.
        position_target: also train a head to read each patch's grid index from its feature, so the features say
            where each patch is: LaVIT's feature decoder places tokens only by their rank in the kept sequence, so
            its reconstruction needs positions carried by the features themselves (EVA-CLIP's do; without this
            target a linear probe finds the exact position of only 32% of the tiny ViT's patches).
        position_grid: what the position target names. None (the default): the cell of the data's object grid
            (``SynthConfig.grid``, 3 x 3) that holds the patch's centre, so the features say which cell a patch is
            in but not where inside it (:func:`patch_position_classes`); objects sit one per cell, so the cell is
            all the scene says about where things are. 0: the patch's own grid index (N classes; the default
            before 2026-11-24: the codes then spent their bits on the 64 patch positions and dropped shape,
            docs/lavit.md). G > 0: the cells of a G x G grid.
        count_target: let the object-count loss shape the features (the count head reads their mean); False (the
            default) trains the count head on detached features, a read-out only: with the count in every patch
            feature the tokenizer's selector read it through its global branch and learned keep offsets per count
            that were not monotonic in the count (docs/lavit.md).
        objective: what shapes the features. "classify": the linear heads' cross-entropies (the heads read the
            features). "embed": the features regress (squared error) onto a fixed target per patch, the sum of one
            random unit vector per attribute value (:class:`AttributeEmbeddings`), and the heads read detached
            features as reports only. Under "classify" colour ended up 15% of the feature variance of object
            patches and the tokenizer's codes dropped it (docs/lavit.md); "embed" fixes every attribute's share.
            "embed+classify": both losses shape the features.
        embed_scales: norm of each attribute's target vectors (keys: object, shape, color, size, position; default
            1 each), e.g. ``{"color": 2}`` gives colour four times the variance of the others.
        head_weights: weight of each cross-entropy of the "classify" objective (keys: object, shape, color, size,
            count, position; default 1 each). A larger weight gives that attribute a larger share of the features.
        whiten_patches: initialise the patch embedding to PCA-whiten the training images' patches
            (:func:`init_patch_embed_whitening`) instead of at random.
        time_limit_s: wall-clock budget of the optimisation loop; when it runs out the learning-rate schedule has
            already decayed to its end (progress is the larger of the step and time fractions) and training stops
            early. 0 = no limit (then the run is a pure function of the seed).
        eval_images: test-split images of the final accuracy report.
        seed: seed of the ViT and head initialisation and of the training image indices.
    """

    vit: str = "tiny"
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    decay_fraction: float = 0.3
    pool_size: int = 20_000
    data_workers: int = 2
    bf16: bool = True
    whiten_patches: bool = True
    position_target: bool = True
    position_grid: int | None = None
    count_target: bool = False
    objective: str = "classify"
    embed_scales: dict[str, float] = field(default_factory=dict)
    head_weights: dict[str, float] = field(default_factory=dict)
    time_limit_s: float = 150.0
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
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"demo_encoder.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.pool_size < self.batch_size:
            raise ConfigError(f"demo_encoder.pool_size: {self.pool_size} is smaller than batch_size {self.batch_size}")
        if self.data_workers < 0:
            raise ConfigError(f"demo_encoder.data_workers: must be >= 0, got {self.data_workers}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"demo_encoder.objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        for name, scale in self.embed_scales.items():
            if name not in EMBEDDED or scale <= 0:
                raise ConfigError(f"demo_encoder.embed_scales: {name}={scale} (keys: {', '.join(EMBEDDED)}; > 0)")
        for name, weight in self.head_weights.items():
            if name not in HEAD_TERMS or weight < 0:
                raise ConfigError(f"demo_encoder.head_weights: {name}={weight} (keys: {', '.join(HEAD_TERMS)}; >= 0)")
        if self.position_grid is not None and not 0 <= self.position_grid <= 8:
            raise ConfigError(f"demo_encoder.position_grid: {self.position_grid} is outside 0..8 (or null)")
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
    ids_NS = rearrange(object_ids, "(gh ph) (gw pw) -> (gh gw) (ph pw)", ph=patch_size, pw=patch_size).astype(np.int64)
    offsets_N1 = num_ids * np.arange(len(ids_NS))[:, None]
    pixels_NO = np.bincount((ids_NS + offsets_N1).ravel(), minlength=len(ids_NS) * num_ids).reshape(-1, num_ids)
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

    def __init__(
        self, synth: SynthConfig, split: str, first: int, count: int, patch_size: int, chunk: int = 256
    ) -> None:
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


def patch_position_classes(num_patches: int, grid: int = 0) -> Tensor:
    """The position class of each patch of a square patch grid (long [N]): its raster index when ``grid`` is 0,
    else the index of the cell of a ``grid`` x ``grid`` layout that holds the patch's centre. No patches (no
    position target): an empty tensor."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"position classes: {num_patches} patches do not form a square grid")
    if grid == 0:
        return torch.arange(num_patches)
    cell_S = ((torch.arange(side) + 0.5) * grid / side).long()
    return (cell_S[:, None] * grid + cell_S[None, :]).flatten()


class PatchHeads(nn.Module):
    """Training-only read-outs of the ViT's patch features: a LayerNorm, then one Linear per patch for the four
    per-patch targets, one on the mean-pooled patches for the object count and, with ``num_patches``, one per patch
    for the patch's own grid position.

    Args:
        dim: D, the ViT width.
        max_objects: the largest object count (the count head has ``max_objects + 1`` classes).
        num_patches: N; 0 = no position head.
        count_grad: whether the count loss reaches the features (False: the count head reads detached features).
        position_grid: the position classes (:func:`patch_position_classes`; 0 = each patch its own class).
    """

    def __init__(
        self, dim: int, max_objects: int, num_patches: int = 0, count_grad: bool = True, position_grid: int = 0
    ) -> None:
        super().__init__()
        self.count_grad = count_grad
        classes_N = patch_position_classes(num_patches, position_grid)
        self.register_buffer("position_class", classes_N, persistent=False)  # [N] target class of each patch
        self.norm = nn.LayerNorm(dim)
        self.patch = nn.Linear(dim, sum(PATCH_HEADS.values()))
        self.count = nn.Linear(dim, max_objects + 1)
        self.position = nn.Linear(dim, int(classes_N.max()) + 1) if num_patches else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Unit/zero LayerNorm, trunc-normal(0.02) weights, zero biases."""
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        for linear in (self.patch, self.count, self.position):
            if linear is None:
                continue
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, feats_BND: Tensor) -> dict[str, Tensor]:
        """Patch features [B, N, D] -> logits ``{"object": [B, N, 2], "shape": [B, N, 5], "color": [B, N, 8],
        "size": [B, N, 2], "count": [B, max_objects + 1]}`` and, with a position head, ``"position": [B, N, P]``
        (P position classes)."""
        x_BND = self.norm(feats_BND)
        logits = dict(zip(PATCH_HEADS, self.patch(x_BND).split(list(PATCH_HEADS.values()), dim=-1), strict=True))
        pooled_BD = x_BND.mean(dim=1)
        logits["count"] = self.count(pooled_BD if self.count_grad else pooled_BD.detach())
        if self.position is not None:
            logits["position"] = self.position(x_BND)
        return logits


class AttributeEmbeddings(nn.Module):
    """Fixed per-patch feature targets of the "embed" objective: the sum of one vector per attribute value.

    Every patch gets its objectness vector and, with ``num_patches``, its grid position's vector; a foreground patch
    adds its object's shape, colour and size vectors. The vectors are random Gaussian rows scaled to unit norm (nearly
    orthogonal at D = 128), drawn from ``seed``, so each attribute contributes the same share of a target's norm
    unless ``scales`` says otherwise.

    Args:
        dim: D, the ViT width.
        num_patches: N (the position table's rows); 0 = no position vectors.
        seed: seed of the tables.
        scales: the norm of each attribute's vectors (default 1).
        position_grid: the position classes (:func:`patch_position_classes`; 0 = each patch its own vector).
    """

    def __init__(
        self, dim: int, num_patches: int, seed: int = 0, scales: dict[str, float] | None = None, position_grid: int = 0
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.with_position = num_patches > 0
        classes_N = patch_position_classes(num_patches, position_grid)
        self.register_buffer("position_class", classes_N, persistent=False)  # [N]
        sizes = {**PATCH_HEADS, "position": int(classes_N.max()) + 1 if num_patches else 1}
        for name, rows in sizes.items():
            table_KD = torch.randn(rows, dim, generator=generator)
            scale = (scales or {}).get(name, 1.0)
            self.register_buffer(name, scale * table_KD / table_KD.norm(dim=-1, keepdim=True), persistent=False)

    def forward(self, targets_BAN: Tensor) -> Tensor:
        """Targets long [B, A, N] from :func:`patch_targets` -> target features [B, N, D] (fp32)."""
        target_BND = self.object[targets_BAN[:, 0]]
        if self.with_position:
            target_BND = target_BND + self.position[self.position_class[None, : targets_BAN.shape[-1]]]
        for i, name in enumerate(("shape", "color", "size"), start=1):
            labels_BN = targets_BAN[:, i]
            known_BN1 = (labels_BN != IGNORE).unsqueeze(-1)
            target_BND = target_BND + known_BN1 * getattr(self, name)[labels_BN.clamp_min(0)]
        return target_BND


def embed_loss(feats_BND: Tensor, targets_BND: Tensor) -> Tensor:
    """The "embed" objective: squared distance to the target, summed over D and averaged over patches (a scalar)."""
    return (feats_BND.float() - targets_BND).square().sum(dim=-1).mean()


def dense_loss(
    logits: dict[str, Tensor],
    targets_BAN: Tensor,
    counts_B: Tensor,
    position_class_N: Tensor | None = None,
    weights: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Sum of the cross-entropies: objectness on every patch, attributes on foreground patches, count per image and,
    when ``logits`` has a position head, every patch's position class (``position_class_N`` long [N]; default its
    own grid index).

    Args:
        logits: :class:`PatchHeads` output.
        targets_BAN: long [B, A, N] from :func:`patch_targets`.
        counts_B: long [B] object counts.
        position_class_N: see above.
        weights: weight of each term in the sum (default 1).

    Returns:
        The weighted sum (a scalar) and each unweighted term as a float.
    """
    terms = {}
    for i, name in enumerate(PATCH_HEADS):
        targets_M = targets_BAN[:, i].flatten()
        logits_MK = rearrange(logits[name].float(), "b n k -> (b n) k")
        summed = F.cross_entropy(logits_MK, targets_M, ignore_index=IGNORE, reduction="sum")
        terms[name] = summed / (targets_M != IGNORE).sum().clamp_min(1)  # a batch without objects gives 0, not NaN
    terms["count"] = F.cross_entropy(logits["count"].float(), counts_B)
    if "position" in logits:
        batch, n = logits["position"].shape[:2]
        classes_N = torch.arange(n) if position_class_N is None else position_class_N
        positions_M = classes_N.to(counts_B.device).repeat(batch)
        terms["position"] = F.cross_entropy(rearrange(logits["position"].float(), "b n k -> (b n) k"), positions_M)
    total = torch.stack([(weights or {}).get(name, 1.0) * value for name, value in terms.items()]).sum()
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
        image), ``foreground_fraction`` and, with a position head, ``position_acc`` (every patch's grid index).
    """
    synth = synth or SynthConfig()
    vit = encoder.model if isinstance(encoder, EvaEncoder) else encoder
    images, targets, counts = make_dense_pool(synth, split, num_images, vit.cfg.patch_size)
    modes = {module: module.training for module in (vit, heads)}
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
        if "position" in predicted:
            grid = heads.position_class
            correct["position"] = correct.get("position", 0) + int((predicted["position"] == grid).sum())
    for module, mode in modes.items():
        module.train(mode)
    num_foreground = int((targets[:, 0] == 1).sum())
    num_background = targets[:, 0].numel() - num_foreground
    metrics = {f"{name}_acc": correct[name] / max(num_foreground, 1) for name in ("shape", "color", "size", "object")}
    metrics["background_acc"] = correct["background"] / max(num_background, 1)
    metrics["count_acc"] = correct["count"] / num_images
    metrics["foreground_fraction"] = num_foreground / targets[:, 0].numel()
    if "position" in correct:
        metrics["position_acc"] = correct["position"] / targets[:, 0].numel()
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def init_patch_embed_whitening(vit: VisionTransformer, pixels_BCHW: Tensor, eps: float = WHITENING_EPS) -> None:
    """Set the patch embedding to whiten image patches (PCA): output channel d projects a patch on the d-th
    principal direction of ``pixels_BCHW``'s patches divided by its standard deviation (plus ``eps``), and the bias
    centres it. With more channels D than patch values C * P * P the extra channels keep their random init.

    Args:
        vit: the ViT whose ``patch_embed`` is overwritten.
        pixels_BCHW: normalised training images [B, 3, H, W] (a few thousand are plenty).
        eps: added to each direction's standard deviation, so the weakest directions (noise) are not blown up.
    """
    size = vit.cfg.patch_size
    patches_MQ = rearrange(pixels_BCHW.float(), "b c (gh ph) (gw pw) -> (b gh gw) (c ph pw)", ph=size, pw=size)
    mean_Q = patches_MQ.mean(dim=0)
    variances_Q, directions_QQ = torch.linalg.eigh(torch.cov((patches_MQ - mean_Q).T))  # ascending
    keep = min(vit.cfg.width, len(mean_Q))
    weight_KQ = directions_QQ[:, -keep:].flip(1).T / (variances_Q[-keep:].flip(0).clamp_min(0).sqrt()[:, None] + eps)
    proj = vit.patch_embed.proj
    proj.weight[:keep] = rearrange(weight_KQ, "k (c ph pw) -> k c ph pw", ph=size, pw=size).to(proj.weight.dtype)
    proj.bias[:keep] = -(weight_KQ @ mean_Q)


def _optimizer(params: list[tuple[str, nn.Parameter]], cfg: DemoEncoderConfig) -> torch.optim.AdamW:
    """AdamW, decaying matrices only: norms, biases, positions and the CLS token are not decayed."""
    decay = [p for name, p in params if p.ndim >= 2 and name not in ("pos_embed", "cls_token")]
    no_decay = [p for name, p in params if not (p.ndim >= 2 and name not in ("pos_embed", "cls_token"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _lr_at(progress: float, step: int, cfg: DemoEncoderConfig) -> float:
    """Warm-up, stable, decay: linear warm-up over ``warmup_steps``, ``cfg.lr`` until ``1 - decay_fraction`` of
    the run, then linear decay to 5% of it as ``progress`` (the larger of the step and time fractions) reaches 1."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    left = 1.0 - progress
    decay = 1.0 if left >= cfg.decay_fraction else 0.05 + 0.95 * max(left, 0.0) / cfg.decay_fraction
    return cfg.lr * warmup * decay


class _ThreadPicker:
    """Chooses the intra-op thread count as training goes: every ``period`` steps one step runs with each candidate
    count, and the fastest runs the rest of the period.

    Why: on a 2-core machine shared with other jobs, two OpenMP threads stall at every barrier whenever one of them
    is descheduled. Measured with another 2-thread job running, a batch-64 step took 0.3-0.37 s on 1 thread and
    0.7-4.1 s on 2; on idle cores 2 threads are ~1.7x faster than 1 (0.18 s).
    """

    def __init__(self, most: int, period: int = THREAD_PROBE_PERIOD) -> None:
        self.candidates = sorted({1, max(most, 1)})
        self.period = period
        self.seconds: dict[int, float] = {}
        self.steps_with: dict[int, int] = dict.fromkeys(self.candidates, 0)

    def threads_for(self, step: int) -> int:
        """Thread count of ``step``; probe phases follow step 0 of each period (whose timing includes warm-up)."""
        phase = step % self.period
        if 1 <= phase <= len(self.candidates):
            return self.candidates[phase - 1]
        return min(self.seconds, key=self.seconds.__getitem__) if self.seconds else self.candidates[-1]

    def record(self, step: int, threads: int, seconds: float) -> None:
        """Note how long ``step`` took with ``threads``."""
        self.steps_with[threads] += 1
        if 1 <= step % self.period <= len(self.candidates):
            self.seconds[threads] = seconds


def _train_step(
    vit: VisionTransformer,
    heads: PatchHeads,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, Tensor],
    bf16: bool,
    embeddings: AttributeEmbeddings | None = None,
    classify: bool = True,
    weights: dict[str, float] | None = None,
) -> float:
    """One AdamW step on a batch (images uint8 [B, H, W, 3], targets int8 [B, A, N], counts int8 [B]); the loss.
    With ``embeddings`` the features also regress onto their targets; without ``classify`` the heads read detached
    features (read-outs only)."""
    images_BHWC, targets_BAN, counts_B = batch
    # the math attention kernel beats the flash one for T = 65 tokens on this CPU (bf16, batch 128: 0.35 s vs 0.40 s)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(SDPBackend.MATH):
        feats_BND = vit.forward_features(pixels_for_vit(images_BHWC))
        logits = heads(feats_BND if classify else feats_BND.detach())
    loss, _ = dense_loss(logits, targets_BAN.long(), counts_B.long(), heads.position_class, weights)
    if embeddings is not None:
        loss = loss + embed_loss(feats_BND, embeddings(targets_BAN.long()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_dense(
    cfg: DemoEncoderConfig, synth: SynthConfig, progress: bool = True
) -> tuple[VisionTransformer, PatchHeads, dict[str, float]]:
    """Train a ViT and its heads from scratch with :func:`dense_loss` (see :func:`pretrain_demo_encoder`).

    Returns:
        The ViT and the heads (both in eval mode) and training statistics: ``steps`` run, ``data_s`` and ``train_s``
        (seconds generating the pool and optimising), ``loss_first`` and ``loss_last`` (mean loss of the first and
        last 10 steps), ``one_thread_steps`` (fraction of the steps :class:`_ThreadPicker` ran on one thread).
    """
    vit_cfg: ViTConfig = get_preset("vit", cfg.vit)
    if vit_cfg.image_size != synth.image_size:
        raise ConfigError(
            f"demo_encoder.vit: preset {cfg.vit!r} takes {vit_cfg.image_size} px images, the data are "
            f"{synth.image_size} px"
        )
    torch.manual_seed(cfg.seed)
    vit = VisionTransformer(vit_cfg).train()
    num_positions = vit.num_patches if cfg.position_target else 0
    grid = synth.grid if cfg.position_grid is None else cfg.position_grid
    heads = PatchHeads(vit_cfg.width, synth.max_objects, num_positions, cfg.count_target, grid).train()
    optimizer = _optimizer([*vit.named_parameters(), *heads.named_parameters()], cfg)
    embeddings, classify = None, "classify" in cfg.objective
    if "embed" in cfg.objective:
        embeddings = AttributeEmbeddings(vit_cfg.width, num_positions, cfg.seed, cfg.embed_scales, grid)
    generator = torch.Generator().manual_seed(cfg.seed)
    threads_before = torch.get_num_threads()
    picker = _ThreadPicker(threads_before)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
    fields = TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}")
    with Progress(*columns, fields, TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("demo encoder: generating data", total=cfg.steps, loss="-", lr="-")
        start = time.perf_counter()
        pool_size = min(cfg.steps * cfg.batch_size, cfg.pool_size)
        pool = make_dense_pool(synth, "train", pool_size, vit_cfg.patch_size, cfg.seed * 10_000_000, cfg.data_workers)
        data_s = time.perf_counter() - start
        if cfg.whiten_patches:
            init_patch_embed_whitening(vit, pixels_for_vit(pool[0][:WHITENING_IMAGES]))
        bar.update(task, description="demo encoder: training")
        order, cursor, step, losses = torch.randperm(pool_size, generator=generator), 0, 0, []
        start = time.perf_counter()
        try:
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
                # step
                threads = picker.threads_for(step)
                torch.set_num_threads(threads)
                step_start = time.perf_counter()
                batch = tuple(t[idx] for t in pool)
                losses.append(
                    _train_step(vit, heads, optimizer, batch, cfg.bf16, embeddings, classify, cfg.head_weights)
                )
                picker.record(step, threads, time.perf_counter() - step_start)
                step += 1
                # log
                bar.update(task, advance=1, loss=f"{np.mean(losses[-10:]):.3f}", lr=f"{lr:.1e}")
        finally:
            torch.set_num_threads(threads_before)
        train_s = time.perf_counter() - start
    stats = {"steps": float(step), "data_s": data_s, "train_s": train_s}
    stats |= {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    stats["one_thread_steps"] = picker.steps_with.get(1, 0) / max(step, 1)
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
