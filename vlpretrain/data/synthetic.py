"""Shapes world: the built-in synthetic data set for the demo, the tests and the benchmarks.

An image is a G x G grid (default 3 x 3) holding 1..N objects, each a (shape, colour, size) in its own cell, drawn
over a plain, gradient or textured dark background. Every image comes with ground truth: a caption naming the
objects and one spatial relation, question-answer pairs (colour, shape, count, position, yes/no) and a JSON record.

Everything is a pure function of ``(seed, split, index)``: the same call gives the same pixels and text on any machine
and in any process, so generation parallelises without changing the output.

Writing (``write_shapes_world``) produces webdataset shards in img2dataset layout and MMC4-style interleaved
documents; see docs/data.md.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlpretrain.configs import ConfigError, register_preset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "orange": (250, 140, 20),
    "cyan": (40, 220, 220),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "texture")
SPLITS: tuple[str, ...] = ("train", "val", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_POSITION_NAMES_3 = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_RADIUS = {"small": 0.25, "large": 0.42}  # fraction of the cell side
DOC_INTRO = "a short story about shapes."
DOC_FILLERS = (
    "here is another picture.",
    "the next image is different.",
    "we keep looking at shapes.",
    "some shapes are small and some are large.",
    "look closely at the colors.",
)
_DEFAULT_HELD_OUT = ["red triangle", "blue circle", "green square", "yellow diamond", "purple cross"]


@dataclass
class SynthConfig:
    """How to generate a shapes-world data set.

    Args:
        image_size: side of the square images in pixels (8..224).
        grid: objects sit in the cells of a grid x grid layout.
        min_objects, max_objects: number of objects per image, uniform in this range.
        background_probs: probability of each background kind (plain, gradient, texture).
        jitter: random offset of an object's centre, as a fraction of the cell side.
        num_train, num_val, num_test: number of paired images per split.
        docs_train, docs_val, docs_test: number of interleaved documents per split.
        doc_images: min and max images per interleaved document.
        compositional: hold the ``held_out`` colour-shape pairs out of train/val; every test image contains one.
        held_out: "colour shape" pairs used by the compositional split.
        shard_size: samples per tar shard.
        seed: the data set seed.
        yesno_pairs: training images get both a "yes" and a "no" question ("is there a ...?") instead of one; the
            extra question comes last, after draws that leave every other field as without it. Val and test keep
            one, so their question mix does not change.
    """

    image_size: int = 64
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 5
    background_probs: dict[str, float] = field(default_factory=lambda: {"plain": 0.5, "gradient": 0.3, "texture": 0.2})
    jitter: float = 0.08
    num_train: int = 5000
    num_val: int = 500
    num_test: int = 500
    docs_train: int = 500
    docs_val: int = 50
    docs_test: int = 50
    doc_images: list[int] = field(default_factory=lambda: [2, 4])
    compositional: bool = False
    held_out: list[str] = field(default_factory=lambda: list(_DEFAULT_HELD_OUT))
    shard_size: int = 1000
    seed: int = 0
    yesno_pairs: bool = False

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 224:
            raise ConfigError(f"image_size: {self.image_size} is outside 8..224")
        if not 1 <= self.grid <= 8:
            raise ConfigError(f"grid: {self.grid} is outside 1..8")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ConfigError(f"min_objects/max_objects: need 1 <= {self.min_objects} <= {self.max_objects} <= grid^2")
        unknown = set(self.background_probs) - set(BACKGROUNDS)
        if unknown or sum(self.background_probs.values()) <= 0:
            raise ConfigError(f"background_probs: kinds must be among {BACKGROUNDS} with a positive total")
        if len(self.doc_images) != 2 or not 1 <= self.doc_images[0] <= self.doc_images[1]:
            raise ConfigError(f"doc_images: expected [min, max] with 1 <= min <= max, got {self.doc_images}")
        for pair in self.held_out:
            parts = pair.split()
            if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
                raise ConfigError(f"held_out: '{pair}' is not a 'colour shape' pair")
        for name in ("num_train", "num_val", "num_test", "docs_train", "docs_val", "docs_test"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if self.shard_size < 1:
            raise ConfigError("shard_size: must be >= 1")

    def count(self, split: str) -> int:
        """Number of paired images in ``split``."""
        return getattr(self, f"num_{split}")

    def docs(self, split: str) -> int:
        """Number of interleaved documents in ``split``."""
        return getattr(self, f"docs_{split}")


@register_preset("synth", "tiny")
def synth_tiny() -> SynthConfig:
    """A few hundred images: unit tests and smoke runs."""
    return SynthConfig(num_train=256, num_val=64, num_test=64, docs_train=32, docs_val=8, docs_test=8, shard_size=64)


@register_preset("synth", "demo")
def synth_demo() -> SynthConfig:
    """The data set of `vlpretrain demo`: 40,000 training pairs (about 15 s and 190 MB), so that the LM's
    generation steps see most images once instead of memorising a few thousand (docs/lm.md, "More images"); each
    training image has a "yes" and a "no" question (docs/lm.md, "Yes and no about the same image")."""
    return SynthConfig(num_train=40_000, yesno_pairs=True)


@register_preset("synth", "large")
def synth_large() -> SynthConfig:
    """More and larger images, for longer runs."""
    return SynthConfig(image_size=128, num_train=100_000, num_val=2000, num_test=2000, docs_train=10_000)


@dataclass(frozen=True)
class ShapeObject:
    """One object: its attributes and its grid cell."""

    shape: str
    color: str
    size: str
    row: int
    col: int


@dataclass
class Scene:
    """Ground truth of one image: objects in raster order, background and geometry."""

    key: str
    objects: list[ShapeObject]
    background: dict[str, Any]
    image_size: int
    grid: int

    def record(self) -> dict[str, Any]:
        """The JSON ground-truth record of the scene."""
        return {
            "key": self.key,
            "image_size": self.image_size,
            "grid": self.grid,
            "background": self.background,
            "objects": [dataclasses.asdict(o) for o in self.objects],
        }


@dataclass
class Example:
    """A rendered image with its text: ``image`` is uint8 [H, W, 3]."""

    image: np.ndarray
    scene: Scene
    caption: str
    qa: list[dict[str, str]]


def example_rng(seed: int, split: str, index: int, tag: str = "img") -> random.Random:
    """The per-example random generator; string seeds are hashed with SHA-512, stable across processes."""
    return random.Random(f"shapes-world/{seed}/{split}/{tag}/{index}")


def _allowed(cfg: SynthConfig, split: str) -> tuple[set[tuple[str, str]], bool]:
    """Colour-shape pairs allowed in ``split``, and whether the split must contain a held-out pair."""
    held = {tuple(p.split()) for p in cfg.held_out} if cfg.compositional else set()
    everything = {(c, s) for c in COLORS for s in SHAPES}
    if split == "test" and held:
        return everything, True
    return everything - held, False


def sample_scene(cfg: SynthConfig, split: str, index: int, rng: random.Random, key: str | None = None) -> Scene:
    """Draw the objects and background of one scene from ``rng``."""
    allowed, need_held = _allowed(cfg, split)
    pairs = sorted(allowed)
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(cfg.grid * cfg.grid), n))
    chosen = [rng.choice(pairs) for _ in cells]
    if need_held:
        held = sorted(tuple(p.split()) for p in cfg.held_out)
        chosen[rng.randrange(n)] = rng.choice(held)
    objects = [
        ShapeObject(shape=s, color=c, size=rng.choice(SIZES), row=cell // cfg.grid, col=cell % cfg.grid)
        for cell, (c, s) in zip(cells, chosen, strict=True)
    ]
    kinds = sorted(cfg.background_probs)
    kind = rng.choices(kinds, weights=[cfg.background_probs[k] for k in kinds])[0]
    background = {"kind": kind, "seed": rng.getrandbits(32)}
    return Scene(key or f"{split}_{index:08d}", objects, background, cfg.image_size, cfg.grid)


def _background(bg: dict[str, Any], size: int) -> np.ndarray:
    """Dark background pixels, uint8 [size, size, 3]; channel values stay below 100 so objects stand out."""
    g = np.random.default_rng(bg["seed"])
    base = g.integers(10, 70, size=3).astype(np.float32)
    if bg["kind"] == "plain":
        return np.broadcast_to(base, (size, size, 3)).astype(np.uint8)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if bg["kind"] == "gradient":
        other = g.integers(10, 90, size=3).astype(np.float32)
        angle = g.uniform(0, 2 * math.pi)
        t = (xs * math.cos(angle) + ys * math.sin(angle) + 1.5) / 3.0
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (base + (other - base) * t[..., None]).astype(np.uint8)
    period = int(g.integers(3, 9)) / size
    pattern = g.integers(0, 3)
    if pattern == 0:  # checker
        mask = ((xs // period).astype(int) + (ys // period).astype(int)) % 2
    elif pattern == 1:  # stripes
        mask = ((xs + ys) // period).astype(int) % 2
    else:  # noise
        mask = g.random((size, size))
    return (base + 25.0 * mask[..., None]).astype(np.uint8)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred on (cx, cy) with half-extent r (circle is handled separately)."""
    if shape == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        a, b = 0.35 * r, r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]  # fmt: skip
    raise ValueError(f"unknown shape '{shape}'")


