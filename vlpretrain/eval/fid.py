"""Fréchet distance between real and generated images (torchmetrics ``FrechetInceptionDistance``).

Shape letters: B images in a batch, H, W their size, N tokens, D feature width.

The distance is the one of Heusel et al.: ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` over the features
of the two image sets, accumulated in float64 by torchmetrics. Which features decides what the number means:

- **Inception** (the published FID): torchmetrics takes the pool3 features of the TF-ported Inception v3 from the
  ``torch-fidelity`` package, and torch-fidelity downloads its weights unless it is given a file. Offline, both must be
  present: ``pip install torch-fidelity`` and ``pt_inception-2015-12-05-6726825d.pth`` (from torch-fidelity's GitHub
  releases) passed as ``inception_weights``. Without them :func:`inception_extractor` fails with a message that says
  so. The result key is ``fid``.
- **Any other extractor** (an ``nn.Module`` mapping images [B, 3, H, W] in [0, 1] to features [B, D], or tokens
  [B, N, D] that are mean-pooled: for example our own frozen ViT): the key is ``fid_<name>``. Such a number ranks
  models measured with the *same* extractor on the *same* images, and is **not comparable to published FID**.

Both sets should hold thousands of images for a stable estimate (the covariance is D x D); small sets give a biased,
larger distance.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from vlpretrain.errors import UserError
from vlpretrain.progress import progress_bar

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
NOT_COMPARABLE = "not comparable to published FID (features of {name}, not of the Inception v3 of the FID paper)"


class PooledFeatures(nn.Module):
    """A frozen feature extractor for FID: images [B, 3, H, W] in [0, 1] -> features [B, D] (tokens mean-pooled)."""

    def __init__(self, extractor: nn.Module, num_features: int) -> None:
        super().__init__()
        self.extractor = extractor.eval().requires_grad_(False)
        self.num_features = num_features  # read by torchmetrics instead of probing a 299 x 299 dummy image

    def train(self, mode: bool = True) -> PooledFeatures:
        return super().train(False)  # frozen: torchmetrics' .train() calls must not switch dropout/BN on

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        out = self.extractor(images_B3HW).float()
        return out.mean(dim=1) if out.ndim == 3 else out


def inception_extractor(weights: str | Path) -> nn.Module:
    """torchmetrics' Inception v3 (2048-d pool features) with weights from a local file; the published FID.

    Raises:
        UserError: torch-fidelity is not installed or the weights file is missing.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--inception-weights: {weights}: no such file (torch-fidelity's {INCEPTION_WEIGHTS_NAME})")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=str(weights))  # fmt: skip
    except ModuleNotFoundError as err:
        raise UserError("Inception FID needs the torch-fidelity package (pip install torch-fidelity); "
                        "or pass another extractor for a labelled, non-comparable fid_<name>") from err  # fmt: skip


def _metric(extractor: nn.Module, inception: bool, sample_BCHW: torch.Tensor) -> object:
    from torchmetrics.image.fid import FrechetInceptionDistance

    if inception:
        return FrechetInceptionDistance(feature=extractor, normalize=True)
    with torch.no_grad():
        probe = extractor(sample_BCHW[:1].float())
    pooled = PooledFeatures(extractor, int(probe.shape[-1]))
    return FrechetInceptionDistance(feature=pooled, normalize=True)


def fid(
    real: Iterable[torch.Tensor],
    fake: Iterable[torch.Tensor],
    extractor: nn.Module | None = None,
    name: str | None = None,
    inception_weights: str | Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """The Fréchet distance between two image sets, labelled by the extractor that made the features.

    Args:
        real, fake: batches of images [B, 3, H, W], float in [0, 1] (any B; at least 2 images per set).
        extractor: an ``nn.Module`` images -> [B, D] or [B, N, D]; None = Inception from ``inception_weights``.
        name: the extractor's name in the key ``fid_<name>`` (required with ``extractor``).
        inception_weights: torch-fidelity's Inception weights file (when ``extractor`` is None).
        progress: show a progress bar (counted in batches).

    Returns:
        ``fid`` (Inception) or ``fid_<name>``, with ``real_images`` and ``fake_images``.
    """
    if extractor is None:
        if inception_weights is None:
            raise UserError("FID needs inception_weights (torch-fidelity's Inception file) or another extractor")
        extractor, key = inception_extractor(inception_weights), "fid"
    else:
        if not name:
            raise ValueError("an extractor other than Inception needs a name (the result is fid_<name>)")
        key = "fid_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    metric, counts = None, {"real_images": 0, "fake_images": 0}
    with progress_bar("fid", total=0, enabled=progress) as advance:
        for is_real, batches in ((True, real), (False, fake)):
            for images_B3HW in batches:
                metric = metric or _metric(extractor, key == "fid", images_B3HW)
                metric.update(images_B3HW.float(), real=is_real)
                counts["real_images" if is_real else "fake_images"] += len(images_B3HW)
                advance(1)
    if min(counts.values()) < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {counts['real_images']} real, "
                         f"{counts['fake_images']} generated")  # fmt: skip
    return {key: float(metric.compute())} | {k: float(v) for k, v in counts.items()}


run = fid  # the evaluators' common name: run(...) -> {name: value}

__all__ = ["INCEPTION_WEIGHTS_NAME", "NOT_COMPARABLE", "PooledFeatures", "fid", "inception_extractor", "run"]
