"""LaVIT selector and merger: kept-rows-only computation equals the official dense algorithm; gradients flow."""

from __future__ import annotations

import pytest
import torch

from vlpretrain.core.attention import policy_softmax
from vlpretrain.lavit.merger import TokenMerger, kept_index
from vlpretrain.lavit.selector import TokenSelector, keep_decision, ratio_loss


def _masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    keep = (torch.rand(5, 36, generator=g) < 0.35).float()
    keep[1] = 1.0  # nothing dropped: the official cross-attention is a uniform average
    keep[2] = 0.0
    keep[2, 7] = 1.0  # a single kept token
    keep[3] = 0.0  # nothing kept: only padding rows, which must stay finite
    return keep


def test_kept_rows_equal_dense_reference() -> None:
    torch.manual_seed(0)
    merger = TokenMerger(dim=48, depth=3, heads=4, mlp_hidden=96).eval()
    x = torch.randn(5, 36, 48)
    keep = _masks()
    with torch.no_grad():
        dense = merger.forward_dense(x, keep)
        kept, valid = merger.forward_kept(x, keep)
    index, valid_ref = kept_index(keep)
    assert torch.equal(valid, valid_ref) and valid.sum(1).tolist() == keep.sum(1).int().tolist()
    assert torch.isfinite(kept).all()
    for b in range(5):
        n = int(valid[b].sum())
        torch.testing.assert_close(kept[b, :n], dense[b, index[b, :n]], atol=2e-5, rtol=1e-4)


def test_kept_rows_ignore_the_content_of_dropped_rows_except_through_cross_attention() -> None:
    """A kept row depends on dropped patches only through ln_vision(X) keys/values, never on their rows' updates."""
    torch.manual_seed(0)
    merger = TokenMerger(dim=32, depth=2, heads=2, mlp_hidden=64).eval()
    keep = torch.zeros(1, 16)
    keep[0, :5] = 1
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        a, _ = merger.forward_kept(x, keep)
        x2 = x.clone()
        x2[0, 10:] += torch.randn(6, 32)  # change dropped patches AFTER the kept ones in raster order
        b, _ = merger.forward_kept(x2, keep)
        c = merger.forward_dense(x2, keep)[:, :5]
    assert not torch.allclose(a, b)  # the cross-attention sees the change
    torch.testing.assert_close(b, c, atol=2e-5, rtol=1e-4)


def test_causal_order_among_kept_tokens() -> None:
    torch.manual_seed(0)
    merger = TokenMerger(dim=32, depth=2, heads=2, mlp_hidden=64).eval()
    keep = torch.zeros(1, 16)
    keep[0, [1, 4, 9, 12]] = 1
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        a, _ = merger.forward_kept(x, keep)
        x2 = x.clone()
        x2[0, 12] += 1.0  # the last kept token: earlier kept tokens must not see it
        b, _ = merger.forward_kept(x2, keep)
    torch.testing.assert_close(a[0, :3], b[0, :3])
    assert not torch.allclose(a[0, 3], b[0, 3])


def test_policy_softmax_matches_official_formula() -> None:
    scores = torch.tensor([[[[1.0, 2.0, 3.0, 0.5]]]])
    allowed = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = policy_softmax(scores, allowed)
    e = torch.exp(scores - 3.0) * allowed
    torch.testing.assert_close(got, (e + 1e-6 / 4) / (e.sum() + 1e-6))
    assert torch.allclose(policy_softmax(scores, torch.zeros(4)), torch.full((1, 1, 1, 4), 0.25))


def test_selector_gumbel_straight_through_reaches_the_selector() -> None:
    torch.manual_seed(0)
    selector, merger = TokenSelector(32), TokenMerger(32, 1, 2, 64)
    x = torch.randn(2, 16, 32)
    keep = keep_decision(selector(x), "gumbel")
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    merged, valid = merger(x, keep, dense=True)
    (merged[valid].square().mean() + ratio_loss(keep, 1 / 3, per_image=True).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in selector.parameters())


@pytest.mark.parametrize("per_image", [True, False])
def test_ratio_loss(per_image: bool) -> None:
    keep = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    got = ratio_loss(keep, 0.25, per_image)
    expected = torch.tensor([0.0625, 0.0]) if per_image else torch.full((2,), (0.25 - 0.375) ** 2)
    torch.testing.assert_close(got, expected)


def test_deterministic_keep_is_the_argmax() -> None:
    logp = torch.log_softmax(torch.tensor([[[2.0, 0.0], [0.0, 2.0], [0.1, 0.0]]]), dim=-1)
    assert keep_decision(logp, "deterministic").tolist() == [[1.0, 0.0, 1.0]]
    sampled = keep_decision(logp.expand(500, 3, 2), "sample")
    assert not sampled.requires_grad and 0.7 < sampled[:, 0].mean() < 0.95
