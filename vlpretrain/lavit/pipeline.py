"""The unified LM for users: captions, answers and images, in batches.

>>> pipe = Pipeline.from_pretrained("runs/demo/lm")                 # + its tokenizer (and detokenizer, if recorded)
>>> pipe.caption(["a.png", pil_image])                              # ["two objects: a small red circle ...", ...]
>>> pipe.ask(["a.png"], ["what color is the circle?"])              # ["red"]
>>> out = pipe.generate(["one object: a large blue square in the center."], seed=0)
>>> out.codes, out.images                                           # [K_b] codes each; [B, 3, S, S] in [0, 1]
>>> best = pipe.generate(prompts, candidates=4)                    # best of 4 drawings by the LM's caption score

Images are decoded and resized like the tokenizer's input (:class:`vlpretrain.lavit.api.Tokenizer`). Generation is
seeded per prompt (prompt i draws from ``seed + i``), so a prompt gives the same image whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vlpretrain.core.image import ImageLike
from vlpretrain.lavit.api import Tokenizer
from vlpretrain.lavit.generate import (
    SamplingConfig,
    answer_questions,
    caption_images,
    generate_codes,
    text_to_image_prompt,
)
from vlpretrain.lavit.lm_task import LavitLMTask, load_lm
from vlpretrain.lavit.rerank import CANDIDATE_SEED_STRIDE, Scorer, caption_logprob, pick_best

if TYPE_CHECKING:
    from vlpretrain.lavit.detokenizer_api import Detokenizer

MULTIMODAL_GUIDANCE = 5.0  # the official guidance for image + text prompts (4.0 for text alone)


@dataclass
class Generated:
    """Generated images: ``codes`` ([K_b] visual codes each) and, with a detokenizer, ``images`` [B, 3, S, S].
    When several candidates were drawn per prompt: ``scores`` [B], the kept drawing's score, and ``candidates``, every
    drawing (candidate j's codes and images for all prompts; candidate 0 is the single drawing)."""

    codes: list[Tensor]
    images: Tensor | None
    scores: Tensor | None = None
    candidates: list[Generated] = field(default_factory=list)


class Pipeline:
    """A loaded unified LM with its frozen tokenizer and, optionally, a detokenizer for pixels.

    Args:
        model: the ``lavit-lm`` task in eval mode.
        detokenizer: a :class:`~vlpretrain.lavit.detokenizer_api.Detokenizer` paired with the same tokenizer, or None.
    """

    def __init__(self, model: LavitLMTask, detokenizer: Detokenizer | None = None) -> None:
        self.model = model.eval()
        self.images = Tokenizer(model.tokenizer)
        self.detokenizer = detokenizer

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer: str | Path | None = None,
        detokenizer: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> Pipeline:
        """Load a ``lavit-lm`` folder; ``tokenizer``/``detokenizer`` default to the folders its config records.

        A recorded detokenizer that is not there is skipped (captions and answers need none); a given one must exist.
        """
        model, _ = load_lm(path, tokenizer, device)
        detok_path = detokenizer if detokenizer is not None else model.cfg.detokenizer
        if detokenizer is None and detok_path and not Path(detok_path).exists():
            detok_path = ""
        detok = None
        if detok_path:
            from vlpretrain.lavit.detokenizer_api import Detokenizer

            detok = Detokenizer.from_pretrained(detok_path, tokenizer=model.tokenizer, device=device)
        return cls(model, detok)

    def pixels(self, images: Sequence[ImageLike]) -> Tensor:
        """[B, 3, S, S] in [0, 1] at the tokenizer's size; a file that cannot be decoded raises ValueError naming it."""
        return self.images.preprocess(list(images))

    def caption(self, images: Sequence[ImageLike], batch_size: int = 16, num_beams: int = 2,
                min_new_tokens: int = 8, max_new_tokens: int = 36) -> list[str]:  # fmt: skip
        """One caption per image."""
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = self.pixels(images[start : start + batch_size])
            out += caption_images(self.model, chunk, num_beams, min_new_tokens, max_new_tokens)
        return out

    def ask(self, images: Sequence[ImageLike], questions: Sequence[str], batch_size: int = 16, num_beams: int = 5,
            min_new_tokens: int = 1, max_new_tokens: int = 10) -> list[str]:  # fmt: skip
        """One answer per (image, question)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = self.pixels(images[start : start + batch_size])
            out += answer_questions(self.model, chunk, list(questions[start : start + batch_size]), num_beams,
                                    min_new_tokens, max_new_tokens)  # fmt: skip
        return out

    def prompts(self, texts: Sequence[str], images: Sequence[ImageLike | None] | None = None) -> list[list[int]]:
        """Token ids of text-to-image prompts; where an image is given, a multimodal prompt (its codes first)."""
        images = list(images) if images is not None else [None] * len(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(images)} images")
        given = [i for i, im in enumerate(images) if im is not None]
        codes = self.images.encode([images[i] for i in given]) if given else []
        by_index = dict(zip(given, codes, strict=True))
        return [text_to_image_prompt(self.model, t, by_index.get(i)) for i, t in enumerate(texts)]

    def generate_codes(
        self,
        texts: Sequence[str],
        images: Sequence[ImageLike | None] | None = None,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        batch_size: int = 16,
    ) -> list[Tensor]:
        """Visual codes of one image per prompt (guidance 5.0 by default when the prompt has an image)."""
        prompts = self.prompts(texts, images)
        out: list[Tensor] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            cfg = sampling or SamplingConfig()
            if sampling is None and images is not None and any(im is not None for im in images):
                cfg = replace(cfg, guidance_scale=MULTIMODAL_GUIDANCE)
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            out += generate_codes(self.model, chunk, cfg, gens).codes
        return out

    def caption_score(self, images: Sequence[ImageLike] | Tensor, texts: Sequence[str], batch_size: int = 16) -> Tensor:
        """[B] log-probability of each text as the caption of its image (the default best-of-N scorer)."""
        pixels = images if isinstance(images, Tensor) else self.pixels(images)
        if len(texts) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(texts)} texts")
        chunks = [caption_logprob(self.model, pixels[s : s + batch_size], list(texts[s : s + batch_size]))
                  for s in range(0, len(texts), batch_size)]  # fmt: skip
        return torch.cat(chunks) if chunks else torch.zeros(0)

    def generate(self, texts: Sequence[str], images: Sequence[ImageLike | None] | None = None,
                 sampling: SamplingConfig | None = None, seed: int = 0, batch_size: int = 16,
                 decoder_steps: int | None = None, decoder_guidance: float | None = None, candidates: int = 1,
                 scorer: Scorer | None = None) -> Generated:  # fmt: skip
        """Codes, and pixels when a detokenizer is loaded (its sampling seeded by ``seed`` too).

        ``candidates`` > 1 draws that many images per prompt (candidate j as a call seeded ``seed + j *
        CANDIDATE_SEED_STRIDE`` would, :mod:`vlpretrain.lavit.rerank`; candidate 0 is the single drawing) and keeps
        the one ``scorer(images [B, 3, S, S], texts) -> [B]`` rates highest, by default :meth:`caption_score` (the
        official evaluation keeps the best of 4 by CLIP score).
        """
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if candidates > 1 and self.detokenizer is None:
            raise ValueError("choosing among several drawings needs pixels: load a detokenizer")
        draws = [self._draw(texts, images, sampling, seed + j * CANDIDATE_SEED_STRIDE, batch_size, decoder_steps,
                            decoder_guidance) for j in range(candidates)]  # fmt: skip
        if candidates == 1:
            return draws[0]
        score = scorer or (lambda pixels, prompts: self.caption_score(pixels, prompts, batch_size))
        scores_NB = torch.stack([score(d.images, list(texts)).float().cpu() for d in draws])
        best = pick_best(scores_NB).tolist()
        codes = [draws[j].codes[b] for b, j in enumerate(best)]
        pixels = torch.stack([draws[j].images[b] for b, j in enumerate(best)])
        return Generated(codes, pixels, scores_NB.max(dim=0).values, draws)

    def _draw(self, texts: Sequence[str], images: Sequence[ImageLike | None] | None, sampling: SamplingConfig | None,
              seed: int, batch_size: int, decoder_steps: int | None,
              decoder_guidance: float | None) -> Generated:  # fmt: skip
        """One drawing per prompt."""
        codes = self.generate_codes(texts, images, sampling, seed, batch_size)
        if self.detokenizer is None:
            return Generated(codes, None)
        if any(len(c) == 0 for c in codes):
            raise ValueError("a generated image has no visual token (min_tokens = 0?); nothing to decode")
        pixels = self.detokenizer.decode(codes, guidance_scale=decoder_guidance, steps=decoder_steps, seed=seed,
                                         batch_size=batch_size)  # fmt: skip
        return Generated(codes, pixels)


__all__ = ["Generated", "Pipeline"]
