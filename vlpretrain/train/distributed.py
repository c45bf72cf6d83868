"""Process-group set-up and the few collectives the loop needs.

Launch with ``torchrun --nproc_per_node=N -m vlpretrain train ...``; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT (multi-node: add ``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint``; nothing else changes).
The backend is nccl when CUDA is available and gloo otherwise. A plain ``python -m vlpretrain train`` is a world of 1
with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Initialise the process group from torchrun's environment (or a single-process env without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Destroy the process group if one was created."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few Python numbers over ranks (float64 on the loop's device)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.distributed:
        dist.barrier()


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
