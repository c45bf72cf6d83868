"""The tokenizer code diagnostics of benchmarks/tokenizer_codes.py on a tiny random tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.tokenizer_codes import (
    _conditional_entropy,
    _entropy,
    attribute_entropies,
    code_information,
    dense_test_pool,
    linear_probe_accuracy,
    stage_probes,
    unit_pixels,
)
from vlpretrain.data.synthetic import SynthConfig, make_example
from vlpretrain.eval.tokenizer_stats import run as tokenizer_stats
from vlpretrain.lavit.api import Tokenizer
from vlpretrain.lavit.tokenizer import DynamicTokenizer, TokenizerConfig


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(DynamicTokenizer(TokenizerConfig(codebook_size=64)))


def test_entropies_match_hand_values() -> None:
    x = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert _entropy(x) == pytest.approx(2.0)
    assert _conditional_entropy(x, x) == pytest.approx(0.0)
    y = x % 2  # determined by x, a fair coin given x // 2
    assert _conditional_entropy(y, x) == pytest.approx(0.0)
    assert _conditional_entropy(y, x // 2) == pytest.approx(1.0)
    assert _conditional_entropy(np.array([0, 1] * 4), x) == pytest.approx(1.0)  # independent of x


def test_real_codes_give_the_tokenizer_statistics_cosine(tokenizer: Tokenizer) -> None:
    images = [make_example(SynthConfig(), "test", i).image for i in range(6)]
    info = code_information(tokenizer, images, batch_size=4)
    assert info["real"] == pytest.approx(tokenizer_stats(tokenizer, images)["rec_cos"], abs=1e-5)
    assert set(info) == {"real", "shuffled_within_image", "one_fixed_id", "random_ids", "image_mean_baseline"}
    assert all(-1.0 <= v <= 1.0 for v in info.values())


def test_a_tokenizer_that_keeps_nothing_is_named_not_a_crash() -> None:
    torch.manual_seed(0)
    model = DynamicTokenizer(TokenizerConfig(codebook_size=64)).eval()
    with torch.no_grad():  # a collapsed selector: every patch dropped
        model.token_predictor.out_conv[-2].bias.copy_(torch.tensor([-40.0, 40.0]))
    images = [make_example(SynthConfig(), "test", i).image for i in range(3)]
    with pytest.raises(SystemExit, match="keeps no patch of test images 0..2"):
        code_information(Tokenizer(model), images, batch_size=4)


def test_attribute_entropies_are_bounded(tokenizer: Tokenizer) -> None:
    pool = dense_test_pool(tokenizer, 20)
    out = attribute_entropies(tokenizer, *pool)
    assert 0.0 <= out["kept_object_fraction"] <= 1.0 and 0.0 <= out["kept_background_fraction"] <= 1.0
    by_position = out["kept_fraction_by_position"]  # summed over positions: the mean token count per image
    ids, _ = tokenizer.model.tokenize(unit_pixels(pool[0], tokenizer.device))
    assert len(by_position) == tokenizer.model.num_patches and all(0.0 <= f <= 1.0 for f in by_position)
    assert sum(by_position) == pytest.approx(sum(len(s) for s in ids) / len(ids), abs=0.05)
    assert out["positions_kept_in_90_percent"] == sum(f >= 0.9 for f in by_position)
    for name in ("shape", "color", "size", "position"):
        assert 0.0 <= out[f"{name}_bits_given_code"] <= out[f"{name}_bits"] + 1e-9
    assert out["color_bits"] <= math.log2(8) + 1e-9


def test_linear_probe_reads_a_linear_label_and_not_a_random_one() -> None:
    generator = torch.Generator().manual_seed(0)
    x_MD = torch.randn(600, 8, generator=generator)
    train_M = torch.arange(600) < 420
    linear_M = (x_MD[:, 0] > 0).long() + 2 * (x_MD[:, 3] > 0).long()  # four classes from two directions
    assert linear_probe_accuracy(x_MD, linear_M, 4, train_M) > 0.9
    random_M = torch.randint(0, 4, (600,), generator=generator)
    assert linear_probe_accuracy(x_MD, random_M, 4, train_M) < 0.4  # chance: 0.25


def test_stage_probes_report_every_stage_and_attribute(tokenizer: Tokenizer) -> None:
    out = stage_probes(tokenizer, *dense_test_pool(tokenizer, 40))
    assert out["object_tokens"] >= 10  # a random selector keeps about half of the patches
    for stage in ("feature", "merged", "z", "code"):
        assert set(out[stage]) == {"shape", "color", "size", "position"}
        assert all(0.0 <= acc <= 1.0 for acc in out[stage].values())
