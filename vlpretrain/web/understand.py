"""The Caption and Ask tabs: the unified LM reads the image and writes text (beam search, as ``vlpretrain caption``
and ``vlpretrain ask``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlpretrain.errors import UserError
from vlpretrain.web.session import Session
from vlpretrain.web.uploads import read_image

ImageInput = str | Path | Image.Image | np.ndarray | None


def caption(session: Session, image: ImageInput, beams: int = 2, max_new_tokens: int = 36) -> str:
    """A caption of the image.

    Raises:
        UserError: no model, no image, an unusable image, or bad settings.
    """
    if beams < 1 or max_new_tokens < 1:
        raise UserError(f"beams ({beams}) and max new tokens ({max_new_tokens}) must be >= 1")
    pil = read_image(image)
    pipe = session.pipeline
    try:
        text = pipe.caption([pil], num_beams=int(beams), min_new_tokens=min(8, int(max_new_tokens)),
                            max_new_tokens=int(max_new_tokens))[0]  # fmt: skip
    except ValueError as err:  # e.g. a prompt past the LM's context
        raise UserError(str(err)) from err
    return text or "(the model wrote an empty caption)"


def ask(session: Session, image: ImageInput, question: str, beams: int = 5) -> str:
    """The answer to a question about the image (the official prompt "Question: {q} Answer:").

    Raises:
        UserError: no model, no image, an unusable image, or an empty question.
    """
    if not question or not question.strip():
        raise UserError("the question is empty: type one, e.g. 'how many objects are there?'")
    if beams < 1:
        raise UserError(f"beams ({beams}) must be >= 1")
    pil = read_image(image)
    pipe = session.pipeline
    try:
        answer = pipe.ask([pil], [question.strip()], num_beams=int(beams))[0]
    except ValueError as err:
        raise UserError(str(err)) from err
    return answer or "(the model wrote an empty answer)"


__all__ = ["ask", "caption"]
