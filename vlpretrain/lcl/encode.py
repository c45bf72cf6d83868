"""Export image features of an LCL encoder: a tensor file (safetensors or npy) plus a JSON index of its rows.

Sources: a folder of image files (searched recursively, sorted by relative path), a single image file, or webdataset
pair shards (a ``.tar`` spec or a folder holding ``*.tar``; rows keyed by sample key). Unreadable images are skipped
and counted in the index. Each image is resized (bicubic, no crop) to the encoder's side and normalised.

Kinds: ``embedding`` (the l2-normalised pooled latent [I, E], the image side of retrieval), ``patches`` (the
encoder's patch tokens after ``ln_post`` [I, N, D], what the probes read) and ``tokens`` (the projected tokens the
causal LM reads [I, N, E]).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from vlpretrain.core.image import ImageError, load_image, normalize, resize, to_tensor
from vlpretrain.data.errors import DataError, SkipCounter
from vlpretrain.data.shards import IMAGE_EXTS, expand_urls, image_member, read_pair_shard
from vlpretrain.errors import UserError
from vlpretrain.lcl.model import LCLModel
from vlpretrain.progress import progress_bar

Kind = Literal["embedding", "patches", "tokens"]
KINDS = ("embedding", "patches", "tokens")
FORMATS = ("safetensors", "npy")


def iter_images(source: str | Path, counter: SkipCounter) -> Iterator[tuple[str, str, bytes | Path]]:
    """(key, origin, encoded image) of every image of ``source`` (see the module docstring)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTS:
        yield path.name, str(path), path
        return
    if path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        if not files:
            raise UserError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) and no .tar shards")
        for file in files:
            yield str(file.relative_to(path)), str(file), file
        return
    try:
        urls = expand_urls(str(source))
    except DataError as err:
        raise UserError(f"{source}: {err}") from err
    for url in urls:
        for sample in read_pair_shard(url, counter, require_caption=False):
            try:
                yield sample["__key__"], url, image_member(sample)[1]
            except DataError as err:
                counter.skip(err.reason or "missing_image", url, sample["__key__"], str(err))


@torch.no_grad()
def features(model: LCLModel, pixels_ICHW: Tensor, kind: Kind) -> Tensor:
    """The features of one normalised batch: [I, E] (embedding) or [I, N, D|E] (patches, tokens)."""
    if kind == "embedding":
        return model.image_embeddings(pixels_ICHW)
    patches_IND = model.visual(pixels_ICHW)
    return patches_IND.float() if kind == "patches" else model.pool(patches_IND)[1].float()


def encode_images(
    model: LCLModel, source: str | Path, kind: Kind = "embedding", batch_size: int = 64, progress: bool = False
) -> tuple[Tensor, list[dict[str, Any]], dict[str, int]]:
    """(features [I, ...] fp32, one ``{"row", "key", "source"}`` per row, skipped counts by reason)."""
    if kind not in KINDS:
        raise UserError(f"--kind: '{kind}' is not one of {', '.join(KINDS)}")
    model.eval()
    size, counter = model.cfg.vit.image_size, SkipCounter()
    rows: list[dict[str, Any]] = []
    outputs, batch = [], []
    with progress_bar("encode images", total=0, enabled=progress) as advance:
        for key, origin, data in iter_images(source, counter):
            try:
                batch.append(to_tensor(resize(load_image(data), size)))
            except ImageError as err:
                counter.skip(err.reason, origin, key, str(err))
                continue
            rows.append({"row": len(rows), "key": key, "source": origin})
            if len(batch) == batch_size:
                outputs.append(features(model, normalize(torch.stack(batch)), kind))
                batch = []
                advance(1)
        if batch:
            outputs.append(features(model, normalize(torch.stack(batch)), kind))
    if not rows:
        raise UserError(f"{source}: no readable images")
    return torch.cat(outputs), rows, dict(counter.counts)


def write_features(
    features_I: Tensor, rows: list[dict[str, Any]], out_dir: str | Path, fmt: str, meta: dict[str, Any]
) -> Path:
    """Write ``features.safetensors`` (key ``features``) or ``features.npy`` and ``index.json``; returns the index."""
    if fmt not in FORMATS:
        raise UserError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"features.{fmt}"
    if fmt == "npy":
        np.save(out / name, features_I.numpy())
    else:
        from safetensors.torch import save_file

        save_file({"features": features_I.contiguous()}, str(out / name))
    index = {"file": name, "format": fmt, "shape": list(features_I.shape), "dtype": "float32", **meta, "items": rows}
    path = out / "index.json"
    path.write_text(json.dumps(index, indent=1) + "\n")
    return path


__all__ = ["FORMATS", "KINDS", "encode_images", "features", "iter_images", "write_features"]