def render_scene(scene: Scene, rng: random.Random, jitter: float) -> np.ndarray:
    """Draw a scene; returns uint8 [H, W, 3]. ``rng`` only moves object centres by up to ``jitter`` cells."""
    size, cell = scene.image_size, scene.image_size / scene.grid
    img = Image.fromarray(_background(scene.background, size))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        r = _RADIUS[obj.size] * cell
        cx = (obj.col + 0.5 + rng.uniform(-jitter, jitter)) * cell
        cy = (obj.row + 0.5 + rng.uniform(-jitter, jitter)) * cell
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=color)
    return np.array(img)  # writable (torch.from_numpy warns on read-only arrays)


def position_name(obj: ShapeObject, grid: int) -> str:
    """Words for a grid cell: 'top left' .. 'bottom right' on a 3x3 grid, else 'row R column C'."""
    if grid == 3:
        return _POSITION_NAMES_3[obj.row][obj.col]
    if grid == 2:
        return f"{('top', 'bottom')[obj.row]} {('left', 'right')[obj.col]}"
    return f"row {obj.row + 1} column {obj.col + 1}"


def _place(obj: ShapeObject, grid: int) -> str:
    name = position_name(obj, grid)
    return f"in the {name}" if name == "center" else f"at the {name}"


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Spatial relation of a to b along the axis on which they differ most."""
    dx, dy = a.col - b.col, a.row - b.row
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count_phrase(n: int, noun: str) -> str:
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {noun}" + ("" if n == 1 else "s")


def make_caption(scene: Scene, rng: random.Random) -> str:
    """One or two lower-case sentences: every object with size, colour, shape and place, plus one relation."""
    objs = scene.objects
    parts = [f"a {o.size} {o.color} {o.shape} {_place(o, scene.grid)}" for o in objs]
    text = f"{_count_phrase(len(objs), 'object')}: {_join(parts)}."
    if len(objs) >= 2:
        a, b = rng.sample(objs, 2)
        text += f" the {a.color} {a.shape} is {_relation(a, b)} the {b.color} {b.shape}."
    return text


def make_qa(scene: Scene, rng: random.Random, yesno_pair: bool = False) -> list[dict[str, str]]:
    """Question-answer pairs of five types; a type is left out when the scene makes its question ambiguous.
    ``yesno_pair``: a second yes/no question, with the other answer, comes last."""
    objs = scene.objects
    qa = [{"type": "count", "question": "how many objects are there?", "answer": NUMBER_WORDS[len(objs)]}]
    by_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    if by_shape:
        o = rng.choice(by_shape)
        qa.append({"type": "color", "question": f"what color is the {o.shape}?", "answer": o.color})
    by_color = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    if by_color:
        o = rng.choice(by_color)
        qa.append({"type": "shape", "question": f"what shape is the {o.color} object?", "answer": o.shape})
    unique = [o for o in objs if sum((p.color, p.shape) == (o.color, o.shape) for p in objs) == 1]
    if unique:
        o = rng.choice(unique)
        qa.append({"type": "position", "question": f"where is the {o.color} {o.shape}?",
                   "answer": position_name(o, scene.grid)})  # fmt: skip
    present = rng.random() < 0.5
    qa.append(_yesno(scene, rng, present))
    if yesno_pair:
        qa.append(_yesno(scene, rng, not present))
    return qa


def _yesno(scene: Scene, rng: random.Random, present: bool) -> dict[str, str]:
    """'is there a {colour} {shape}?' about a colour-shape pair the scene has (``present``) or lacks."""
    pairs = {(o.color, o.shape) for o in scene.objects}
    if not present:
        pairs = {(c, s) for c in COLORS for s in SHAPES} - pairs
    c, s = rng.choice(sorted(pairs))
    return {"type": "yesno", "question": f"is there a {c} {s}?", "answer": "yes" if present else "no"}


def make_example(cfg: SynthConfig, split: str, index: int, tag: str = "img", key: str | None = None) -> Example:
    """Generate example ``index`` of ``split``: pixels, scene, caption and QA, all from one seeded generator."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    rng = example_rng(cfg.seed, split, index, tag)
    scene = sample_scene(cfg, split, index, rng, key)
    image = render_scene(scene, rng, cfg.jitter)
    caption = make_caption(scene, rng)  # before the questions: both draw from rng
    return Example(image, scene, caption, make_qa(scene, rng, yesno_pair=cfg.yesno_pairs and split == "train"))


