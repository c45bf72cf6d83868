"""Evaluating an LCL encoder on the shapes world through the shared evaluators.

Two labelled image sets are drawn in memory from the shapes-world generator (a tag of their own, so none of them is
a training image): *scenes* (1 to 5 objects, as in the training data) and *objects* (exactly one object).

- Attentive probe (:mod:`vlpretrain.eval.probe`) on the FROZEN encoder's patch tokens (after ``ln_post``): the number
  of objects of a scene, and the colour, shape and size of the object of a single-object image. Probes train on the
  "val" split's images and are scored on the "test" split's.
- Zero-shot classification (:mod:`vlpretrain.eval.zero_shot`): class prompts encoded by the causal LM (its
  prediction at ``<soi>`` after the prompt) against the pooled image latents: object count of scenes; colour and
  shape of single objects, each prompt averaged over the other attributes (prompt ensembling).
- Retrieval recall@K (:mod:`vlpretrain.eval.retrieval`): the test scenes' captions vs their images.

Shape letters: B images, N patches, D encoder width, E latent width.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlpretrain.configs import from_dict
from vlpretrain.core.image import normalize
from vlpretrain.data.synthetic import COLORS, NUMBER_WORDS, SHAPES, SIZES, SynthConfig, make_example
from vlpretrain.errors import UserError
from vlpretrain.eval import probe, retrieval, zero_shot
from vlpretrain.lcl.model import LCLModel
from vlpretrain.lcl.sequences import clip_text_ids
from vlpretrain.lcl.task import LCLTask

COLOR_NAMES = tuple(COLORS)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "count": tuple(NUMBER_WORDS[1:10]),
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "size": SIZES,
}
SCENE_ATTRIBUTES = ("count",)
OBJECT_ATTRIBUTES = ("color", "shape", "size")
_TAG = "lcl-eval"
PROBE_LR = 2e-3  # the probes' AdamW learning rate (cosine-decayed over their epochs)


@dataclass
class LabelledImages:
    """Images with attribute labels: pixels uint8 [B, H, W, 3], labels name -> long [B], one caption per image."""

    images: np.ndarray
    labels: dict[str, Tensor]
    captions: list[str]


@dataclass
class EvalSets:
    """Probe-training and test images: scenes (1..5 objects) and single objects."""

    scenes_train: LabelledImages
    scenes_test: LabelledImages
    objects_train: LabelledImages
    objects_test: LabelledImages


def attribute_labels(record: dict[str, Any]) -> dict[str, int]:
    """Class indices of one shapes-world record (see :data:`ATTRIBUTES`): the object count, and the colour, shape
    and size of the first object in raster order (the only one in a single-object image)."""
    objects = record["objects"]
    first = objects[0]
    return {"count": len(objects) - 1, "color": COLOR_NAMES.index(first["color"]),
            "shape": SHAPES.index(first["shape"]), "size": SIZES.index(first["size"])}  # fmt: skip


def _labelled(records: list[dict[str, Any]], images: list[np.ndarray]) -> LabelledImages:
    rows = [attribute_labels(r) for r in records]
    labels = {name: torch.tensor([row[name] for row in rows]) for name in ATTRIBUTES}
    return LabelledImages(np.stack(images), labels, [r.get("caption", "") for r in records])


def synth_labelled(count: int, split: str, objects: tuple[int, int], base: SynthConfig | None = None) -> LabelledImages:
    """``count`` shapes-world images of ``split`` with ``objects`` = (min, max) objects, generated in memory with the
    other settings (image size, grid, backgrounds) of ``base`` (default: the standard shapes world)."""
    cfg = replace(base or SynthConfig(), min_objects=objects[0], max_objects=objects[1])
    examples = [make_example(cfg, split, i, tag=f"{_TAG}-{objects[0]}-{objects[1]}") for i in range(count)]
    records = [ex.scene.record() | {"caption": ex.caption} for ex in examples]
    return _labelled(records, [ex.image for ex in examples])


def read_synth_config(data_dir: str | Path) -> SynthConfig:
    """The generating config recorded in a shapes-world folder's ``stats.json``."""
    stats = Path(data_dir) / "stats.json"
    if not stats.is_file():
        raise UserError(f"{data_dir}: no stats.json (not a folder written by `vlpretrain data synth`)")
    return from_dict(SynthConfig, json.loads(stats.read_text())["config"])


def synth_eval_sets(train: int = 2000, test: int = 1000, base: SynthConfig | None = None) -> EvalSets:
    """The evaluation images, drawn like ``base``'s (the training data's config): scenes with its object counts and
    single objects; probes train on "val" images and are tested on "test" images."""
    base = base or SynthConfig()
    scenes = (base.min_objects, base.max_objects)
    return EvalSets(synth_labelled(train, "val", scenes, base), synth_labelled(test, "test", scenes, base),
                    synth_labelled(train, "val", (1, 1), base), synth_labelled(test, "test", (1, 1), base))  # fmt: skip


def image_batches(model: LCLModel, images: np.ndarray, batch_size: int = 128) -> Iterator[Tensor]:
    """Normalised pixel batches [B, 3, S, S] of uint8 images (resized to the encoder's input side)."""
    size = model.cfg.vit.image_size
    for first in range(0, len(images), batch_size):
        x = torch.from_numpy(images[first : first + batch_size]).permute(0, 3, 1, 2).float().div(255.0)
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        yield normalize(x)


