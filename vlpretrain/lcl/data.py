"""LCL's data: pair shards, MMC4 and OBELICS documents -> batches of sequences (or of pairs for the CLIP baseline).

Decoding (in the data workers) loads each image and tokenises each text; collating draws the random choices of the
batch (image before or after its text, crops) from a generator seeded by the data seed and the batch's keys, so a
batch is a pure function of its samples (exact resume) while an image's layout changes from epoch to epoch.

Batches:
- sequence objectives (lcl, gen, emu): ``{"pixels": [I, 3, S, S], "input_ids": [B, L], "keys": [B]}``; the images
  of all rows in reading order (image i fills the i-th image block), rows right-padded to the longest one;
- CLIP-style objective: ``{"pixels": [I, 3, S, S], "input_ids": [I, L], "keys": [I]}``, one text row
  ``<sot> text <soi>`` per image; from documents, each image with its sentence.

Shape letters: I images, S image side, B rows, L the batch's longest row.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlpretrain.core.image import load_image, normalize, to_tensor
from vlpretrain.data.errors import DataError
from vlpretrain.data.interleaved import MMC4Dataset, ObelicsDataset, local_files
from vlpretrain.data.shards import image_member, sample_caption
from vlpretrain.lcl.config import LCLConfig
from vlpretrain.lcl.sequences import (
    clip_text_ids,
    document_ids,
    document_pairs,
    pair_ids,
    place_images,
)
from vlpretrain.lcl.vocab import LCLVocab

_DOC_SUFFIXES = {".jsonl": "mmc4", ".gz": "mmc4", ".zip": "mmc4", ".parquet": "obelics"}


def resolve_format(fmt: str, spec: str) -> str:
    """The data format of ``spec``: ``fmt`` itself unless "auto", which reads the first file's suffix."""
    if fmt != "auto":
        return fmt
    first = spec.split("::")[0].split(",")[0]
    return _DOC_SUFFIXES.get(Path(first).suffix, "pairs")


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> Image.Image:
    """A random crop of ``scale`` of the area (aspect ratio in [3/4, 4/3]) resized to ``size`` (bicubic); with
    scale (1, 1) just the resize."""
    width, height = image.size
    if scale[0] < 1.0:
        for _ in range(10):
            area = width * height * rng.uniform(*scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                image = image.crop((left, top, left + w, top + h))
                break
    return image.resize((size, size), Image.Resampling.BICUBIC)


class LCLCollate:
    """Decode raw samples / documents and collate them into LCL batches (picklable; see the module docstring).

    Args:
        cfg: the task config (objective, layout probabilities, crop, sizes).
        vocab: token ids.
        tokenizer: the text tokenizer.
        fmt: "pairs", "mmc4" or "obelics".
        train: random crops (else a plain resize).
        seed: data seed.
    """

    def __init__(self, cfg: LCLConfig, vocab: LCLVocab, tokenizer: Any, fmt: str, train: bool, seed: int) -> None:
        self.cfg, self.vocab, self.tokenizer, self.fmt, self.train, self.seed = cfg, vocab, tokenizer, fmt, train, seed

    # ---- decode (data workers)
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A pair sample -> ``{"key", "items": [("image", PIL), ("text", ids)]}``; a document -> the same with its
        items in reading order."""
        if self.fmt == "pairs":
            caption = sample_caption(raw)
            if not caption:
                raise DataError(f"key={raw.get('__key__')}: empty caption", reason="missing_caption")
            image = load_image(image_member(raw)[1])
            return {"key": raw["__key__"], "items": [("text", self.tokenize(caption)), ("image", image)]}
        items = [("image", it["image"]) if it["type"] == "image" else ("text", self.tokenize(it["text"]))
                 for it in raw["items"]]  # fmt: skip
        return {"key": raw["key"], "items": items}

    # ---- collate
    def pixels(self, images: list[Image.Image], rng: random.Random) -> Tensor:
        """Normalised [I, 3, S, S] of PIL images (random-resized crops when training)."""
        size = self.cfg.vit.image_size
        scale = tuple(self.cfg.data.crop_scale) if self.train else (1.0, 1.0)
        if not images:
            return torch.zeros(0, 3, size, size)
        return normalize(torch.stack([to_tensor(random_resized_crop(im, size, scale, rng)) for im in images]))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rng = random.Random(f"lcl:{self.seed}:{'|'.join(ex['key'] for ex in examples)}")
        rows, images = self._clip_rows(examples) if self.cfg.objective == "clip" else self._rows(examples, rng)
        return {"pixels": self.pixels(images, rng), "input_ids": self._pad(rows),
                "keys": [ex["key"] for ex in examples]}  # fmt: skip

    def _rows(self, examples: list[dict[str, Any]], rng: random.Random) -> tuple[list[list[int]], list]:
        n, max_len, prob = self.cfg.vit.num_patches, self.cfg.max_len, self.cfg.data.image_first_prob
        rows, images = [], []
        for ex in examples:
            if self.fmt == "pairs" or self.cfg.data.documents_as_pairs:
                for image, text in self._pairs(ex):
                    rows.append(pair_ids(text, self.vocab, n, rng.random() < prob, max_len))
                    images.append(image)
                continue
            items = place_images(ex["items"], prob, rng) if self.fmt == "mmc4" else ex["items"]
            ids, kept = document_ids(items, self.vocab, n, max_len)
            rows.append(ids)
            images += kept
        return rows, images

    def _pairs(self, example: dict[str, Any]) -> list[tuple[Any, list[int]]]:
        """(image, text ids) of a pair sample, or of each image of a document with its sentence."""
        if self.fmt == "pairs":
            (_, text), (_, image) = example["items"]
            return [(image, text)]
        return document_pairs(example["items"], image_after_text=self.fmt != "obelics")

    def _clip_rows(self, examples: list[dict[str, Any]]) -> tuple[list[list[int]], list]:
        rows, images = [], []
        for ex in examples:
            for image, text in document_pairs(ex["items"], image_after_text=self.fmt != "obelics"):
                rows.append(clip_text_ids(text, self.vocab, self.cfg.max_len))
                images.append(image)
        return rows, images

    def _pad(self, rows: list[list[int]]) -> Tensor:
        length = max((len(r) for r in rows), default=1)
        ids_BL = torch.full((len(rows), length), self.vocab.pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids_BL[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids_BL


def build_lcl_dataset(
    cfg: LCLConfig, vocab: LCLVocab, tokenizer: Any, data_cfg: Any, split: str, rank: int, world_size: int
) -> Any:
    """The resumable stream of LCL batches over ``data_cfg.train`` (split "train": shuffled, looping) or
    ``data_cfg.val`` (in order, looping), in the format of ``cfg.data.format``."""
    from vlpretrain.train.streams import pair_dataset

    train = split == "train"
    spec = data_cfg.train if train else data_cfg.val
    fmt = resolve_format(cfg.data.format, spec)
    collate = LCLCollate(cfg, vocab, tokenizer, fmt, train, data_cfg.seed)
    if fmt == "pairs":
        return pair_dataset(data_cfg, split, rank, world_size, decode=collate.decode, collate=collate)
    stream: dict[str, Any] = dict(batch_size=data_cfg.batch_size, collate=collate, seed=data_cfg.seed, infinite=True,
                                  shuffle_buffer=data_cfg.shuffle_buffer if train else 0, drop_last=True, rank=rank,
                                  world_size=world_size)  # fmt: skip
    if fmt == "obelics":
        return ObelicsDataset(spec, collate.decode, **stream)
    image_dir = cfg.data.image_dir or str(Path(local_files(spec)[0]).parent / "doc_images")
    return MMC4Dataset(spec, image_dir, collate.decode, min_sim=cfg.data.min_sim, max_images=cfg.data.max_images,
                       image_first_prob=0.0, **stream)  # fmt: skip


__all__ = ["LCLCollate", "build_lcl_dataset", "random_resized_crop", "resolve_format"]