def make_document(cfg: SynthConfig, split: str, index: int) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """One MMC4-style document and its images ``[(image_name, png_bytes)]``.

    Each image is matched to its caption sentence (similarity 0.25..0.40); some documents carry an extra
    distractor image with similarity below 0.24, which LCL's MMC4 filter drops.
    """
    rng = example_rng(cfg.seed, split, index, tag="doc")
    n_images = rng.randint(cfg.doc_images[0], cfg.doc_images[1])
    texts: list[str] = [DOC_INTRO]
    info: list[dict[str, Any]] = []
    images: list[tuple[str, bytes]] = []
    for j in range(n_images):
        name = f"{split}_doc{index:06d}_{j}.png"
        ex = make_example(cfg, split, index * 16 + j, tag="docimg", key=name[:-4])
        if j > 0 and rng.random() < 0.5:
            texts.append(rng.choice(DOC_FILLERS))
        info.append(
            {"image_name": name, "matched_text_index": len(texts), "matched_sim": round(rng.uniform(0.25, 0.4), 4)}
        )
        texts.append(ex.caption)
        images.append((name, encode_png(ex.image)))
    if rng.random() < 0.3:
        name = f"{split}_doc{index:06d}_x.png"
        ex = make_example(cfg, split, index * 16 + 15, tag="docimg", key=name[:-4])
        info.append({"image_name": name, "matched_text_index": 0, "matched_sim": round(rng.uniform(0.05, 0.2), 4)})
        images.append((name, encode_png(ex.image)))
    doc = {"doc_id": f"{split}_doc{index:06d}", "text_list": texts, "image_info": info}
    return doc, images


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] array (fast compression: these images are tiny)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
