"""Tasks that kill a rank in the middle of an operation (run in a throw-away rank pool).

Survivors record what they saw in ``out_dir/rank<r>.json``: the pool cannot return their results
once one of its workers is dead.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from portep.errors import PortepError
from tests.tasks_common import generator, make_routing, make_x, new_ht_buffer, new_ll_buffer

HIDDEN, EXPERTS_PER_RANK, TOKENS, TOPK = 128, 2, 16, 3


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def _ht_round(buffer: Any, rank: int, seed: int, victim: int | None, phase: str) -> None:
    num_experts = EXPERTS_PER_RANK * buffer.group_size
    gen = generator(seed, rank)
    topk_idx, weights = make_routing(gen, TOKENS, num_experts, TOPK)
    x = make_x(gen, TOKENS, HIDDEN)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    if rank == victim and phase == "dispatch":
        _die()
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2], topk_idx=topk_idx, topk_weights=weights)
    if rank == victim and phase == "combine":
        _die()
    buffer.combine(recv_x, handle)


def kill_mid_operation(rank: int, world_size: int, *, victim: int, mode: str, phase: str, out_dir: str) -> None:
    """One good round, then ``victim`` dies at ``phase``; survivors must fail naming it."""
    if mode == "ht":
        buffer, round_ = new_ht_buffer(world_size, 2, HIDDEN, "ring"), _ht_round
    else:
        buffer = new_ll_buffer(world_size, 2, TOKENS, HIDDEN, EXPERTS_PER_RANK * world_size, "ring")
        round_ = _ll_round
    round_(buffer, rank, 1, None, phase)
    dist.barrier()
    start = time.monotonic()
    try:
        round_(buffer, rank, 2, victim, phase)
        outcome = {"error": "", "type": ""}
    except PortepError as exc:
        outcome = {"error": str(exc), "type": type(exc).__name__, "ranks": list(getattr(exc, "ranks", ()))}
    outcome["elapsed"] = time.monotonic() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))


def _ll_round(buffer: Any, rank: int, seed: int, victim: int | None, phase: str | None,
              record: dict[str, Any] | None = None) -> float:
    """One LL dispatch + combine; ``victim`` dies at ``phase`` (or is already dead, or None). Returns
    this rank's diff against ``x * Σ w_k scale(e_k)`` over experts on ranks other than ``victim``
    (a local check: no collective can include a dead rank). Meaningful only when the round
    completes, i.e. with shrink on. ``record`` gets ``victim_masked``: whether the dispatch left the
    victim out from the start (shrink masks a rank the control plane already reported dead)."""
    from portep.reference import calc_diff
    from tests.tasks_ll import expert_scale

    num_experts = EXPERTS_PER_RANK * buffer.group_size
    scales = torch.tensor([expert_scale(e) for e in range(num_experts)])
    gen = generator(seed, rank)
    topk_idx, weights = make_routing(gen, TOKENS, num_experts, TOPK)
    x = make_x(gen, TOKENS, HIDDEN)
    if rank == victim and phase == "dispatch":
        _die()
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, TOKENS, num_experts, use_fp8=False)
    if record is not None:
        record["victim_masked"] = victim is not None and bool(handle.masked[victim])
    if rank == victim and phase == "combine":
        _die()
    y = torch.zeros_like(recv_x)
    for e in range(EXPERTS_PER_RANK):
        count = int(recv_count[e])
        y[e, :count] = (recv_x[e, :count].float() * expert_scale(rank * EXPERTS_PER_RANK + e)).to(y.dtype)
    combined, _, _ = buffer.low_latency_combine(y, topk_idx, weights, handle)
    live = (topk_idx >= 0) & (topk_idx // EXPERTS_PER_RANK != victim)
    factor = torch.where(live, weights * scales[topk_idx.clamp(min=0)], 0.0).sum(1, keepdim=True)
    return calc_diff(combined, x.float() * factor)


def shrink_in_flight(rank: int, world_size: int, *, victim: int, phase: str, out_dir: str) -> None:
    """``enable_shrink``: ``victim`` dies at ``phase`` of an LL round, while the others are in it.
    They finish that round without it (dropped once the control plane reports it dead), then run
    another with it masked; both give the live ranks' share, and the mask shows it."""
    buffer = new_ll_buffer(world_size, 2, TOKENS, HIDDEN, EXPERTS_PER_RANK * world_size, "ring",
                           enable_shrink=True)
    _ll_round(buffer, rank, 5, None, None)
    dist.barrier()
    start = time.monotonic()
    diffs = [_ll_round(buffer, rank, 6, victim, phase)]
    elapsed = time.monotonic() - start
    diffs.append(_ll_round(buffer, rank, 7, victim, None))
    status = torch.zeros(world_size, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"diffs": diffs, "mask": status.tolist(),
                                                             "elapsed": elapsed}))


def shrink_after_death(rank: int, world_size: int, *, victim: int, out_dir: str) -> None:
    """``enable_shrink``: after ``victim`` dies, survivors' LL rounds mask it (as reported by the
    control plane) and combine correctly without it. Checks are local (no collective can include
    a dead rank): the combined result must be ``x * Σ w_k scale(e_k)`` over experts on live ranks."""
    num_experts = EXPERTS_PER_RANK * world_size
    buffer = new_ll_buffer(world_size, 2, TOKENS, HIDDEN, num_experts, "ring", enable_shrink=True)
    dist.barrier()
    if rank == victim:
        _die()
    deadline = time.monotonic() + 10
    while victim not in buffer._backend.dead_ranks() and time.monotonic() < deadline:
        time.sleep(0.05)
    diffs = [_ll_round(buffer, rank, seed, victim, None) for seed in (3, 4)]
    status = torch.zeros(world_size, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"diffs": diffs, "mask": status.tolist()}))
