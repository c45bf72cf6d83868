"""The Tokens tab: LaVIT's dynamic tokenisation of the image (which patches the selector keeps, and their code ids)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from vlpretrain.web.session import Session
from vlpretrain.web.understand import ImageInput
from vlpretrain.web.uploads import read_image

OVERLAY_SIDE = 256  # the overlay is enlarged (nearest) to about this many pixels


@dataclass(frozen=True)
class TokenView:
    """One image's tokenisation: the keep-mask overlay, the kept-token count of ``patches``, and the code ids."""

    overlay: Image.Image
    count: int
    patches: int
    ids: list[int]

    def summary(self) -> str:
        """e.g. "21 visual tokens: 21 of 64 patches kept (33%)"."""
        return (f"{self.count} visual tokens: {self.count} of {self.patches} patches kept "
                f"({100 * self.count / self.patches:.0f}%)")  # fmt: skip

    def ids_text(self) -> str:
        """The code ids, space-separated, in patch order (row-major)."""
        return " ".join(str(i) for i in self.ids)


def tokenize(session: Session, image: ImageInput) -> TokenView:
    """Tokenise the image with the checkpoint's tokenizer (deterministic keep decisions, as at inference).

    Raises:
        UserError: no model, no image or an unusable image.
    """
    from vlpretrain.core.image import resize
    from vlpretrain.lavit.api import keep_overlay

    pil = read_image(image)
    tok = session.pipeline.images
    ids, keep_BN = tok.encode_with_masks([pil])
    small = resize(pil, tok.image_size)  # the overlay's grid is over the tokenizer's input
    overlay = keep_overlay(small, keep_BN[0], scale=max(1, OVERLAY_SIDE // tok.image_size))
    return TokenView(overlay, len(ids[0]), keep_BN.shape[1], ids[0].tolist())


__all__ = ["TokenView", "tokenize"]
