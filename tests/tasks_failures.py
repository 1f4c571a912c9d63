"""Tasks in which one rank kills its own process (SIGKILL) at a chosen moment of a Buffer's life,
over whichever inter-node transport the pool's environment selects (run in a throw-away pool).

Moments: ``created`` (right after the Buffer is made, before any call), ``between`` (after a good
round, before the next call), and in the middle of a call: ``ht-dispatch``, ``ll-dispatch``,
``ll-combine``. Survivors record what they saw in ``out_dir/rank<r>.json``: the pool cannot return
their results once one of its workers is dead.
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from portep.errors import PortepError
from portep.proxy import service
from tests.tasks_common import new_ht_buffer, new_ll_buffer
from tests.tasks_faults import EXPERTS_PER_RANK, HIDDEN, TOKENS, _die, _ht_round, _ll_round

MOMENTS = ("created", "between", "ht-dispatch", "ll-dispatch", "ll-combine")
NUM_NODES = 2
GONE_WITHIN_S = 10.0  # how long a survivor waits for the victim's process to disappear


def _process_gone(pid: int) -> bool:
    """Whether ``pid`` is gone with all its threads (absent, or a zombie not reaped yet). A killed
    process's leader turns zombie before its other threads have exited, and its files (sockets
    included) close only with the last of them."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return False
        except OSError:
            continue
    return True


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while not _process_gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"the victim's process {pid} is still running after {GONE_WITHIN_S:g} s")
        time.sleep(0.01)


def _pids() -> list[int]:
    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    return pids


def _error_record(exc: BaseException, start: float) -> dict[str, Any]:
    return {"type": type(exc).__name__, "error": str(exc), "ranks": [int(r) for r in getattr(exc, "ranks", ())],
            "portep": isinstance(exc, PortepError), "elapsed": time.monotonic() - start,
            "traceback": "" if isinstance(exc, PortepError) else traceback.format_exc()}


def _transport(buffer: Any) -> str:
    proxy = buffer._backend.proxy
    return proxy.transport_name if proxy is not None else ""


def _proxy_view(buffer: Any, victim: int) -> dict[str, Any]:
    """What this rank's proxy says about itself and about the victim (None: no complaint)."""
    backend = buffer._backend
    if backend.proxy is None:
        return {"proxy_failure": None, "victim_link": None}
    return {"proxy_failure": backend.proxy.failure(),
            "victim_link": backend.proxy.rank_failure(backend.endpoint, victim),
            "failed_peers": backend.proxy.stats().get("failed_peers", 0)}


def _finish(out_dir: str, rank: int, world_size: int, victim: int, outcome: dict[str, Any], held: list[Any]) -> None:
    """Once every survivor is done: drop this rank's Buffer (``held`` is the only reference) and
    stop its proxies, timing both (neither may hang on the dead peer), then write the outcome."""
    Path(out_dir, f"done{rank}").touch()
    deadline = time.monotonic() + GONE_WITHIN_S
    while not all(Path(out_dir, f"done{r}").exists() for r in range(world_size) if r != victim):
        if time.monotonic() > deadline:
            break  # a survivor is stuck: its missing outcome says so
        time.sleep(0.02)
    start = time.monotonic()
    held.clear()
    gc.collect()
    outcome["buffer_teardown_s"] = time.monotonic() - start
    start = time.monotonic()
    service.stop_proxies()
    outcome["proxy_teardown_s"] = time.monotonic() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))


def kill_at_moment(rank: int, world_size: int, *, victim: int, moment: str, out_dir: str) -> None:
    """``victim`` dies at ``moment``; each survivor records the error of its pending or next call
    (and then that the broken Buffer's next call fails at once instead of hanging)."""
    if moment not in MOMENTS:
        raise ValueError(f"unknown moment {moment!r}")
    pids = _pids()
    if moment in ("created", "ll-dispatch", "ll-combine"):
        buffer = new_ll_buffer(world_size, NUM_NODES, TOKENS, HIDDEN, EXPERTS_PER_RANK * world_size, "ring")
        round_ = _ll_round
    else:
        buffer, round_ = new_ht_buffer(world_size, NUM_NODES, HIDDEN, "ring"), _ht_round
    phase = moment.split("-", 1)[1] if "-" in moment else None
    if moment == "created":
        if rank == victim:
            _die()
        _wait_gone(pids[victim])
    else:
        round_(buffer, rank, 1, None, None)
        dist.barrier()
        if moment == "between":
            if rank == victim:
                _die()
            _wait_gone(pids[victim])
    outcome: dict[str, Any] = {"transport": _transport(buffer), "dead_known": victim in buffer._backend.dead_ranks()}
    start = time.monotonic()
    try:
        round_(buffer, rank, 2, victim, phase)
        outcome.update(type="", error="", ranks=[], elapsed=time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        outcome.update(_error_record(exc, start))
    start = time.monotonic()
    try:
        round_(buffer, rank, 3, victim, None)
        outcome["again"] = {"type": "", "error": "", "elapsed": time.monotonic() - start}
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        outcome["again"] = _error_record(exc, start)
    outcome.update(_proxy_view(buffer, victim))
    held = [buffer]
    del buffer
    _finish(out_dir, rank, world_size, victim, outcome, held)


def shrink_keeps_serving(rank: int, world_size: int, *, victim: int, moment: str, rounds: int, out_dir: str) -> None:
    """``enable_shrink``: ``victim`` dies at ``moment`` (``between``: after a good round, and the
    survivors go on at once, before the control plane has noticed; ``ll-dispatch`` /
    ``ll-combine``: in the middle of that call). Survivors then run ``rounds`` LL rounds on the
    same Buffer; each must give the live ranks' share (diff against a reference without the
    victim's experts), and the mask must show the victim alone."""
    if moment not in ("between", "ll-dispatch", "ll-combine"):
        raise ValueError(f"moment {moment!r}: shrink runs LL calls only")
    pids = _pids()
    buffer = new_ll_buffer(world_size, NUM_NODES, TOKENS, HIDDEN, EXPERTS_PER_RANK * world_size, "ring",
                           enable_shrink=True)
    _ll_round(buffer, rank, 5, None, None)
    dist.barrier()
    phase = moment.split("-", 1)[1] if "-" in moment else None
    if phase is None:
        if rank == victim:
            _die()
        _wait_gone(pids[victim])
    outcome: dict[str, Any] = {"transport": _transport(buffer), "diffs": [], "elapsed": [],
                               "dead_known": victim in buffer._backend.dead_ranks()}
    first: dict[str, Any] = {}
    try:
        for seed in range(6, 6 + rounds):
            start = time.monotonic()
            outcome["diffs"].append(_ll_round(buffer, rank, seed, victim, phase if seed == 6 else None,
                                              first if seed == 6 else None))
            outcome["elapsed"].append(time.monotonic() - start)
        outcome.update(type="", error="")
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        outcome.update(_error_record(exc, start))
    status = torch.zeros(world_size, dtype=torch.int32)
    try:
        buffer.low_latency_query_mask_buffer(status)
        outcome["mask"] = status.tolist()
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        outcome["mask"] = f"{type(exc).__name__}: {exc}"
    # The death may have been reported between the check above and the first dispatch, which then
    # left the victim out: it posted nothing to it, so its proxy had nothing to find.
    outcome["dead_known"] = outcome["dead_known"] or first.get("victim_masked", False)
    outcome.update(_proxy_view(buffer, victim))
    held = [buffer]
    del buffer
    _finish(out_dir, rank, world_size, victim, outcome, held)
