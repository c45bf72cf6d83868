"""LCL's sequence layouts: token ids of image-text pairs and of interleaved documents.

- Pair, image first (probability ``image_first_prob``): ``<soi> <img>*N <eoi> caption <eot>``: captioning; the
  ``<soi>`` sits at position 0, so this image has no contrastive target.
- Pair, text first: ``<sot> caption <soi> <img>*N <eoi>``: the LM's state at ``<soi>`` must predict the image
  from the caption (a contrastive pair); no ``<eot>``.
- Document: ``<sot>`` + the items in reading order (sentences, image blocks) + ``<eot>``. An MMC4 document is read
  with each image right after its sentence and :func:`place_images` moves each one right before its sentence with
  probability ``image_first_prob`` (OBELICS images stay where they are). A document longer than ``max_len`` is cut;
  a cut inside an image block drops that block and ends the row with ``<eot>`` where its ``<soi>`` was (as the
  official MMC4 loader), and images after the cut are dropped.
- CLIP-style text: ``<sot> caption <soi>`` (the official ``encode_text`` turns ``<eot>`` into ``<soi>``).

An item is ``("text", [ids])`` or ``("image", payload)``; the layouts return the ids and the payloads of the images
they kept, in order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from vlpretrain.lcl.vocab import LCLVocab

Item = tuple[str, Any]


def image_block(vocab: LCLVocab, num_patches: int) -> list[int]:
    """``<soi> <img>*N <eoi>``."""
    return [vocab.soi, *[vocab.img] * num_patches, vocab.eoi]


def pair_ids(text: Sequence[int], vocab: LCLVocab, num_patches: int, image_first: bool, max_len: int) -> list[int]:
    """One pair's sequence (the caption cut to ``max_len - N - 4`` tokens, as the official wrapper)."""
    text = list(text[: max_len - num_patches - 4])
    block = image_block(vocab, num_patches)
    return [*block, *text, vocab.eot] if image_first else [vocab.sot, *text, *block]


def clip_text_ids(text: Sequence[int], vocab: LCLVocab, max_len: int) -> list[int]:
    """``<sot> text <soi>`` with the text cut to ``max_len - 2`` tokens."""
    return [vocab.sot, *text[: max_len - 2], vocab.soi]


def place_images(items: Sequence[Item], image_first_prob: float, rng: random.Random) -> list[Item]:
    """Move each image that follows a sentence to right before it with probability ``image_first_prob``."""
    out: list[Item] = []
    for item in items:
        if item[0] == "image" and out and out[-1][0] == "text" and rng.random() < image_first_prob:
            out.insert(len(out) - 1, item)
        else:
            out.append(item)
    return out


def document_ids(items: Sequence[Item], vocab: LCLVocab, num_patches: int, max_len: int) -> tuple[list[int], list]:
    """A document's ids and the payloads of the images still in them after cutting to ``max_len``."""
    ids, images = [vocab.sot], []
    for kind, value in items:
        if kind == "text":
            ids += value
        else:
            ids += image_block(vocab, num_patches)
            images.append(value)
    ids.append(vocab.eot)
    if len(ids) > max_len:
        ids = ids[:max_len]
        ids[-1] = vocab.eot
        soi = [i for i, t in enumerate(ids) if t == vocab.soi]
        if soi and vocab.eoi not in ids[soi[-1] :]:  # the last image block was cut: drop it
            ids = [*ids[: soi[-1]], vocab.eot]
    kept = sum(t == vocab.soi for t in ids)
    return ids, images[:kept]


def document_pairs(items: Sequence[Item], image_after_text: bool) -> list[tuple[Any, list[int]]]:
    """(image payload, its sentence ids) of each image of a document, for the CLIP-style baseline.

    Args:
        items: the document in reading order.
        image_after_text: images follow their sentence (MMC4 as read here); else the nearest sentence after the
            image is its text, falling back to the one before (OBELICS).
    """
    pairs = []
    for j, (kind, value) in enumerate(items):
        if kind != "image":
            continue
        before = next((items[i][1] for i in range(j - 1, -1, -1) if items[i][0] == "text"), None)
        after = next((items[i][1] for i in range(j + 1, len(items)) if items[i][0] == "text"), None)
        text = before if image_after_text else (after if after is not None else before)
        if text:
            pairs.append((value, text))
    return pairs


__all__ = ["clip_text_ids", "document_ids", "document_pairs", "image_block", "pair_ids", "place_images"]
