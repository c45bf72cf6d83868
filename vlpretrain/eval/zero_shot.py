"""Zero-shot classification: class embeddings from prompt templates, then nearest class by cosine similarity.

Shape letters: B images in a batch, C classes, P templates, D embedding width.

As in CLIP, each class name is written into every template (``"a photo of a {}."``), the text embeddings of the
P prompts are L2-normalised and averaged, and the mean is normalised again: one class embedding [D]. An image is
assigned the class of highest cosine similarity. The encoders are plain callables, so any model fits:
``encode_text(list of N strings) -> [N, D]`` and ``encode_image(batch) -> [B, D]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vlpretrain.progress import progress_bar

# A few of CLIP's ImageNet templates; pass the benchmark's own list for comparable numbers.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a photo of the {}.",
    "a drawing of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)


@torch.no_grad()
def class_embeddings(
    class_names: Sequence[str],
    encode_text: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """The zero-shot classifier [C, D]: per class, the normalised mean of its normalised prompt embeddings."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} has no '{{}}' for the class name")
    rows = []
    for name in class_names:
        prompts_PD = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(prompts_PD.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(
    batches: Iterable[tuple[Any, torch.Tensor]],
    encode_image: Callable[[Any], torch.Tensor],
    classifier_CD: torch.Tensor,
    topk: Sequence[int] = (1, 5),
    total: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Top-K accuracy of nearest-class predictions.

    Args:
        batches: ``(images, labels [B])`` pairs; ``images`` is whatever ``encode_image`` takes.
        encode_image: images -> embeddings [B, D].
        classifier_CD: from :func:`class_embeddings`.
        topk: the K of top-K accuracy (K larger than C is clipped to C).
        total: the number of batches, for the progress bar.
        progress: show a progress bar.

    Returns:
        ``zero_shot_top{K}`` in [0, 1] and ``images``.
    """
    correct = dict.fromkeys(topk, 0)
    seen = 0
    with progress_bar("zero-shot", total=total or 0, enabled=progress) as advance:
        for images, labels_B in batches:
            logits_BC = F.normalize(encode_image(images).float(), dim=-1) @ classifier_CD.T
            ranked_BK = logits_BC.topk(min(max(topk), logits_BC.shape[1]), dim=1).indices
            hits_BK = ranked_BK == labels_B.long()[:, None]
            for k in topk:
                correct[k] += int(hits_BK[:, :k].any(dim=1).sum())
            seen += len(labels_B)
            advance(1)
    if not seen:
        raise ValueError("zero-shot classification: no images")
    return {f"zero_shot_top{k}": correct[k] / seen for k in topk} | {"images": float(seen)}


def run(
    encode_text: Callable[[list[str]], torch.Tensor],
    encode_image: Callable[[Any], torch.Tensor],
    batches: Iterable[tuple[Any, torch.Tensor]],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    topk: Sequence[int] = (1, 5),
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot accuracy of an encoder pair on labelled batches (classifier from ``class_names`` x ``templates``)."""
    classifier_CD = class_embeddings(class_names, encode_text, templates)
    total = len(batches) if isinstance(batches, Sequence) else None
    return zero_shot_accuracy(batches, encode_image, classifier_CD, topk, total, progress)


__all__ = ["DEFAULT_TEMPLATES", "class_embeddings", "run", "zero_shot_accuracy"]
