"""Images coming into the web UI: uploaded files checked and decoded, and shapes-world examples drawn on request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlpretrain.errors import UserError

NO_IMAGE = "no image: upload one (PNG, JPEG, WebP, ...) or draw a shapes-world example first"


def read_image(value: str | Path | Image.Image | np.ndarray | None) -> Image.Image:
    """The RGB image of an upload (gradio passes the path of its copy), a PIL image or a uint8 [H, W, 3] array.

    Raises:
        UserError: nothing uploaded, or a file that is not a usable image (corrupt, too small, too large); the
            message names the file by its base name, not gradio's temporary path.
    """
    from vlpretrain.core.image import ImageError, as_pil

    if value is None or (isinstance(value, str) and not value):
        raise UserError(NO_IMAGE)
    try:
        return as_pil(value)
    except ImageError as err:
        path, name = str(value), Path(str(value)).name  # the server's copy: show the file's name only
        reason = str(err).removeprefix(f"{path}: ").replace(path, name)
        raise UserError(f"the upload '{name}' is not a usable image: {reason}") from err
    except ValueError as err:
        raise UserError(f"not a usable image: {err}") from err


@dataclass(frozen=True)
class Example:
    """A shapes-world test image with its ground truth: the caption and one question with its answer."""

    image: Image.Image
    caption: str
    question: str
    answer: str


def shapes_example(index: int) -> Example:
    """Test-split image ``index`` of the default shapes world (the same picture for the same index, everywhere)."""
    from vlpretrain.data.synthetic import SynthConfig, make_example

    if index < 0:
        raise UserError(f"example number {index}: must be >= 0")
    example = make_example(SynthConfig(), "test", int(index))
    qa = example.qa[0]
    return Example(Image.fromarray(example.image), example.caption, qa["question"], qa["answer"])


def describe_example(example: Example) -> str:
    """Markdown ground truth shown under a drawn example."""
    return f"**Ground truth:** {example.caption}  \n*{example.question}* → {example.answer}"


__all__ = ["NO_IMAGE", "Example", "describe_example", "read_image", "shapes_example"]
