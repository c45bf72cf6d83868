"""Tokenizer statistics on held-out images: token counts, keep ratio, codebook use, reconstruction, adaptivity.

``run(tokenizer, images, records) -> {name: value}``: the evaluators' common interface. On the shapes world the
records carry the ground-truth objects, so the correlation between visual complexity (object count) and token count
measures how well the dynamic tokenizer adapts its length to content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from vlpretrain.lavit.api import Tokenizer
from vlpretrain.lavit.tokenizer import count_statistics
from vlpretrain.progress import progress_bar


@torch.no_grad()
def run(tokenizer: Tokenizer, images: Sequence[Any], records: Sequence[dict] | None = None, batch_size: int = 64,
        progress: bool = False) -> dict[str, float]:  # fmt: skip
    """Statistics over ``images`` (any form :class:`Tokenizer` accepts); ``records`` add the complexity correlation.

    Returns tokens_mean/min/max, keep_ratio, codes_used, code_usage, code_perplexity, rec_cos (mean cosine between
    the features decoded from the tokens and the encoder's own features) and, with records, spearman_objects_tokens.
    """
    ids: list[torch.Tensor] = []
    cos_sum, n_patches = 0.0, 0
    with progress_bar("tokenizer eval", total=len(images), enabled=progress) as advance:
        for start in range(0, len(images), batch_size):
            pixels = tokenizer.preprocess(images[start : start + batch_size])
            target = tokenizer.model.encoder(pixels)
            batch_ids, _ = tokenizer.model.tokenize_features(target).ids_and_keep()
            rec = tokenizer.model.decode_codes(batch_ids)
            cos = F.cosine_similarity(rec.float(), target.float(), dim=-1)
            cos_sum, n_patches = cos_sum + float(cos.sum()), n_patches + cos.numel()
            ids += [s.cpu() for s in batch_ids]
            advance(len(pixels))
    stats = count_statistics(ids, tokenizer.model.cfg.codebook_size)
    stats["keep_ratio"] = stats["tokens_mean"] / tokenizer.model.num_patches
    stats["rec_cos"] = cos_sum / max(n_patches, 1)
    if records is not None:
        objects = np.array([len(r["objects"]) for r in records])
        tokens = np.array([len(s) for s in ids])
        rho = spearmanr(objects, tokens).statistic if objects.std() > 0 and tokens.std() > 0 else float("nan")
        stats["spearman_objects_tokens"] = float(rho)
        stats |= {f"tokens_at_{k}_objects": float(tokens[objects == k].mean()) for k in sorted(set(objects.tolist()))}
    return stats
