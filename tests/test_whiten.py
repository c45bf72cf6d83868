"""Whitening: the damped map's variances, fitted once, only valid rows count, saved with the model, gradients."""

from __future__ import annotations

import pytest
import torch

from vlpretrain.core.whiten import Whitening


def correlated_rows(n: int, dim: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) @ torch.randn(dim, dim, generator=g) * 3 + 2


def variances_along_eigenvectors(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input variances, output variances) along the input covariance's eigenvectors."""
    xc = x - x.mean(0)
    eig, vec = torch.linalg.eigh(xc.T @ xc / len(x))
    yc = y - y.mean(0)
    return eig, ((yc @ vec) ** 2).mean(0)


def test_small_shrink_whitens_the_fitting_batch() -> None:
    w = Whitening(6, shrink=1e-6).train()
    x = correlated_rows(400)
    y = w(x[None])[0]
    assert torch.allclose(y.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(y.T @ y / len(y), torch.eye(6), atol=1e-3)


def test_the_damped_map_caps_large_directions_and_damps_small_ones() -> None:
    shrink = 1.0
    x = correlated_rows(2000, dim=8)
    y = Whitening(8, shrink).train()(x[None])[0]
    eig, out = variances_along_eigenvectors(x, y)
    expected = eig * (1 + shrink) / (eig + shrink * eig.mean())
    assert torch.allclose(out, expected, rtol=1e-3, atol=1e-5)
    assert bool((out <= 1 + shrink).all())
    share_in, share_out = eig[0] / eig.sum(), out[0] / out.sum()  # the smallest direction gains share
    assert share_out > share_in


def test_fitted_once_and_padding_rows_do_not_count() -> None:
    x = correlated_rows(300)
    padded = torch.cat([x, torch.full((100, 6), 1e3)])[None]
    valid = torch.cat([torch.ones(300, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)])[None]
    a, b = Whitening(6).train(), Whitening(6).train()
    a(padded, valid)
    b(x[None])
    assert torch.allclose(a.map_DD, b.map_DD) and torch.allclose(a.mean_D, b.mean_D)
    fitted = a.map_DD.clone()
    a(correlated_rows(300, seed=1)[None])  # a later batch: no refit
    assert torch.equal(a.map_DD, fitted) and torch.allclose(fitted, fitted.T, atol=1e-5)


def test_unfitted_in_eval_mode_fails_and_a_loaded_state_is_used() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        Whitening(6).eval()(correlated_rows(4)[None])
    with pytest.raises(ValueError, match="shrink"):
        Whitening(6, shrink=0.0)
    trained = Whitening(6).train()
    trained(correlated_rows(300)[None])
    loaded = Whitening(6)
    loaded.load_state_dict(trained.state_dict())
    x = correlated_rows(5, seed=3)[None]
    assert torch.equal(loaded.eval()(x), trained.eval()(x))


def test_gradient_flows_to_the_input() -> None:
    w = Whitening(6).train()
    w(correlated_rows(300)[None])
    x = correlated_rows(4, seed=2).requires_grad_(True)
    w(x[None]).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
