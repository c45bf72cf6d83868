"""The tokenizer for users: images in any form -> visual token ids, ids -> features, keep-mask pictures.

>>> tok = Tokenizer.from_pretrained("runs/demo/tokenizer")
>>> ids = tok.encode(["cat.png", pil_image])          # list of [K_b] long tensors
>>> feats = tok.decode_features(ids)                   # [B, N, D] reconstructed encoder features
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from vlpretrain.core.image import ImageLike, as_pil, resize, to_tensor
from vlpretrain.lavit.tokenizer import DynamicTokenizer
from vlpretrain.train.pretrained import load_task


class Tokenizer:
    """A trained :class:`DynamicTokenizer` with image preprocessing (resize to the encoder's size, bicubic)."""

    def __init__(self, model: DynamicTokenizer) -> None:
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
        """Load a ``lavit-tokenizer`` checkpoint folder (or run folder, or converted official weights)."""
        task, _ = load_task(path, expect_task="lavit-tokenizer")
        return cls(task.tokenizer.to(device))

    @property
    def device(self) -> torch.device:
        return self.model.decoder.pos_embed.device

    @property
    def image_size(self) -> int:
        return self.model.encoder.image_size

    def preprocess(self, images: Sequence[ImageLike]) -> Tensor:
        """[B, 3, S, S] in [0, 1] at the encoder's size S."""
        if not len(images):
            raise ValueError("no images given")
        return torch.stack([to_tensor(resize(as_pil(im), self.image_size)) for im in images]).to(self.device)

    def encode_with_masks(self, images: Sequence[ImageLike], batch_size: int = 64) -> tuple[list[Tensor], Tensor]:
        """Token ids per image and the keep masks [B, N] (bool)."""
        ids: list[Tensor] = []
        masks = []
        for start in range(0, len(images), batch_size):
            batch_ids, keep = self.model.tokenize(self.preprocess(images[start : start + batch_size]))
            ids += [s.cpu() for s in batch_ids]
            masks.append(keep.cpu())
        return ids, torch.cat(masks)

    def encode(self, images: Sequence[ImageLike], batch_size: int = 64) -> list[Tensor]:
        """Visual token ids (codebook indices) of each image: a list of [K_b] long tensors."""
        return self.encode_with_masks(images, batch_size)[0]

    def decode_features(self, ids: Sequence[Tensor]) -> Tensor:
        """Reconstructed encoder patch features [B, N, D] from token ids."""
        return self.model.decode_codes([torch.as_tensor(s, dtype=torch.long, device=self.device) for s in ids])


def keep_overlay(image: ImageLike, keep_N: Tensor, scale: int = 4) -> Image.Image:
    """The image enlarged ``scale`` times, dropped patches darkened, kept patches outlined, token count written."""
    pil = as_pil(image)
    grid = int(round(len(keep_N) ** 0.5))
    size = pil.width * scale
    big = pil.resize((size, size), Image.NEAREST)
    shade = Image.new("RGB", big.size, (0, 0, 0))
    mask = Image.new("L", (grid, grid))
    mask.putdata([0 if k else 150 for k in keep_N.tolist()])
    big = Image.composite(shade, big, mask.resize(big.size, Image.NEAREST))
    draw, cell = ImageDraw.Draw(big), size / grid
    for i, k in enumerate(keep_N.tolist()):
        if k:
            r, c = divmod(i, grid)
            draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 255, 0))
    draw.text((3, 2), f"{int(keep_N.sum())} tokens", fill=(255, 255, 255))
    return big


def overlay_grid(images: Sequence[ImageLike], masks: Tensor, columns: int = 8, scale: int = 4) -> Image.Image:
    """Keep-mask overlays of several images in one picture."""
    tiles = [keep_overlay(im, m, scale) for im, m in zip(images, masks, strict=True)]
    w = tiles[0].width
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (w * min(columns, len(tiles)), w * rows), (20, 20, 20))
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((w, w)), ((i % columns) * w, (i // columns) * w))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    """PNG-encoded bytes of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["Tokenizer", "as_pil", "keep_overlay", "overlay_grid", "png_bytes"]
