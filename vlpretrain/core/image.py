"""Pixels: decode with Pillow, resize, convert to tensors and normalise. The only place pixels are touched.

Shape letters: C channels (3, RGB), H height, W width, B batch.

Decoding accepts any Pillow mode and returns RGB: transparent images (RGBA, LA, palette with transparency) are
composited on white, 16-bit grayscale is scaled to 8 bits, everything else goes through ``convert("RGB")``.
Images smaller than 2x2 or larger than 10^8 pixels (decompression bombs) are rejected with an :class:`ImageError`
whose ``reason`` says which.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MAX_PIXELS = 100_000_000
MIN_SIDE = 2
WHITE = (255, 255, 255)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ImageLike = str | Path | bytes | Image.Image | np.ndarray  # what the user-facing APIs accept as an image


class ImageError(ValueError):
    """An image that cannot be used.

    Args:
        message: what is wrong.
        reason: ``"corrupt_image"``, ``"missing_image"``, ``"image_too_small"`` or ``"image_too_large"``.
    """

    def __init__(self, message: str, reason: str = "corrupt_image") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep ``reason`` across process boundaries
        return (type(self), (str(self), self.reason))


def load_image(
    source: bytes | str | os.PathLike, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> Image.Image:
    """Decode an image file or encoded bytes to an RGB Pillow image.

    Args:
        source: encoded bytes (PNG, JPEG, WebP, BMP, ...) or a path.
        max_pixels: reject images with more pixels than this (checked from the header, before decoding).
        min_side: reject images whose width or height is below this.

    Returns:
        An RGB image of the original size.

    Raises:
        ImageError: unreadable or truncated data (``corrupt_image``), too small or too large.
    """
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    fileobj = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            # Our own limit (max_pixels) replaces Pillow's warning threshold; its hard error still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fileobj)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} exceeds {max_pixels} pixels", reason="image_too_large")
        if width < min_side or height < min_side:
            raise ImageError(f"{name}: {width}x{height} is below {min_side}x{min_side}", reason="image_too_small")
        image.load()
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: {exc}", reason="image_too_large") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: no such file", reason="missing_image") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: cannot decode image: {exc}", reason="corrupt_image") from exc


def as_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image (any mode) or a uint8 [H, W, 3] array.

    Raises:
        ValueError: an array that is not uint8 [H, W, 3].
        ImageError: a path or bytes that :func:`load_image` cannot decode.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"array images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    return load_image(image)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on ``background``."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: keep the high byte (convert("L") would clip instead of scale). Mode "I" is also used
        # for 8-bit data, so it is scaled only when it holds values above 255.
        gray = np.asarray(image).astype(np.int64)
        if image.mode != "I" or gray.max(initial=0) > 255:
            gray = gray >> 8
        return Image.fromarray(gray.clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def resize(
    image: Image.Image, size: int | tuple[int, int], resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Resize to ``size`` (an int means size x size; a tuple is (width, height)), bicubic by default."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    if image.size == target:
        return image
    return image.resize(target, resample=resample)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Downscale so that the shorter side is at most ``size``, keeping the aspect ratio (bicubic)."""
    width, height = image.size
    scale = size / min(width, height)
    if scale >= 1.0:
        return image
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(target, resample=Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> Tensor:
    """RGB Pillow image to a float tensor.

    Returns:
        float32 [C=3, H, W] in [0, 1].
    """
    array_HWC = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array_HWC.copy()).permute(2, 0, 1).float().div_(255.0)


def to_pil(x_CHW: Tensor) -> Image.Image:
    """The inverse of :func:`to_tensor`: float [3, H, W] in [0, 1] (values are clamped) to an RGB image."""
    if x_CHW.ndim != 3 or x_CHW.shape[0] != 3:
        raise ValueError(f"to_pil: expected a [3, H, W] tensor, got shape {tuple(x_CHW.shape)}")
    array_HWC = (x_CHW.detach().float().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array_HWC, mode="RGB")


def normalize(x: Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> Tensor:
    """Per-channel ``(x - mean) / std``.

    Args:
        x: float [..., 3, H, W] (e.g. [3, H, W] or [B, 3, H, W]) in [0, 1].
        mean: 3 channel means.
        std: 3 channel standard deviations.

    Returns:
        A new tensor of the same shape.
    """
    mean_C11, std_C11 = _channel_stats(x, mean, std)
    return (x - mean_C11) / std_C11


def denormalize(x: Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> Tensor:
    """The inverse of :func:`normalize`: ``x * std + mean`` for float [..., 3, H, W]."""
    mean_C11, std_C11 = _channel_stats(x, mean, std)
    return x * std_C11 + mean_C11


def _channel_stats(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize: expected [..., 3, H, W], got shape {tuple(x.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"normalize: mean and std need 3 values, got {len(mean)} and {len(std)}")
    mean_C11 = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std_C11 = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return mean_C11, std_C11
