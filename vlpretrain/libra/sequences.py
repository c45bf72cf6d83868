"""Libra's sequences: what a caption (stage 1) or a conversation (stage 2) looks like, and which tokens are targets.

Formats (the official datasets; ``[img]`` = ``<boi>``, N code positions, ``<eoi>``):

| kind | tokens | targets |
|------|--------|---------|
| caption (stage 1) | ``<s> [img] \\n caption </s>`` | the N codes (both streams) and ``<eoi>``, the caption, ``</s>`` |
| chat (stage 2, Vicuna v1) | ``<s> system USER: [img] \\n q_1 ASSISTANT: a_1 </s> USER: q_2 ...`` | each ``a_i </s>`` |
| caption prompt | ``<s> [img] \\n`` | (generation) |
| question prompt | ``<s> system USER: [img] \\n q ASSISTANT:`` | (generation) |

Label masking (official ``get_labels`` + the datasets' position maps): padding, ``<boi>``, ``<s>`` and the first
text token after an image are never targets. The first two rules are what makes the loss finite: the position before
``<boi>`` is a text position whose head cannot predict image ids, and ``<eoi>`` is an image position whose heads
cannot predict text. Our caption ends with ``</s>`` so generation stops (the official stage-1 data has no EOS).

Batches are assembled from :class:`Segment` lists in the data loader, with placeholders at the code positions; the
task fills in the codes and features once the frozen tokenizer has seen the images (:func:`fill_images`). A sample
holds at most one image, which is row b of the batch's images.

Shape letters: C streams, B samples, L positions, N patches per image, F feature size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlpretrain.libra.vocab import VisualVocab

IGNORE = -100
NO_PATCH = -1


@dataclass
class Segment:
    """A run of text ids, or the sample's image (``image=True``); ``target`` marks its tokens as targets (for an
    image: its codes and ``<eoi>``)."""

    ids: list[int] = field(default_factory=list)
    image: bool = False
    target: bool = False


def caption_sample(bos: int, newline: int, caption: list[int], eos: int) -> list[Segment]:
    """Stage 1: ``<s> [img] \\n caption </s>`` with the image codes, ``<eoi>``, caption and ``</s>`` as targets."""
    return [Segment([bos]), Segment(image=True, target=True), Segment([newline]), Segment([*caption, eos], target=True)]


def chat_sample(bos: int, newline: int, eos: int, system: list[int], user: list[int], assistant: list[int],
                rounds: list[tuple[list[int], list[int]]]) -> list[Segment]:  # fmt: skip
    """Stage 2 (Vicuna v1): the image opens the first user message; only the answers (+ ``</s>``) are targets."""
    if not rounds:
        raise ValueError("chat_sample: a conversation needs at least one (question, answer) round")
    segments = [Segment([bos, *system, *user]), Segment(image=True)]
    for i, (question, answer) in enumerate(rounds):
        opening = [newline] if i == 0 else list(user)
        segments += [Segment([*opening, *question, *assistant]), Segment([*answer, eos], target=True)]
    return segments


def caption_prompt(bos: int, newline: int) -> list[Segment]:
    """``<s> [img] \\n``: the caption follows."""
    return [Segment([bos]), Segment(image=True), Segment([newline])]


def question_prompt(bos: int, newline: int, system: list[int], user: list[int], assistant: list[int],
                    question: list[int]) -> list[Segment]:  # fmt: skip
    """``<s> system USER: [img] \\n q ASSISTANT:``: the answer follows."""
    return [Segment([bos, *system, *user]), Segment(image=True), Segment([newline, *question, *assistant])]


@dataclass
class Assembled:
    """A padded batch before the codes are known.

    ``ids_BL`` (code positions hold T, i.e. code 0), ``patch_BL`` (patch index at code positions, -1 elsewhere),
    ``target_BL`` (True where the token is a target), ``attention_mask_BL`` (1 = real token).
    """

    ids_BL: Tensor
    patch_BL: Tensor
    target_BL: Tensor
    attention_mask_BL: Tensor

    def num_targets(self) -> int:
        """Targets the loss sees (position 0 is never predicted)."""
        return int(self.target_BL[:, 1:].sum())


def flatten(segments: list[Segment], vocab: VisualVocab, num_patches: int,
            bos: int | None) -> tuple[list[int], list[int], list[bool]]:  # fmt: skip
    """(ids, patch index, target flag) per position of one sample, with the official masking applied."""
    ids: list[int] = []
    patch: list[int] = []
    target: list[bool] = []
    after_image = False
    if sum(s.image for s in segments) > 1:
        raise ValueError("a Libra sample holds at most one image")
    for seg in segments:
        if seg.image:
            ids += [vocab.boi, *[vocab.text_size] * num_patches, vocab.eoi]
            patch += [NO_PATCH, *range(num_patches), NO_PATCH]
            target += [False] + [seg.target] * (num_patches + 1)  # <boi> is never a target
            after_image = True
            continue
        for tok in seg.ids:
            if tok >= vocab.text_size or tok < 0:
                raise ValueError(f"text id {tok} is outside the text vocabulary [0, {vocab.text_size})")
            ids.append(tok)
            patch.append(NO_PATCH)
            target.append(seg.target and not after_image and tok != bos)  # first text token after an image: masked
            after_image = False
    return ids, patch, target


def assemble(samples: list[list[Segment]], vocab: VisualVocab, num_patches: int, max_len: int, pad_id: int,
             bos: int | None, left_pad: bool = False) -> Assembled:  # fmt: skip
    """Pad (right for training, left for prompts) and cut text beyond ``max_len``; an image must fit whole."""
    rows = [flatten(s, vocab, num_patches, bos) for s in samples]
    for i, (_, patch, _) in enumerate(rows):
        image_end = max((j for j, p in enumerate(patch) if p != NO_PATCH), default=-1) + 2  # through <eoi>
        if image_end > max_len:
            raise ValueError(f"sample {i}: its image ends at position {image_end} > max_len {max_len}")
    length = min(max(len(r[0]) for r in rows), max_len)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    patch_t = torch.full((len(rows), length), NO_PATCH, dtype=torch.long)
    target_t = torch.zeros((len(rows), length), dtype=torch.bool)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (row_ids, row_patch, row_target) in enumerate(rows):
        n = min(len(row_ids), length)
        span = slice(length - n, length) if left_pad else slice(0, n)
        ids[b, span] = torch.tensor(row_ids[:n])
        patch_t[b, span] = torch.tensor(row_patch[:n])
        target_t[b, span] = torch.tensor(row_target[:n])
        mask[b, span] = 1
    return Assembled(ids, patch_t, target_t, mask)


def fill_images(batch: Assembled, codes_BCN: Tensor, features_BNF: Tensor,
                vocab: VisualVocab) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Write sample b's image (codes and features) into its code positions.

    Returns:
        ids [C, B, L], features [B, L, F] (zeros outside code positions), labels [C, B, L] (IGNORE = not a target).
    """
    device = codes_BCN.device
    ids_BL, patch_BL, target_BL = (t.to(device) for t in (batch.ids_BL, batch.patch_BL, batch.target_BL))
    ids_CBL = ids_BL.unsqueeze(0).repeat(vocab.num_codebooks, 1, 1)
    b_idx, l_idx = (patch_BL != NO_PATCH).nonzero(as_tuple=True)
    n_idx = patch_BL[b_idx, l_idx]
    ids_CBL[:, b_idx, l_idx] = codes_BCN[b_idx, :, n_idx].T + vocab.text_size
    features_BLF = features_BNF.new_zeros(*ids_BL.shape, features_BNF.shape[-1])
    features_BLF[b_idx, l_idx] = features_BNF[b_idx, n_idx]
    labels_CBL = torch.where(target_BL.unsqueeze(0), ids_CBL, IGNORE)
    return ids_CBL, features_BLF, labels_CBL


__all__ = [
    "IGNORE",
    "Assembled",
    "Segment",
    "assemble",
    "caption_prompt",
    "caption_sample",
    "chat_sample",
    "fill_images",
    "flatten",
    "question_prompt",
]
