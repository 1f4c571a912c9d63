"""Run a function on N local ranks (real processes, gloo over loopback) and collect results.

Used by ``portep demo`` and the benchmarks. Every wait is bounded; on a failure or a timeout
the surviving ranks are killed and the error names the ranks concerned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .errors import CommTimeoutError, PeerFailureError
from .topology import RANKS_PER_NODE_ENV


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, env: dict[str, str], args: tuple,
            results: Any, timeout_s: float) -> None:
    os.environ.update(env)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, the parent decides
        results.put((rank, False, traceback.format_exc()))


def _collect(results: Any, procs: list, timeout_s: float) -> tuple[dict[int, Any], dict[int, str]]:
    world_size = len(procs)
    out: dict[int, Any] = {}
    failures: dict[int, str] = {}

    def take(item: tuple) -> None:
        rank, ok, value = item
        (out if ok else failures)[rank] = value

    deadline = time.monotonic() + timeout_s
    while len(out) + len(failures) < world_size:
        try:
            take(results.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        pending = sorted(set(range(world_size)) - set(out) - set(failures))
        dead = [r for r in pending if procs[r].exitcode is not None]
        if dead:
            time.sleep(0.5)  # a result may still be on its way through the queue
            while not results.empty():
                take(results.get())
            for r in dead:
                if r not in out and r not in failures:
                    failures[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
        elif time.monotonic() > deadline:
            raise CommTimeoutError("run_local", timeout_s, pending)
    return out, failures


def run_local(fn: Callable, world_size: int, args: tuple = (), ranks_per_node: int | None = None,
              timeout_s: float = 300.0, env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank.

    ``fn`` must be importable (a module-level function). ``ranks_per_node`` makes virtual nodes.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child_env = dict(env or {})
    if ranks_per_node is not None:
        child_env[RANKS_PER_NODE_ENV] = str(ranks_per_node)
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, child_env, args, results, timeout_s),
                         daemon=True) for r in range(world_size)]
    for proc in procs:
        proc.start()
    try:
        out, failures = _collect(results, procs, timeout_s)
        if failures:
            raise PeerFailureError("run_local", failures, detail=failures[min(failures)])
        return [out[r] for r in range(world_size)]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
