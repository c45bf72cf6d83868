"""Linear and attentive probes learn separable toy tasks from frozen features, deterministically."""

from __future__ import annotations

import torch

from vlpretrain.eval.probe import ProbeConfig, extract_features, run, train_probe


def _mean_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 4, 8] token features whose mean is shifted along a class direction (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    features = torch.randn(n, 4, 8, generator=g) + 3.0 * torch.eye(8)[labels][:, None, :]
    return features, labels


def _position_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 6, 8] noise tokens; one token (at a random place) carries a marker (dim 0) and the class (dims 1..2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    features = 0.5 * torch.randn(n, 6, 8, generator=g)
    where = torch.randint(0, 6, (n,), generator=g)
    features[torch.arange(n), where, 0] += 4.0
    features[torch.arange(n), where, 1 + labels] += 4.0
    return features, labels


def test_linear_probe_learns_and_is_deterministic() -> None:
    config = ProbeConfig(kind="linear", epochs=20, batch_size=64, lr=1e-2)
    metrics = run(_mean_task(384, 0), _mean_task(256, 1), num_classes=3, config=config)
    assert metrics["probe_linear_top1"] >= 0.95 and metrics["probe_linear_train_top1"] >= 0.95
    a = train_probe(*_mean_task(128, 0), num_classes=3, config=config)
    b = train_probe(*_mean_task(128, 0), num_classes=3, config=config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_attentive_probe_finds_a_token_by_content() -> None:
    config = ProbeConfig(kind="attentive", epochs=25, batch_size=64, lr=3e-3)
    metrics = run(_position_task(384, 0), _position_task(256, 1), num_classes=2, config=config)
    assert metrics["probe_attentive_top1"] >= 0.9


def test_extract_features_from_a_frozen_encoder() -> None:
    encoder = torch.nn.Linear(3, 5)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), (torch.randn(2, 3), torch.tensor([1, 1]))]
    features, labels = extract_features(encoder, batches)
    assert features.shape == (6, 1, 5) and labels.tolist() == [0, 1, 0, 1, 1, 1]
    assert not features.requires_grad
