"""Image-text retrieval: recall@K in both directions from embedding matrices (COCO / Flickr30k 5k/1k protocol).

Shape letters: I images, T texts (captions; several per image), D embedding width.

Both matrices are L2-normalised and compared by cosine similarity. Image -> text: an image is found at K when one
of *its* captions is among the K most similar captions. Text -> image: a caption is found at K when its image is
among the K most similar images. Ties count against the model (an item ranks below every other item with the same
score), so constant embeddings score 0 rather than 1. Similarities are computed in blocks (of images, then of
texts), so 5k images x 25k captions fit in little memory.

Saved embeddings (:func:`load_embeddings`) are a ``.pt`` dict or a ``.safetensors`` file with ``image_embeddings``
[I, D], ``text_embeddings`` [T, D] and ``text_to_image`` [T] (the index of each caption's image).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vlpretrain.errors import UserError

KEYS = ("image_embeddings", "text_embeddings", "text_to_image")


def _check(image_ID: torch.Tensor, text_TD: torch.Tensor, text_to_image_T: torch.Tensor) -> None:
    if image_ID.ndim != 2 or text_TD.ndim != 2 or image_ID.shape[1] != text_TD.shape[1]:
        raise UserError(f"embeddings must be [I, D] and [T, D]; got {list(image_ID.shape)} and {list(text_TD.shape)}")
    if text_to_image_T.shape != (text_TD.shape[0],):
        raise UserError(f"text_to_image must be [T={text_TD.shape[0]}], got {list(text_to_image_T.shape)}")
    if text_to_image_T.numel() and not (int(text_to_image_T.min()) >= 0 and int(text_to_image_T.max()) < len(image_ID)):
        raise UserError(f"text_to_image must hold image indices in 0..{len(image_ID) - 1}")
    if len(image_ID) == 0 or len(text_TD) == 0:
        raise UserError("retrieval needs at least one image and one text")


@torch.no_grad()
def retrieval_ranks(
    image_ID: torch.Tensor, text_TD: torch.Tensor, text_to_image_T: torch.Tensor, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> text ranks [I], text -> image ranks [T]); rank 0 = the right item is first.

    An image without captions gets rank T (never found).
    """
    _check(image_ID, text_TD, text_to_image_T)
    image_ID = F.normalize(image_ID.float(), dim=-1)
    text_TD = F.normalize(text_TD.float(), dim=-1)
    text_to_image_T = text_to_image_T.long()
    num_images, num_texts = len(image_ID), len(text_TD)
    i2t = torch.full((num_images,), num_texts, dtype=torch.long)
    for first in range(0, num_images, block):
        sim_BT = image_ID[first : first + block] @ text_TD.T
        own_BT = text_to_image_T[None, :] == torch.arange(first, first + len(sim_BT))[:, None]
        # the best of an image's own captions against every other caption
        best_B = sim_BT.masked_fill(~own_BT, float("-inf")).amax(dim=1)
        beaten_B = ((sim_BT >= best_B[:, None]) & ~own_BT).sum(dim=1)
        i2t[first : first + len(sim_BT)] = torch.where(own_BT.any(dim=1), beaten_B, num_texts)
    t2i = torch.empty(num_texts, dtype=torch.long)
    for first in range(0, num_texts, block):
        sim_BI = text_TD[first : first + block] @ image_ID.T
        right_B = text_to_image_T[first : first + len(sim_BI)]
        own_BI = torch.arange(num_images)[None, :] == right_B[:, None]
        right_sim_B = sim_BI.gather(1, right_B[:, None])
        t2i[first : first + len(sim_BI)] = ((sim_BI >= right_sim_B) & ~own_BI).sum(dim=1)
    return i2t, t2i


def recall_at_k(
    image_ID: torch.Tensor, text_TD: torch.Tensor, text_to_image_T: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``i2t_r@K``, ``t2i_r@K`` (fractions in [0, 1]) and ``r_mean`` (the mean of all of them).

    Args:
        image_ID: image embeddings [I, D].
        text_TD: text embeddings [T, D].
        text_to_image_T: the image index of each text [T] (several texts may share an image).
        ks: the K of recall@K.
    """
    i2t, t2i = retrieval_ranks(image_ID, text_TD, text_to_image_T)
    metrics = {f"i2t_r@{k}": (i2t < k).float().mean().item() for k in ks}
    metrics |= {f"t2i_r@{k}": (t2i < k).float().mean().item() for k in ks}
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    return metrics | {"images": float(len(image_ID)), "texts": float(len(text_TD))}


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_embeddings [I, D], text_embeddings [T, D], text_to_image [T]) from a ``.pt`` or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and zip errors alike: the file is not a tensor dict
            raise UserError(f"{path}: not a readable torch file ({type(err).__name__})") from err
    if not isinstance(tensors, dict):
        raise UserError(f"{path}: expected a dict of tensors with keys {', '.join(KEYS)}")
    missing = [k for k in KEYS if not isinstance(tensors.get(k), torch.Tensor)]
    if missing:
        raise UserError(f"{path}: missing tensor '{missing[0]}' (expected {', '.join(KEYS)})")
    return tensors["image_embeddings"], tensors["text_embeddings"], tensors["text_to_image"]


def run(embeddings: str | Path, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from a saved embeddings file (see :func:`load_embeddings`)."""
    return recall_at_k(*load_embeddings(embeddings), ks=ks)


__all__ = ["KEYS", "load_embeddings", "recall_at_k", "retrieval_ranks", "run"]
