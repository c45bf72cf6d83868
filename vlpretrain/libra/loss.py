"""Libra's next-token loss over two id streams.

Officially each stream c has logits over text + image ids: text positions give ``lm_head`` logits with the image
slots at -inf, image positions give head c's logits with the text slots at -inf, and the loss is the mean over the
streams of each stream's token-averaged cross-entropy. The -inf slots contribute nothing to a softmax, so a text
position's cross-entropy is that over the text vocabulary alone (and the same in every stream), and an image
position's is that over its head's K + 2 classes. We compute exactly that, without materialising the -inf slots:

    loss_sum = sum over text targets of CE_text + w * (1/C) * sum over c and image targets of CE_c

normalised by the loop over the target count (w = ``visual_weight``, 1 officially). A target whose modality
differs from its predicting position's (impossible after the label masking) would be an infinite loss officially;
here it is an error.

Shape letters: C streams, B batch, L positions, H hidden, M predicting rows of one modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlpretrain.libra.model import LibraLM
from vlpretrain.libra.sequences import IGNORE


def libra_loss(model: LibraLM, hidden_BLH: Tensor, vision_BL: Tensor, labels_CBL: Tensor,
               visual_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """(summed loss, named parts) of the hidden states against ``labels`` (aligned with the inputs: position p
    predicts ``labels[:, :, p + 1]``).

    Returns:
        The loss summed over targets (fp32) and ``ce_text``/``ce_image`` means (detached) for logging.
    """
    text_size = model.vocab.text_size
    targets_CBL = labels_CBL[:, :, 1:]
    valid_BL = targets_CBL[0] != IGNORE
    from_image_BL = vision_BL[:, :-1]
    hidden_BLH = hidden_BLH[:, :-1]
    text_rows, image_rows = valid_BL & ~from_image_BL, valid_BL & from_image_BL
    text_target_M = targets_CBL[0][text_rows]
    image_target_CM = targets_CBL[:, image_rows] - text_size
    if bool((text_target_M >= text_size).any()) or bool((image_target_CM < 0).any()):
        raise ValueError("a target's modality differs from its predicting position's (label masking is wrong)")
    ce_text_M = F.cross_entropy(model.text_logits(hidden_BLH[text_rows]).float(), text_target_M, reduction="none")
    logits_CMK = model.image_logits(hidden_BLH[image_rows]).float()
    ce_image_CM = F.cross_entropy(logits_CMK.flatten(0, 1), image_target_CM.flatten(), reduction="none")
    ce_image_M = ce_image_CM.view(image_target_CM.shape).mean(0)
    loss = ce_text_M.sum() + visual_weight * ce_image_M.sum()
    parts = {"ce_text": _mean(ce_text_M), "ce_image": _mean(ce_image_M)}
    return loss, parts


def _mean(x: Tensor) -> Tensor:
    return x.detach().mean() if x.numel() else torch.zeros((), device=x.device)


__all__ = ["libra_loss"]
