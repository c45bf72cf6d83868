"""FID through torchmetrics with a small random extractor; Inception without its weights fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from vlpretrain.errors import UserError
from vlpretrain.eval.fid import fid


class Tokens(nn.Module):
    """A tiny random frozen encoder: tokens [B, 16, 6] (mean-pooled by the evaluator), like a ViT's patches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(images_B3HW)).flatten(2).transpose(1, 2)  # [B, N, D]


def _images(seed: int, n: int = 96) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_identical_sets_give_zero_and_shifted_sets_more() -> None:
    real = _images(0)
    same = fid(real.split(32), real.split(32), Tokens(), name="Tiny Random")
    assert set(same) == {"fid_tiny_random", "real_images", "fake_images"} and same["real_images"] == 96
    assert abs(same["fid_tiny_random"]) < 1e-3
    other = fid(real.split(32), _images(1).split(32), Tokens(), name="tiny random")["fid_tiny_random"]
    shifted = fid(real.split(32), (0.6 * _images(1) + 0.4).split(32), Tokens(), name="tiny random")["fid_tiny_random"]
    # another draw of the same distribution is close; a shifted, squeezed one is far
    assert 0 < other < 1e-3 < shifted and shifted > 10 * other


def test_extractor_needs_a_name_and_inception_its_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a name"):
        fid([_images(0)], [_images(1)], Tokens())
    with pytest.raises(UserError, match="no such file"):
        fid([_images(0)], [_images(1)], inception_weights=tmp_path / "pt_inception.pth")
    with pytest.raises(ValueError, match="at least 2 images"):
        fid([_images(0, 1)], [_images(1)], Tokens(), name="t")
