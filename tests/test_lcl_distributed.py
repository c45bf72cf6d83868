"""LCL across ranks (gloo): the contrastive loss with gather-with-gradient equals one process on the concatenated
batch (loss and gradients, with unequal and empty per-rank counts), and whole training runs under DDP and FSDP2
equal a single process on the same documents."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

from vlpretrain.lcl.loss import contrastive_loss_sum

WORLD = 2
SPLITS = ((3, 2), (4, 0))  # pairs per rank: unequal (padding), and one rank without any
DIM, SCALE = 8, 7.0


def global_batch(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(total)
    return F.normalize(torch.randn(total, DIM, generator=g), dim=-1), F.normalize(torch.randn(total, DIM, generator=g),
                                                                                   dim=-1)  # fmt: skip


def reference(total: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Single-process symmetric InfoNCE (mean over pairs) and its gradients w.r.t. both feature matrices."""
    image, text = (t.clone().requires_grad_(True) for t in global_batch(total))
    logits = SCALE * image @ text.T
    labels = torch.arange(total)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss.item(), image.grad, text.grad


def worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = []
        for split in SPLITS:
            total = sum(split)
            first = sum(split[:rank])
            image, text = (t[first : first + split[rank]].clone().requires_grad_(True) for t in global_batch(total))
            loss_sum, count = contrastive_loss_sum(image, text, torch.tensor(SCALE))
            # what the loop does: every rank's sum over the global count; gradients summed over ranks (DDP)
            (loss_sum / count).backward()
            summed = loss_sum.detach().clone()
            dist.all_reduce(summed)
            # plain lists, not tensors: a tensor in a torch queue is shared through a file descriptor that dies with
            # this process, so a parent that reads the queue after the worker exits (a busy machine) would fail
            grads = [[] if g is None else g.tolist() for g in (image.grad, text.grad)]
            results.append((summed.item() / count, count, *grads))
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.skipif(sys.platform != "linux", reason="gloo workers are spawned on Linux only here")
def test_gather_with_grad_equals_single_process_on_concatenated_batch() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, queue)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for i, split in enumerate(SPLITS):
        total = sum(split)
        loss, image_grad, text_grad = reference(total)
        for rank in range(WORLD):
            global_loss, count, *grads = out[rank][i]
            rank_image_grad, rank_text_grad = (torch.tensor(g, dtype=torch.float32).reshape(-1, DIM) for g in grads)
            first = sum(split[:rank])
            assert count == total and global_loss == pytest.approx(loss, rel=1e-6)
            assert torch.allclose(rank_image_grad, image_grad[first : first + split[rank]], atol=1e-6)
            assert torch.allclose(rank_text_grad, text_grad[first : first + split[rank]], atol=1e-6)


def _train(config: Path, ranks: int, *sets: str) -> list[float]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone"] if ranks > 1 \
        else [sys.executable]  # fmt: skip
    cmd = [*launch, "-m", "vlpretrain", "train", str(config), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(next(s.split("=", 1)[1] for s in sets if s.startswith("out_dir=")))
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.distributed
def test_ddp_and_fsdp_equal_one_process_on_the_same_documents(shapes_one_shard: Path, tmp_path: Path) -> None:
    # one docs.jsonl: 2 ranks read alternate lines, so their 2 + 2 documents are the single process's 4; no random
    # layout or crop, so every sequence is the same; fp32
    cfg = {"task": "lcl", "model_preset": "tiny",
           "model": {"vit": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                     "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 128}, "max_len": 128,
                     "data": {"image_first_prob": 0.0, "crop_scale": [1.0, 1.0]}},
           "data": {"train": str(shapes_one_shard / "train" / "docs.jsonl"), "batch_size": 2, "shuffle_buffer": 0},
           "steps": 3, "precision": "fp32", "optim": {"lr": 3.0e-3}, "schedule": {"warmup_steps": 1},
           "log": {"every": 1, "progress": False, "peak_tflops": 1.0}}  # fmt: skip
    config = tmp_path / "lcl.yaml"
    config.write_text(yaml.safe_dump(cfg))
    single = _train(config, 1, "data.batch_size=4", f"out_dir={tmp_path / 'single'}")
    ddp = _train(config, 2, "parallel=ddp", f"out_dir={tmp_path / 'ddp'}")
    fsdp = _train(config, 2, "parallel=fsdp", f"out_dir={tmp_path / 'fsdp'}")
    assert len(single) == 3 and single[-1] < single[0]
    assert ddp == pytest.approx(single, rel=1e-4) and fsdp == pytest.approx(single, rel=1e-4)
