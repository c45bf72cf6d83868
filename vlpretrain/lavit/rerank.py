"""Best-of-N text-to-image: draw several images per prompt and keep the one a scorer rates highest.

The official text-to-image evaluation (``LaVIT/evaluation/evaluate_text2img.py``) draws 4 images per prompt and
keeps the one CLIP scores highest. Without a CLIP model the default scorer here is the unified LM itself: the
log-likelihood of the prompt's text as the caption of the drawing, read through the understanding path
(``[IMG] v [/IMG] text </s>``, the ``[image, text]`` samples it was trained on). Any ``(images [B, 3, S, S], texts)
-> scores [B]`` callable can take its place (:data:`Scorer`).

Shape letters: B prompts, N candidates per prompt, P row length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vlpretrain.lavit.generate import check_context, understanding_inputs
from vlpretrain.lavit.model import LavitLM

Scorer = Callable[[Tensor, list[str]], Tensor]
# Candidate j of a call seeded s draws as a call seeded s + j * stride would (prompt i of it from s + j * stride + i:
# distinct seeds for calls of fewer prompts than the stride; CPU generators keep only 32 bits of a seed).
CANDIDATE_SEED_STRIDE = 1_000_003


@torch.no_grad()
def caption_logprob(model: LavitLM, images_B3SS: Tensor, texts: list[str]) -> Tensor:
    """Summed log-probability [B] (float32) of each text followed by ``</s>`` as the caption of its image.

    Args:
        model: the unified LM (eval mode).
        images_B3SS: float images in [0, 1] at the tokenizer's size.
        texts: one text per image.
    """
    if len(texts) != len(images_B3SS):
        raise ValueError(f"{len(images_B3SS)} images but {len(texts)} texts")
    ids = [model.encode_text(t) + [model.eos_id] for t in texts]
    embeds, mask, positions = understanding_inputs(model, images_B3SS, ids)
    check_context(model, embeds.shape[1])
    logits_BPV = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    logp = logits_BPV[:, :-1].float().log_softmax(dim=-1)  # row p predicts token p + 1
    scores = []
    for b, row in enumerate(ids):  # rows are left-padded: each text is the last len(row) tokens of its row
        target = torch.tensor(row, dtype=torch.long, device=logp.device)
        scores.append(logp[b, -len(row) :].gather(1, target[:, None]).sum())
    return torch.stack(scores)


def pick_best(scores_NB: Tensor) -> Tensor:
    """Index [B] of each prompt's best candidate (the first one on ties)."""
    if scores_NB.ndim != 2 or scores_NB.shape[0] == 0:
        raise ValueError(f"scores must be [N >= 1, B], got {tuple(scores_NB.shape)}")
    return scores_NB.argmax(dim=0)


__all__ = ["CANDIDATE_SEED_STRIDE", "Scorer", "caption_logprob", "pick_best"]
