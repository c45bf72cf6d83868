"""Fixed routing by token type: text rows through one function, image rows through another.

There is no learned router: a boolean per position (True = image) says which weights a row meets. :class:`Routing`
sorts the rows of a [B, L] grid once per forward pass, text rows first (a stable sort, so each modality keeps its
order), and the layers keep the residual stream in that order: routing a row-wise function is then two slices and
one concatenation, and only attention needs the grid layout back (one gather in, one out). Each function sees only
its own rows, so an image row never touches a text weight and vice versa (tests check it by gradients).

When every row is of one modality nothing is sorted: the stream stays a [B, L, D] grid and the function runs on it
as it is, so a batch without images is the unmodified text computation, bit for bit.

Shape letters: B batch, L positions, M = B * L rows (text rows first), D input width, E output width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

RowFn = Callable[[Tensor], Tensor]


class Routing:
    """The text/image split of a [B, L] grid and the row order used between attention calls.

    Args:
        vision_BL: boolean [B, L], True at image positions.
    """

    def __init__(self, vision_BL: Tensor) -> None:
        self.vision_BL = vision_BL
        self.shape = tuple(vision_BL.shape)
        flat = vision_BL.reshape(-1)
        self.num_image = int(flat.sum())
        self.num_text = flat.numel() - self.num_image
        self.mixed = self.num_text > 0 and self.num_image > 0
        if self.mixed:
            self.order = torch.argsort(flat.to(torch.uint8), stable=True)  # text rows first
            self.inverse = torch.empty_like(self.order)
            self.inverse[self.order] = torch.arange(len(self.order), device=flat.device)

    @property
    def has_text(self) -> bool:
        return self.num_text > 0

    @property
    def has_image(self) -> bool:
        return self.num_image > 0

    def image_span(self) -> tuple[int, int]:
        """[lo, hi): the columns that hold an image position in some row."""
        columns = self.vision_BL.any(dim=0).nonzero().flatten()
        return int(columns[0]), int(columns[-1]) + 1

    def rows(self, x_BLD: Tensor) -> Tensor:
        """Grid [B, L, D] -> the stream's layout: sorted rows [M, D] when mixed, else the grid itself."""
        if not self.mixed:
            return x_BLD
        return x_BLD.reshape(-1, x_BLD.shape[-1]).index_select(0, self.order)

    def grid(self, x_MD: Tensor) -> Tensor:
        """Inverse of :meth:`rows`: the stream's layout -> [B, L, D]."""
        if not self.mixed:
            return x_MD
        return x_MD.index_select(0, self.inverse).view(*self.shape, x_MD.shape[-1])

    def apply(self, x_MD: Tensor, text_fn: RowFn, image_fn: RowFn) -> Tensor:
        """``text_fn`` on the text rows and ``image_fn`` on the image rows (stream layout in and out; the output
        takes ``text_fn``'s dtype)."""
        if not self.mixed:
            return text_fn(x_MD) if self.has_text else image_fn(x_MD)
        text_ME = text_fn(x_MD[: self.num_text])
        image_ME = image_fn(x_MD[self.num_text :])
        return torch.cat([text_ME, image_ME.to(text_ME.dtype)], dim=0)

    def pick(self, at_image: Tensor, at_text: Tensor) -> Tensor:
        """Rows of ``at_image`` at image positions and of ``at_text`` at text positions (stream layout)."""
        if not self.mixed:
            return at_text if self.has_text else at_image
        return torch.cat([at_text[: self.num_text], at_image[self.num_text :]], dim=0)


def route(x_BLD: Tensor, vision_BL: Tensor, text_fn: RowFn, vision_fn: RowFn) -> Tensor:
    """One routed row-wise map on a grid (outside the layers: the final norm, the embedding checks)."""
    routing = Routing(vision_BL)
    return routing.grid(routing.apply(routing.rows(x_BLD), text_fn, vision_fn))


__all__ = ["Routing", "route"]
