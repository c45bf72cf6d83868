"""CosineCodebook: nearest codes, straight-through gradients, commitment loss, fp32 under autocast, masks, EMA,
k-means init, dead-code restarts, a learning run on a cluster mixture, the official key, and two gloo ranks."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

from vlpretrain.core import quantize
from vlpretrain.core.quantize import CosineCodebook, perplexity


@pytest.fixture(autouse=True)
def one_thread():
    """These ops are tiny: extra threads only add synchronisation (and thrash a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixture(num_clusters: int, dim: int, sigma: float, seed: int, pole: float = 0.0) -> Callable[[int], Tensor]:
    """A sampler of n vectors [n, dim] from equally likely Gaussian clusters around random unit centres.

    ``pole`` > 0 gathers the centres in a cap around the first axis (the opposite side of the sphere stays empty).
    """
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_clusters, dim, generator=g) + pole * F.one_hot(torch.tensor(0), dim), dim=-1)

    def sample(n: int) -> Tensor:
        k = torch.randint(0, num_clusters, (n,), generator=g)
        return centres[k] + sigma * torch.randn(n, dim, generator=g)

    return sample


def held_out_use(q: CosineCodebook, z: Tensor) -> tuple[float, float, float]:
    """(fraction of codes used, perplexity, mean squared error on unit vectors) of encoding z [n, C]."""
    ids = q.encode(z)
    counts = torch.bincount(ids, minlength=q.num_codes).float()
    err = (q.indices_to_codes(ids) - F.normalize(z, dim=-1)).pow(2).sum(-1).mean()
    return (counts > 0).float().mean().item(), perplexity(counts).item(), err.item()


def test_nearest_code_is_brute_force_argmax_of_cosine(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    q = CosineCodebook(512, 32, kmeans_init=False).eval()
    z = 3.0 * torch.randn(4, 300, 32)  # not normalised: the quantizer does it
    cos = F.cosine_similarity(z[..., None, :], q.codebook, dim=-1)  # [4, 300, 512]
    monkeypatch.setattr(quantize, "MAX_SCORE_ELEMENTS", 512 * 7)  # 7-row chunks
    ids = q.encode(z)
    assert ids.shape == (4, 300) and ids.dtype == torch.long
    assert torch.equal(ids, cos.argmax(-1))
    out = q(z)
    assert torch.equal(out.ids, ids)
    assert torch.equal(out.z_q, q.codebook[ids])  # exact code values in the forward pass
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(512), atol=1e-6)


def test_straight_through_gradient_reaches_the_input() -> None:
    torch.manual_seed(0)
    q = CosineCodebook(64, 32, kmeans_init=False).train()
    z = torch.randn(3, 10, 32, requires_grad=True)
    upstream = torch.randn(3, 10, 32)
    (q(z).z_q * upstream).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (F.normalize(z_ref, dim=-1) * upstream).sum().backward()  # identity through the quantizer, then l2norm
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-6)


def test_commitment_loss_equals_hand_computation_over_valid_vectors() -> None:
    torch.manual_seed(0)
    q = CosineCodebook(128, 32, beta=0.25, kmeans_init=False).eval()
    z = torch.randn(2, 50, 32, requires_grad=True)
    mask = torch.rand(2, 50) < 0.7
    out = q(z, mask)
    z_hat = F.normalize(z.detach(), dim=-1)
    per_vector = (q.codebook[out.ids] - z_hat).pow(2).sum(-1)  # ||sg(z_q) - z||^2
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss, 0.25 * per_vector[mask].mean(), atol=1e-6)
    out.loss.backward()  # the loss pulls z towards its code; padding gets no gradient
    assert torch.all(z.grad[~mask] == 0) and z.grad[mask].abs().sum() > 0
    assert q(z, torch.zeros(2, 50, dtype=torch.bool)).loss.item() == 0.0


