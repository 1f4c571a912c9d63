"""Trivial tasks that exercise the rank pool itself."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from tests.rankpool import worker_cache


def ping(rank: int, world_size: int, value: int = 0) -> tuple[int, int, int, int]:
    """All-reduce ``rank + value``; returns (rank, world_size, sum, pid)."""
    t = torch.tensor([rank + value])
    dist.all_reduce(t)
    return rank, world_size, int(t), os.getpid()


def fail_on(rank: int, world_size: int, bad_rank: int) -> int:
    if rank == bad_rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    return rank


def sleep_on(rank: int, world_size: int, slow_rank: int, seconds: float) -> int:
    if rank == slow_rank:
        time.sleep(seconds)
    return rank


def remember(rank: int, world_size: int, value: int) -> int | None:
    """Store ``value`` in the worker cache and return the previous one."""
    previous = worker_cache().get("remember")
    worker_cache()["remember"] = value
    return previous
