"""Libra for users: captions and answers for images, in batches.

>>> pipe = LibraPipeline.from_pretrained("runs/libra_tiny/instruct")
>>> pipe.caption(["a.png", pil_image])                      # ["two objects: a small red circle ...", ...]
>>> pipe.ask(["a.png"], ["what color is the circle?"])      # ["red"]

Images (paths, encoded bytes, PIL images or uint8 [H, W, 3] arrays) are resized bicubically to the frozen
encoder's input size. The object has the ``caption``/``ask`` interface of :mod:`vlpretrain.eval.lm_quality`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vlpretrain.core.image import ImageLike, as_pil, resize, to_tensor
from vlpretrain.libra.generate import answer_questions, caption_images
from vlpretrain.libra.lm_task import LibraLMTask, load_libra


class LibraPipeline:
    """A loaded Libra LM (stage 1 or 2) with its frozen tokenizer."""

    def __init__(self, task: LibraLMTask) -> None:
        self.task = task.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> LibraPipeline:
        """Load a ``libra-pretrain``/``libra-instruct`` run or checkpoint folder."""
        return cls(load_libra(path, device)[0])

    def preprocess(self, images: Sequence[ImageLike]) -> Tensor:
        """[B, 3, S, S] in [0, 1] at the encoder's size S."""
        size = self.task.tokenizer.image_size
        return torch.stack([to_tensor(resize(as_pil(image), size)) for image in images])

    def caption(self, images: Sequence[ImageLike], batch_size: int = 32, max_new_tokens: int = 64) -> list[str]:
        """A caption per image."""
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size])
            out += caption_images(self.task, pixels, max_new_tokens)
        return out

    def ask(self, images: Sequence[ImageLike], questions: Sequence[str], batch_size: int = 32,
            max_new_tokens: int = 8) -> list[str]:  # fmt: skip
        """An answer per (image, question) pair."""
        if len(images) != len(questions):
            raise ValueError(f"{len(questions)} questions for {len(images)} images")
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size])
            out += answer_questions(self.task, pixels, list(questions[start : start + batch_size]), max_new_tokens)
        return out


__all__ = ["ImageLike", "LibraPipeline", "as_pil"]