def test_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    q = CosineCodebook(256, 32, kmeans_init=False)
    reference = copy.deepcopy(q).eval()
    proj = torch.nn.Linear(64, 32)
    x = torch.randn(4, 40, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = proj(x)
        assert z.dtype == torch.bfloat16
        out = q.eval()(z)
        out_train = q.train()(z)
    assert out.z_q.dtype == out.loss.dtype == out_train.z_q.dtype == out_train.loss.dtype == torch.float32
    assert torch.equal(out.ids, out_train.ids)
    assert torch.equal(out.ids, reference(z.float()).ids)  # the codes fp32 arithmetic gives on the same input


def test_masked_vectors_do_not_change_the_codebook() -> None:
    sample = mixture(16, 32, 0.1, seed=1)
    torch.manual_seed(0)
    plain = CosineCodebook(64, 32).train()  # 50 vectors a step: k-means seeds 50 codes, restarts fill the rest
    padded = copy.deepcopy(plain)
    restarted = 0.0
    for step in range(4):
        valid = sample(50)
        batch = 100.0 * torch.randn(2, 40, 32)  # padding: large vectors everywhere
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[0, :30], mask[1, :20] = True, True
        batch[mask] = valid
        torch.manual_seed(step)
        out_plain = plain(valid)
        torch.manual_seed(step)
        out_padded = padded(batch, mask)
        assert torch.allclose(out_plain.loss, out_padded.loss, atol=1e-6)
        assert out_plain.stats["vectors"] == out_padded.stats["vectors"] == 50
        restarted += out_padded.stats["restarted"].item()
    assert restarted > 0  # restart candidates were drawn, from valid vectors only
    for name, buffer in plain.state_dict().items():
        assert torch.allclose(buffer.float(), padded.state_dict()[name].float(), atol=1e-6), name
    codes = padded.codebook.clone()
    padded(torch.randn(2, 40, 32), torch.zeros(2, 40, dtype=torch.bool))  # nothing valid: codes stay
    assert torch.allclose(padded.codebook, codes, atol=1e-6)


def test_kmeans_waits_for_valid_vectors_and_unseeded_codes_are_filled_later() -> None:
    sample = mixture(8, 16, 0.1, seed=7)
    torch.manual_seed(0)
    q = CosineCodebook(64, 16).train()
    q(sample(40).reshape(4, 10, 16), torch.zeros(4, 10, dtype=torch.bool))
    assert not bool(q.initialised)  # an all-padding batch cannot seed k-means
    first = q(sample(40))  # 40 vectors seed 40 of the 64 codes; no restarts from the seeding batch
    assert bool(q.initialised) and first.stats["restarted"] == 0
    assert (q.ema_count > 0).sum() <= 40
    assert q(sample(40)).stats["restarted"] == 24  # the unseeded codes are dead and take the next batch's vectors


def test_ema_update_moves_a_used_code_toward_its_vectors_and_keeps_unit_norm() -> None:
    torch.manual_seed(0)
    q = CosineCodebook(8, 32, kmeans_init=False, dead_code_threshold=0.0).train()
    q.load_official(F.normalize(torch.randn(8, 32), dim=-1))  # EMA count 1, EMA sum = code
    old = q.codebook.clone()
    target = F.normalize(old[0] + 0.5 * F.normalize(torch.randn(32), dim=0), dim=0)
    z = F.normalize(target + 0.05 * torch.randn(20, 32), dim=-1)
    assert torch.all(q.encode(z) == 0)
    q(z)
    expected = F.normalize(0.99 * old[0] + 0.01 * z.sum(0), dim=0)
    assert torch.allclose(q.codebook[0], expected, atol=1e-6)
    assert torch.dot(q.codebook[0], target) > torch.dot(old[0], target)
    assert torch.allclose(q.codebook[1:], old[1:], atol=1e-6)  # unused codes keep their direction
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(8), atol=1e-6)
    assert torch.allclose(q.ema_count[0], torch.tensor(0.99 + 0.01 * 20))


def test_kmeans_init_beats_random_init_on_clustered_data() -> None:
    sample = mixture(64, 32, 0.1, seed=2)
    first, held_out = sample(2048), sample(8192)
    errors = {}
    for name, kwargs in {"random": dict(kmeans_init=False), "seeds": dict(kmeans_iters=0), "kmeans": {}}.items():
        torch.manual_seed(0)
        q = CosineCodebook(128, 32, dead_code_threshold=0.0, **kwargs).train()
        if name != "random":
            q(first)  # the first training batch initialises the codebook
            assert bool(q.initialised)
        errors[name] = held_out_use(q, held_out)[2]
    assert errors["kmeans"] < errors["seeds"] < errors["random"], errors
    assert errors["kmeans"] < 0.5 * errors["random"], errors


def collapsed_codebook(near: Tensor, num_codes: int) -> Tensor:
    """Unit codes [num_codes, C]: the vectors ``near`` (on the data), then codes on the far side of the sphere that
    no data vector picks: a collapsed book."""
    far = mixture(num_codes - len(near), near.shape[-1], 0.0, seed=9, pole=-8.0)(num_codes - len(near))
    return F.normalize(torch.cat([near, far]), dim=-1)


