"""The Generate tab: a text prompt (optionally after an image) -> visual tokens from the LM -> pixels from the
detokenizer, reporting progress as it goes.

Progress is counted, not estimated: a forward hook counts the LM's decoding steps (one call per visual token, cond and
uncond batched) and the UNet's calls (one per DDIM step), so the bar moves with the real work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from vlpretrain.errors import UserError
from vlpretrain.web.session import Session
from vlpretrain.web.understand import ImageInput
from vlpretrain.web.uploads import read_image

if TYPE_CHECKING:
    from torch import nn

Report = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)
OUTPUT_SIDE = 256  # generated images are enlarged (nearest) to about this many pixels for the page


@dataclass(frozen=True)
class GenerateSettings:
    """The sampling controls: ``guidance`` is the LM's classifier-free guidance (official: 4.0, 5.0 with an image),
    ``top_k`` 0 = off, ``steps`` the detokenizer's DDIM steps."""

    seed: int = 0
    guidance: float = 4.0
    top_k: int = 50
    steps: int = 25


@dataclass(frozen=True)
class Generation:
    """The result: the image (None without a detokenizer) and the visual code ids it was drawn from."""

    image: Image.Image | None
    codes: list[int]

    def summary(self) -> str:
        drawn = "" if self.image is not None else " (no detokenizer loaded: the tokens are not drawn)"
        return f"{len(self.codes)} visual tokens{drawn}: " + " ".join(str(c) for c in self.codes)


@contextmanager
def count_calls(module: nn.Module, on_call: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_call(n)`` after the n-th forward of ``module`` while the block runs."""
    calls = 0

    def hook(*_: object) -> None:
        nonlocal calls
        calls += 1
        on_call(calls)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _sampling(settings: GenerateSettings):
    from vlpretrain.lavit.generate import SamplingConfig

    if settings.steps < 1:
        raise UserError(f"steps: {settings.steps} must be >= 1")
    try:
        return SamplingConfig(top_k=int(settings.top_k), guidance_scale=float(settings.guidance))
    except ValueError as err:
        raise UserError(f"guidance {settings.guidance}, top-k {settings.top_k}: {err}") from err


def generate(session: Session, prompt: str, image: ImageInput = None, settings: GenerateSettings | None = None,
             report: Report | None = None) -> Generation:  # fmt: skip
    """Draw one image for ``prompt`` (after ``image``'s visual tokens when one is given).

    Raises:
        UserError: no model, an empty prompt, an unusable image or bad settings.
    """
    from vlpretrain.core.image import to_pil
    from vlpretrain.lavit.generate import visual_length_limits

    settings = settings or GenerateSettings()
    report = report or (lambda fraction, text: None)
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty: describe the image, e.g. 'one object: a large red circle.'")
    sampling = _sampling(settings)
    prefix = read_image(image) if image is not None else None
    pipe = session.pipeline
    most = visual_length_limits(pipe.model.tokenizer.num_patches)[1] + 1  # decoding steps at most
    drawing = pipe.detokenizer is not None
    share = 0.5 if drawing else 1.0  # of the bar for the tokens
    report(0.0, "sampling visual tokens")
    with count_calls(pipe.model.lm, lambda n: report(share * min(n / most, 1.0), f"visual token {n}")):
        try:
            codes = pipe.generate_codes([prompt.strip()], [prefix], sampling, int(settings.seed))[0]
        except ValueError as err:  # a prompt past the LM's context
            raise UserError(str(err)) from err
    if not drawing:
        return Generation(None, codes.tolist())
    if len(codes) == 0:  # cannot happen with the default limits (at least one token per image)
        raise UserError("the LM ended the image before any visual token: there is nothing to draw")
    steps = int(settings.steps)
    with count_calls(pipe.detokenizer.model.unet, lambda n: report(0.5 + 0.5 * min(n / steps, 1.0),
                                                                   f"DDIM step {n}/{steps}")):  # fmt: skip
        pixels = pipe.detokenizer.decode([codes], steps=steps, seed=int(settings.seed))
    picture = to_pil(pixels[0])
    scale = max(1, OUTPUT_SIDE // picture.width)
    return Generation(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST), codes.tolist())


__all__ = ["GenerateSettings", "Generation", "count_calls", "generate"]
