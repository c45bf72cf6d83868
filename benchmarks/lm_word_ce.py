"""Which caption words a trained LaVIT LM has learned to read from the image (docs/lm.md, "Curriculum").

Teacher-forced cross-entropy of the caption words of each attribute kind (colour, shape, size, count) on held-out
``[image, caption]`` samples, next to chance (the log of the number of words of that kind), and the spread of the
LM's output rows for those words (mean distance to their centroid): rows that stay together cannot name a
difference whatever the image says (docs/libra.md, "Why stage 1 could not name colours and shapes").

    python -m benchmarks.lm_word_ce --lm runs/demo/lm --data runs/demo/data/test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch
import torch.nn.functional as F

from vlpretrain.data.shards import DataStream
from vlpretrain.data.synthetic import COLORS, NUMBER_WORDS, SHAPES, SIZES
from vlpretrain.lavit.lm_task import LavitLMTask
from vlpretrain.lavit.packing import IGNORE
from vlpretrain.train.config import DataConfig

WORD_KINDS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "count": NUMBER_WORDS[1:6],
}


def word_ids(task: LavitLMTask) -> dict[str, dict[int, str]]:
    """Token id -> word for every attribute word that is a single token of the LM's text tokenizer."""
    out: dict[str, dict[int, str]] = {}
    for kind, words in WORD_KINDS.items():
        ids = {w: task.text_tokenizer(w, add_special_tokens=False).input_ids for w in words}
        out[kind] = {i[0]: w for w, i in ids.items() if len(i) == 1}
    return out


@torch.no_grad()
def caption_word_ce(task: LavitLMTask, data: str, batches: int = 4, batch_size: int = 32) -> dict[str, dict]:
    """``{kind: {"ce", "targets", "relation_ce", "relation_targets", "chance", "row_spread"}}`` over ``batches`` x
    ``batch_size`` caption samples; ``ce`` = the words of the object list (only the image tells them), ``relation_``
    = those of the relation sentence after it (copyable from the list)."""
    cfg = DataConfig(train=data, batch_size=batch_size, shuffle_buffer=0)
    own_cfg = task.cfg  # captions only while the data set is built (its collate reads the ratios), then restored
    task.cfg = dataclasses.replace(own_cfg, understand_ratio=1.0, qa_ratio=0.0, text_ratio=0.0)
    try:
        stream = DataStream(task.build_dataset(cfg, "train", 0, 1))
    finally:
        task.cfg = own_cfg
    kinds = word_ids(task)
    by_id = {i: kind for kind, ids in kinds.items() for i in ids}
    losses: dict[str, list[float]] = {prefix + kind: [] for kind in kinds for prefix in ("", "relation ")}
    period = task.text_tokenizer(".", add_special_tokens=False).input_ids[-1]
    for n, batch in enumerate(stream):
        if n == batches:
            break
        packed = task.prepare(batch)
        logits_RLV = task.logits(packed).float()
        labels_RL = packed["labels"][:, 1:]
        ce_RL = F.cross_entropy(logits_RLV[:, :-1].transpose(1, 2), labels_RL.clamp_min(0), reduction="none")
        ce_RL = ce_RL.masked_fill(labels_RL == IGNORE, 0.0)
        starts_RL = packed["position_ids"][:, 1:] == 0
        for labels, ces, starts in zip(labels_RL.tolist(), ce_RL.tolist(), starts_RL.tolist(), strict=True):
            in_list = True  # the object list, up to its first "."; then the relation sentence (copyable words)
            for label, ce, start in zip(labels, ces, starts, strict=True):
                in_list = in_list or start
                if label == period:
                    in_list = False
                elif label in by_id:
                    losses[by_id[label] if in_list else "relation " + by_id[label]].append(ce)
    head = task.lm.get_output_embeddings().weight.float()
    report = {}
    for kind, ids in kinds.items():
        rows = head[list(ids)]
        spread = float((rows - rows.mean(0)).norm(dim=-1).mean())
        report[kind] = {"chance": round(math.log(len(ids)), 3), "row_spread": round(spread, 3)}
        for where, values in (("", losses[kind]), ("relation_", losses["relation " + kind])):
            report[kind] |= {f"{where}ce": round(sum(values) / max(len(values), 1), 3), f"{where}targets": len(values)}
    return report


def main(argv: list[str] | None = None) -> None:
    from vlpretrain.train.pretrained import load_task

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", required=True, help="a lavit-lm run or checkpoint folder")
    parser.add_argument("--data", required=True, help="held-out pair shards (e.g. runs/demo/data/test)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 captions")
    args = parser.parse_args(argv)
    task, _ = load_task(args.lm, expect_task="lavit-lm")
    print(json.dumps(caption_word_ce(task.eval(), args.data, args.batches), indent=1))


if __name__ == "__main__":
    main()