def test_dead_codes_are_restarted_from_batch_vectors() -> None:
    sample = mixture(128, 32, 0.1, seed=3, pole=8.0)
    held_out = sample(8192)
    used = {}
    for threshold in (0.0, 0.05):
        torch.manual_seed(0)
        q = CosineCodebook(256, 32, kmeans_init=False, dead_code_threshold=threshold).train()
        q.embedding.weight.copy_(collapsed_codebook(sample(16), 256))
        assert held_out_use(q, held_out)[0] <= 16 / 256
        restarted = sum(q(sample(1024)).stats["restarted"].item() for _ in range(5))
        used[threshold] = held_out_use(q, held_out)[0]
        assert (restarted > 0) == (threshold > 0)
    assert used[0.05] > 0.8 and used[0.0] <= 16 / 256, used


def test_codes_loaded_far_from_the_data_die_and_are_replaced() -> None:
    sample = mixture(128, 32, 0.1, seed=5, pole=8.0)
    held_out = sample(8192)
    torch.manual_seed(0)
    q = CosineCodebook(256, 32).train()
    q.load_official(collapsed_codebook(sample(16), 256))
    assert held_out_use(q, held_out)[0] <= 16 / 256
    for _ in range(250):  # an unused code's EMA count decays by 0.99 per step from its prior of 1
        q(sample(1024))
    assert held_out_use(q, held_out)[0] > 0.8


def test_learning_on_a_cluster_mixture_uses_most_codes() -> None:
    """K=1024 on 600 clusters, 300 steps of 1024 vectors. Measured: held-out usage 0.80, perplexity 631; a naive
    EMA codebook (random init, no restarts) 0.57 and 526. Held-out usage counts the codes hit by 32768 vectors
    (32 per code on average)."""
    results, stats = {}, {}
    for name, kwargs in {"ours": {}, "naive": dict(kmeans_init=False, dead_code_threshold=0.0)}.items():
        sample = mixture(600, 32, 0.05, seed=1)
        torch.manual_seed(0)
        q = CosineCodebook(1024, 32, **kwargs).train()
        for _ in range(300):
            stats[name] = q(sample(1024)).stats
        results[name] = held_out_use(q.eval(), sample(32768))
    (usage, ppl, err), (naive_usage, naive_ppl, naive_err) = results["ours"], results["naive"]
    assert 0.7 <= usage <= 1.0 and 560 < ppl <= 1024, results
    assert usage > naive_usage + 0.1 and ppl > naive_ppl + 50 and err < naive_err, results
    assert stats["ours"]["active_codes"] > 0.9 * 1024 and stats["ours"]["ema_perplexity"] > 0.6 * 1024, stats


def test_indices_to_codes_round_trip() -> None:
    torch.manual_seed(0)
    q = CosineCodebook(256, 32, kmeans_init=False).eval()
    z = torch.randn(2, 7, 32)
    ids = q.encode(z)
    codes = q.indices_to_codes(ids)
    assert codes.shape == (2, 7, 32) and codes.dtype == torch.float32
    assert torch.equal(codes, q(z).z_q)
    assert torch.equal(q.encode(codes), ids)
    every = torch.arange(256)
    assert torch.equal(q.encode(q.indices_to_codes(every)), every)


def test_official_key_maps_one_to_one_and_load_checks_the_tensor() -> None:
    torch.manual_seed(0)
    q = CosineCodebook(64, 32)
    assert list(q.parameters()) == []  # the optimiser never sees the codebook
    assert q.state_dict()["embedding.weight"].shape == (64, 32)
    official = {"quantize.embedding.weight": F.normalize(torch.randn(64, 32), dim=-1).half()}
    mapped = {k.removeprefix("quantize."): v for k, v in official.items()}
    q.load_official(mapped["embedding.weight"])
    assert torch.allclose(q.codebook, official["quantize.embedding.weight"].float(), atol=1e-3)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(64), atol=1e-6) and bool(q.initialised)
    fresh = CosineCodebook(64, 32)
    fresh.load_state_dict(q.state_dict())  # a training checkpoint round trip keeps the EMA state too
    z = torch.randn(100, 32)
    assert torch.equal(fresh.encode(z), q.encode(z))
    with pytest.raises(ValueError, match="quantize.embedding.weight: expected shape"):
        q.load_official(torch.randn(32, 64))
    with pytest.raises(ValueError, match="unit-norm"):
        q.load_official(torch.randn(64, 32))


