"""benchmarks/lm_word_ce.py on a micro LaVIT LM: word kinds, chance, and tied output rows."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from test_lavit_lm import micro_task

from benchmarks.lm_word_ce import caption_word_ce, word_ids


def test_every_attribute_word_is_one_token_of_the_demo_tokenizer() -> None:
    ids = word_ids(micro_task())
    assert {kind: len(words) for kind, words in ids.items()} == {"color": 8, "shape": 5, "size": 2, "count": 5}


def test_tied_colour_rows_cannot_beat_chance(shapes_data: Path) -> None:
    task = micro_task().eval()
    colour_ids = list(word_ids(task)["color"])
    head = task.lm.get_output_embeddings().weight
    with torch.no_grad():  # every colour word gets the same output row: the model cannot prefer one colour
        head[colour_ids] = head[colour_ids[0]].clone()
    out = caption_word_ce(task, str(shapes_data / "test"), batches=1, batch_size=8)
    assert out["color"]["row_spread"] == 0.0 and out["color"]["chance"] == round(math.log(8), 3)
    assert out["color"]["targets"] >= 8 and out["color"]["ce"] >= out["color"]["chance"] - 1e-3
    assert out["count"]["targets"] == 8  # one count word per caption, in the object list
    assert out["size"]["relation_targets"] == 0 and out["shape"]["row_spread"] > 0
