"""The detokenizer for users: visual token ids -> images, and images -> tokens -> images.

>>> detok = Detokenizer.from_pretrained("runs/demo/detokenizer")     # loads the tokenizer it records, too
>>> images = detok.decode(ids, guidance_scale=3.0, steps=25, seed=0)  # [B, 3, S, S] in [0, 1]
>>> recon = detok.reconstruct(["cat.png", pil_image])                # the same, from images

Sampling is deterministic: the initial noise of the whole call is drawn at once on the CPU from ``seed`` (or a given
generator), so the same call gives the same images whatever the batch size or device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlpretrain.core.image import ImageLike, as_pil, resize, to_pil
from vlpretrain.lavit.api import Tokenizer
from vlpretrain.lavit.detokenizer import DiffusionDecoder
from vlpretrain.lavit.detokenizer_task import LavitDetokenizerTask, load_detokenizer
from vlpretrain.lavit.tokenizer import DynamicTokenizer

TokenIds = Tensor | Sequence[int] | np.ndarray


class Detokenizer:
    """A trained diffusion decoder paired with its tokenizer.

    Args:
        task: the loaded ``lavit-detokenizer`` task (decoder + frozen tokenizer).
        bf16: run the UNet under bf16 autocast when sampling (about 2x faster on a CPU; fp32 by default).
    """

    def __init__(self, task: LavitDetokenizerTask, bf16: bool = False) -> None:
        self.task = task.eval()
        self.tokenizer = Tokenizer(task.tokenizer)
        self.bf16 = bf16

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer: str | Path | Tokenizer | DynamicTokenizer | None = None,
        device: str | torch.device = "cpu",
        bf16: bool = False,
    ) -> Detokenizer:
        """Load a ``lavit-detokenizer`` folder (checkpoint, run or converted).

        Args:
            path: the folder.
            tokenizer: the paired tokenizer (object or folder); None = the folder recorded in its config.
            device: where to run.
            bf16: see the class.
        """
        if isinstance(tokenizer, Tokenizer):
            tokenizer = tokenizer.model
        task, _ = load_detokenizer(path, tokenizer)
        task.to(device)
        task.tokenizer.to(device)
        return cls(task, bf16)

    @property
    def model(self) -> DiffusionDecoder:
        return self.task.detokenizer

    @property
    def device(self) -> torch.device:
        return self.task.tokenizer_digest.device

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    def check_ids(self, token_ids: Sequence[TokenIds]) -> list[Tensor]:
        """The sequences as 1-d long tensors on the device; a ValueError names the first bad one.

        Each must be non-empty, of integers in [0, codebook size), and at most N (patches) long.
        """
        if len(token_ids) == 0:
            raise ValueError("decode: no token sequences given")
        size, limit = self.task.tokenizer.cfg.codebook_size, self.task.tokenizer.num_patches
        out = []
        for b, seq in enumerate(token_ids):
            ids = torch.as_tensor(seq)
            if ids.ndim == 1 and len(ids) == 0:
                raise ValueError(f"sequence {b}: empty (an image needs at least one visual token)")
            if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(
                    f"sequence {b}: expected a 1-d sequence of integer ids, got {ids.dtype} {list(ids.shape)}"
                )
            if len(ids) > limit:
                raise ValueError(f"sequence {b}: {len(ids)} tokens, more than the tokenizer's {limit} patches")
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= size:
                bad = low if low < 0 else high
                raise ValueError(f"sequence {b}: token id {bad} is outside the codebook [0, {size})")
            out.append(ids.to(device=self.device, dtype=torch.long))
        return out

    @torch.no_grad()
    def decode(
        self,
        token_ids: Sequence[TokenIds],
        guidance_scale: float | None = None,
        steps: int | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        batch_size: int = 16,
        batched_cfg: bool = True,
    ) -> Tensor:
        """Images drawn from visual token ids.

        Args:
            token_ids: one sequence of codebook ids per image ([K_b] tensors, lists or arrays).
            guidance_scale: classifier-free guidance scale; None = the config's (1 = off).
            steps: DDIM steps; None = the config's.
            seed: seeds the initial noise when no ``generator`` is given.
            generator: a CPU generator for the initial noise (advanced by this call).
            batch_size: images per sampling batch (does not change the result).
            batched_cfg: cond and uncond in one UNet call (True) or two (same result, for comparison).

        Returns:
            float [B, 3, S, S] in [0, 1] on the CPU.
        """
        ids = self.check_ids(token_ids)
        cfg = self.model.cfg
        scale = cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = cfg.sample_steps if steps is None else int(steps)
        if scale < 0 or steps < 1:
            raise ValueError(f"guidance_scale must be >= 0 and steps >= 1, got {scale} and {steps}")
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        noise_BZHW = self.model.initial_noise(len(ids), generator)
        out = []
        for start in range(0, len(ids), batch_size):
            feats_BND = self.task.tokenizer_on(self.device).decode_codes(ids[start : start + batch_size]).float()
            noise = noise_BZHW[start : start + batch_size]
            out.append(self.model.sample(feats_BND, noise, steps, scale, batched_cfg, self.bf16).cpu())
        return torch.cat(out)

    def encode(self, images: Sequence[ImageLike]) -> list[Tensor]:
        """Visual token ids of each image (the paired tokenizer's)."""
        return self.tokenizer.encode(images)

    def reconstruct(
        self,
        images: Sequence[ImageLike],
        guidance_scale: float | None = None,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int = 16,
    ) -> Tensor:
        """image -> tokens -> image: float [B, 3, S, S] in [0, 1]; the options are :meth:`decode`'s."""
        return self.decode(self.encode(images), guidance_scale, steps, seed, batch_size=batch_size)


def side_by_side(original: ImageLike, reconstruction_3SS: Tensor, gap: int = 4) -> Image.Image:
    """original | reconstruction as one RGB picture (the original resized to the reconstruction's side S)."""
    side = reconstruction_3SS.shape[-1]
    left = resize(as_pil(original), side)
    sheet = Image.new("RGB", (2 * side + gap, side), (255, 255, 255))
    sheet.paste(left, (0, 0))
    sheet.paste(to_pil(reconstruction_3SS.float().clamp(0, 1)), (side + gap, 0))
    return sheet


__all__ = ["Detokenizer", "side_by_side"]
