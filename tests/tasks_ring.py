"""Tasks (run inside the rank pool) about the ring backend's machinery: proxy stats, a broken
link, ranks that disagree on shapes, dropped messages, a rank that leaves first."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from portep.errors import CommTimeoutError, PeerFailureError, PortepError, TransportError
from tests import tasks_ht, tasks_ll
from tests.tasks_common import (
    environment,
    generator,
    ht_buffer,
    ll_buffer,
    make_routing,
    make_x,
    new_ll_buffer,
    set_topology,
)


def proxy_stats(rank: int, world_size: int, *, num_nodes: int) -> dict[str, int]:
    """Run an HT and an LL round trip on the ring backend; return this rank's HT and LL stats."""
    tasks_ht.dispatch_combine(rank, world_size, seed=41, num_nodes=num_nodes, num_tokens=24, hidden=256,
                              num_experts=4 * world_size, topk=4, backend="ring")
    tasks_ll.dispatch_combine(rank, world_size, seed=42, num_nodes=num_nodes, num_tokens=12, max_tokens=16,
                              hidden=256, num_experts=2 * world_size, topk=3, backend="ring")
    ht_buf, ll_buf = ht_buffer(world_size, num_nodes, 256, "ring"), ll_buffer(world_size, num_nodes, 16, 256,
                                                                               2 * world_size, "ring")
    ht, ll = ht_buf.get_stats(), ll_buf.get_stats()
    proxies = {id(b._backend.proxy) for b in (ht_buf, ll_buf) if b._backend.proxy is not None}
    return {**{f"ht_{k}": v for k, v in ht.items()}, **{f"ll_{k}": v for k, v in ll.items()}, "proxies": len(proxies)}


def _ll_round(buffer: Any, rank: int, seed: int, max_tokens: int, hidden: int, num_experts: int) -> torch.Tensor:
    gen = generator(seed, rank)
    topk_idx, weights = make_routing(gen, max_tokens, num_experts, 3)
    x = make_x(gen, max_tokens, hidden)
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, max_tokens, num_experts, use_fp8=False)
    out, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
    return out


def broken_link(rank: int, world_size: int, *, victim: int, peer: int, timeout_s: float) -> dict[str, Any]:
    """``victim``'s proxy loses its link to ``peer`` (on another node), as a broken cable would: the
    next LL round fails on every rank within the deadline — the victim names ``peer``, the others
    hear of it — and a new Buffer works."""
    os.environ["PORTEP_TIMEOUT_S"] = str(timeout_s)
    try:
        buffer = new_ll_buffer(world_size, 2, 8, 128, 2 * world_size, "ring")
    finally:
        os.environ["PORTEP_TIMEOUT_S"] = "45"
    _ll_round(buffer, rank, 51, 8, 128, 2 * world_size)  # works before the break
    dist.barrier()
    if rank == victim:
        backend = buffer._backend
        backend.proxy.break_rank(backend.endpoint, peer)
    dist.barrier()
    start = time.monotonic()
    try:
        _ll_round(buffer, rank, 52, 8, 128, 2 * world_size)
    except (TransportError, PeerFailureError, CommTimeoutError, PortepError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = ""
    elapsed = time.monotonic() - start
    dist.barrier()
    del buffer
    fresh = new_ll_buffer(world_size, 2, 8, 128, 2 * world_size, "ring", explicitly_destroy=True)
    try:
        out = _ll_round(fresh, rank, 53, 8, 128, 2 * world_size)
        finite = bool(torch.isfinite(out.float()).all())
    finally:
        fresh.destroy()
    return {"error": error, "elapsed": elapsed, "fresh_ok": finite}


def mismatched_call(rank: int, world_size: int, *, param: str) -> str:
    """Rank 0 calls LL dispatch with a different ``param``: every rank gets a clear error, no hang."""
    values = {"hidden": 128, "max_tokens": 8, "num_experts": 2 * world_size}
    if rank == 0:
        values[param] *= 2
    buffer = new_ll_buffer(world_size, 2, values["max_tokens"], values["hidden"], values["num_experts"], "ring")
    gen = generator(61, rank)
    topk_idx, _ = make_routing(gen, 8, values["num_experts"], 3)
    x = make_x(gen, 8, values["hidden"])
    try:
        buffer.low_latency_dispatch(x, topk_idx, values["max_tokens"], values["num_experts"], use_fp8=False)
    except (PortepError, ValueError) as exc:
        return str(exc)
    return ""


def mismatched_layout(rank: int, world_size: int, *, variable: str, value: str) -> str:
    """Rank 1 creates a Buffer with ``variable=value`` in its environment: every rank refuses the
    Buffer with an error naming the ranks and the variables, before any data moves."""
    import portep

    set_topology(world_size, 2, "ring")
    with environment(**({variable: value} if rank == 1 else {})):
        try:
            portep.Buffer(dist.group.WORLD, 0, 1 << 20)
        except ValueError as exc:
            return str(exc)
    return ""


def dropped_messages(rank: int, world_size: int, *, drop: float, timeout_s: float) -> dict[str, Any]:
    """The fabric between nodes drops messages: each LL round either matches the local expectation
    or fails within the deadline naming the operation — never a wrong result."""
    import portep
    from portep.reference import calc_diff

    set_topology(world_size, 2, "ring")
    with environment(PORTEP_TRANSPORT="fabric", PORTEP_FAULTS=f"drop={drop},seed={rank + 1}",
                     PORTEP_TIMEOUT_S=str(timeout_s)):
        size = portep.Buffer.get_low_latency_rdma_size_hint(8, 128, world_size, 2 * world_size)
        buffer = portep.Buffer(dist.group.WORLD, 0, size, low_latency_mode=True)

    start = time.monotonic()
    gen = generator(71, rank)
    topk_idx, weights = make_routing(gen, 8, 2 * world_size, 3)
    x = make_x(gen, 8, 128)
    try:
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, 8, 2 * world_size, use_fp8=False)
        out, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
    except (CommTimeoutError, PeerFailureError) as exc:
        return {"error": str(exc), "elapsed": time.monotonic() - start,
                "dropped": buffer.get_stats().get("proxy_transport_dropped", 0)}
    want = x.float() * torch.where(topk_idx >= 0, weights, 0.0).sum(1, keepdim=True)
    return {"error": "", "diff": calc_diff(out.float(), want), "elapsed": time.monotonic() - start,
            "dropped": buffer.get_stats().get("proxy_transport_dropped", 0)}


def destroy_right_after(rank: int, world_size: int, *, cycles: int, delay_rank: int) -> int:
    """Create a Buffer, run one LL round, destroy it — ``cycles`` times. ``delay_rank`` is slow to
    read its last message, so the others reach the end of ``destroy`` first: their last chunks must
    still arrive (a rank that leaves may not cut off what it sent)."""
    rounds = 0
    for cycle in range(cycles):
        buffer = new_ll_buffer(world_size, 2, 8, 128, 2 * world_size, "ring", explicitly_destroy=True)
        _ll_round(buffer, rank, 80 + cycle, 8, 128, 2 * world_size)
        if rank == delay_rank:
            time.sleep(0.3)
        buffer.destroy()
        rounds += 1
    return rounds