def test_bad_inputs_are_rejected() -> None:
    q = CosineCodebook(16, 8)
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 8\]"):
        q(torch.randn(3, 7))
    with pytest.raises(ValueError, match="mask must be bool"):
        q(torch.randn(3, 8), torch.ones(3))
    with pytest.raises(ValueError, match="mask must be bool"):
        q(torch.randn(3, 8), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="fp32"):
        q.to(torch.bfloat16).train()(torch.randn(3, 8))


def test_stats_usage_and_perplexity() -> None:
    assert perplexity(torch.ones(100)).item() == pytest.approx(100.0, rel=1e-5)
    assert perplexity(torch.tensor([0.0, 5.0, 0.0])).item() == pytest.approx(1.0)
    assert perplexity(torch.zeros(4)).item() == 0.0
    q = CosineCodebook(16, 8, kmeans_init=False).eval()
    z = q.indices_to_codes(torch.tensor([0, 0, 1, 2, 3, 3, 3, 3]))
    stats = q(z).stats
    assert stats["usage"].item() == 4 / 16 and stats["vectors"].item() == 8
    p = torch.tensor([2.0, 1.0, 1.0, 4.0]) / 8
    assert stats["perplexity"].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- two gloo ranks

DIST_CASES = {
    "full": dict(kmeans_init=True, dead_code_threshold=0.3),  # k-means seeds and restarts drawn across ranks
    "exact": dict(kmeans_init=False, dead_code_threshold=0.0),  # deterministic: equals one process on all the data
}
DIST_STEPS, DIST_ROWS, DIST_LEN = 6, 8, 16


def dist_batches() -> list[tuple[Tensor, Tensor]]:
    """The global batches [ROWS, LEN, 8] with masks; rank r takes rows [r * ROWS/2, (r+1) * ROWS/2)."""
    sample = mixture(24, 8, 0.2, seed=5)
    g = torch.Generator().manual_seed(6)
    batches = []
    for _ in range(DIST_STEPS):
        z = sample(DIST_ROWS * DIST_LEN).reshape(DIST_ROWS, DIST_LEN, 8)
        lengths = torch.randint(1, DIST_LEN + 1, (DIST_ROWS,), generator=g)
        lengths[DIST_ROWS // 2 :] //= 4  # rank 1 has far fewer valid vectors than rank 0
        batches.append((z, torch.arange(DIST_LEN) < lengths[:, None]))
    return batches


def run_dist_case(name: str, rank: int, world: int) -> dict[str, Tensor]:
    torch.manual_seed(0)  # identical initial codes on every rank
    q = CosineCodebook(64, 8, **DIST_CASES[name]).train()
    torch.manual_seed(100 + rank)  # different local sampling on each rank
    rows = DIST_ROWS // world
    restarted, vectors = 0.0, []
    for z, mask in dist_batches():
        out = q(z[rank * rows : (rank + 1) * rows], mask[rank * rows : (rank + 1) * rows])
        restarted += out.stats["restarted"].item()
        vectors.append(out.stats["vectors"].item())
    return q.state_dict() | {"restarted": torch.tensor(restarted), "vectors": torch.tensor(vectors)}


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        for name in DIST_CASES:
            torch.save(run_dist_case(name, rank, world), Path(out_dir) / f"{name}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_keep_identical_codebooks(tmp_path: Path) -> None:
    ctx = mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("gloo workers did not finish in 180 s")
    for name in DIST_CASES:
        rank0, rank1 = (torch.load(tmp_path / f"{name}_{r}.pt") for r in (0, 1))
        for key in ("embedding.weight", "ema_count", "ema_sum", "initialised", "vectors"):
            assert torch.equal(rank0[key], rank1[key]), (name, key)  # bitwise
    full = torch.load(tmp_path / "full_0.pt")
    assert bool(full["initialised"]) and full["restarted"] > 0  # both cross-rank sampling paths ran
    single = run_dist_case("exact", rank=0, world=1)  # one process, all rows
    exact = torch.load(tmp_path / "exact_0.pt")
    assert torch.equal(exact["vectors"], single["vectors"])
    for key in ("embedding.weight", "ema_count", "ema_sum"):
        assert torch.allclose(exact[key], single[key], atol=1e-6), key