@torch.no_grad()
def patch_features(model: LCLModel, images: np.ndarray) -> Tensor:
    """The frozen encoder's patch tokens [B, N, D] (fp32)."""
    model.eval()
    return torch.cat([model.visual(x).float() for x in image_batches(model, images)])


@torch.no_grad()
def encode_texts(model: LCLTask, texts: list[str], batch_size: int = 256) -> Tensor:
    """l2-normalised text embeddings [T, E] (``<sot> text <soi>``, the LM's prediction of the coming image)."""
    if model.tokenizer is None:
        raise ValueError("encode_texts: the model has no text tokenizer")
    vocab, out = model.vocab, []
    for first in range(0, len(texts), batch_size):
        rows = [clip_text_ids(model.tokenizer(t, add_special_tokens=False).input_ids, vocab, model.cfg.max_len)
                for t in texts[first : first + batch_size]]  # fmt: skip
        ids_BL = torch.full((len(rows), max(map(len, rows))), vocab.pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids_BL[i, : len(row)] = torch.tensor(row)
        out.append(model.encode_text(ids_BL))
    return torch.cat(out)


def probe_attributes(model: LCLModel, sets: EvalSets, config: probe.ProbeConfig | None = None) -> dict[str, float]:
    """Attentive-probe test accuracy per attribute (``probe_<name>``) and their mean (``probe_mean``)."""
    config = config or probe.ProbeConfig(kind="attentive")
    metrics = {}
    for names, train, test in ((SCENE_ATTRIBUTES, sets.scenes_train, sets.scenes_test),
                               (OBJECT_ATTRIBUTES, sets.objects_train, sets.objects_test)):  # fmt: skip
        train_BND, test_BND = patch_features(model, train.images), patch_features(model, test.images)
        for name in names:
            classes = _num_classes(name, train, test)
            result = probe.run((train_BND, train.labels[name]), (test_BND, test.labels[name]), classes, config)
            metrics[f"probe_{name}"] = result[f"probe_{config.kind}_top1"]
    metrics["probe_mean"] = float(np.mean([metrics[f"probe_{n}"] for n in ATTRIBUTES]))
    return metrics


def _num_classes(name: str, *splits: LabelledImages) -> int:
    """Classes of an attribute: all colours, shapes, sizes; counts up to the largest one in the splits."""
    if name == "count":
        return int(max(int(s.labels["count"].max()) for s in splits)) + 1
    return len(ATTRIBUTES[name])


def _zero_shot_prompts(attribute: str, data: LabelledImages) -> tuple[list[str], list[str]]:
    """(class names, templates) of one zero-shot task; templates spell out the other attributes of one object."""
    if attribute == "count":
        words = ATTRIBUTES["count"][: _num_classes("count", data)]
        names = [f"{w} object" + ("" if i == 0 else "s") for i, w in enumerate(words)]
        return names, ["{}:"]
    if attribute == "color":
        return list(COLOR_NAMES), [f"one object: a {size} {{}} {shape}" for size in SIZES for shape in SHAPES]
    return list(SHAPES), [f"one object: a {size} {color} {{}}" for size in SIZES for color in COLOR_NAMES]


def zero_shot_attributes(model: LCLTask, sets: EvalSets) -> dict[str, float]:
    """Zero-shot top-1 accuracy: ``zero_shot_count`` on the test scenes, ``zero_shot_color``/``zero_shot_shape`` on
    the test objects."""
    metrics = {}
    for name, data in (("count", sets.scenes_test), ("color", sets.objects_test), ("shape", sets.objects_test)):
        names, templates = _zero_shot_prompts(name, data)
        batches = list(zip(image_batches(model, data.images), data.labels[name].split(128), strict=True))
        with torch.no_grad():
            result = zero_shot.run(lambda t: encode_texts(model, t), model.image_embeddings, batches, names,
                                   templates, topk=(1,))  # fmt: skip
        metrics[f"zero_shot_{name}"] = result["zero_shot_top1"]
    return metrics


@torch.no_grad()
def retrieval_recall(model: LCLTask, data: LabelledImages) -> dict[str, float]:
    """Recall@1/5/10 between the split's images and their captions (``retrieval_*``)."""
    model.eval()
    image_IE = torch.cat([model.image_embeddings(x) for x in image_batches(model, data.images)])
    text_TE = encode_texts(model, data.captions)
    metrics = retrieval.recall_at_k(image_IE, text_TE, torch.arange(len(data.captions)))
    return {f"retrieval_{k}": v for k, v in metrics.items() if k not in ("images", "texts")}


def evaluate(
    model: LCLModel, sets: EvalSets, text: bool = True, config: probe.ProbeConfig | None = None
) -> dict[str, float]:
    """Probe accuracies, and with ``text`` (and a tokenizer) zero-shot accuracies and retrieval recall on the test
    scenes."""
    metrics = probe_attributes(model, sets, config)
    if text and getattr(model, "tokenizer", None) is not None:
        metrics |= zero_shot_attributes(model, sets) | retrieval_recall(model, sets.scenes_test)
    return metrics


__all__ = [
    "ATTRIBUTES",
    "EvalSets",
    "LabelledImages",
    "attribute_labels",
    "encode_texts",
    "evaluate",
    "patch_features",
    "probe_attributes",
    "read_synth_config",
    "retrieval_recall",
    "synth_eval_sets",
    "synth_labelled",
    "zero_shot_attributes",
]
