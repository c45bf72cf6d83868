"""Data streams for the loop: the config's paths -> a task's dataset -> a resumable :class:`DataStream`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vlpretrain.configs import ConfigError
from vlpretrain.data.errors import DataError
from vlpretrain.data.shards import DataStream, PairShardDataset, expand_urls
from vlpretrain.train.config import DataConfig
from vlpretrain.train.distributed import DistEnv


def check_data(cfg: DataConfig) -> None:
    """Fail before training when a data path is missing or matches no shard, naming the field."""
    if not cfg.train:
        raise ConfigError("data.train: no training data given")
    for field in ("train", "val"):
        spec = getattr(cfg, field)
        if not spec:
            continue
        try:
            expand_urls(spec)
        except DataError as err:
            raise ConfigError(f"data.{field}: {err}") from err


def pair_dataset(cfg: DataConfig, split: str, rank: int, world_size: int, decode: Callable, collate: Callable):
    """A :class:`PairShardDataset` over ``cfg.train`` or ``cfg.val``: the training split shuffles and loops
    forever; the validation split reads in order (and also loops, so every rank yields the same number of batches)."""
    train = split == "train"
    return PairShardDataset(
        cfg.train if train else cfg.val,
        decode,
        batch_size=cfg.batch_size,
        collate=collate,
        shuffle_buffer=cfg.shuffle_buffer if train else 0,
        seed=cfg.seed,
        infinite=True,
        drop_last=True,
        rank=rank,
        world_size=world_size,
    )


def build_stream(task: nn.Module, cfg: DataConfig, split: str, env: DistEnv, state: dict[str, Any] | None) -> Any:
    """The task's dataset for ``split`` wrapped in a DataStream (resumed from ``state`` when given)."""
    dataset = task.build_dataset(cfg, split, env.rank, env.world_size)
    workers = cfg.num_workers if split == "train" else 0
    return DataStream(dataset, num_workers=workers, state=state)
