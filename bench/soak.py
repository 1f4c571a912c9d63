"""Soak: many mixed HT / LL rounds with random shapes and routing, every result checked.

    python -m portep.bench.soak --iterations 2000 --ranks 4 --ranks-per-node 2

Every rank derives every rank's inputs from ``(seed, iteration, rank)``, so each checks its own
results against :mod:`portep.reference` locally: the ranks talk only through portep. Reports
iterations, mismatches (must be 0), peak memory per rank, the proxy threads each rank ran (one per
transport, shared by all its Buffers), and shared-memory segments and processes left behind after
the job (must be 0). Exit status 0 only when all three are 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

HIDDENS = (128, 256, 512)
EXPERTS_PER_RANK = (1, 2, 4)
MAX_TOKENS = 32
HT_COMBINE_DIFF = 1e-4  # partial sums cross the network in bf16
LL_COMBINE_DIFF = 1e-5


def _shape(seed: int, iteration: int, world: int) -> dict[str, Any]:
    """The iteration's shape, the same on every rank."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    num_experts = world * pick(EXPERTS_PER_RANK)
    return {"mode": pick(("ht", "ll")), "hidden": pick(HIDDENS), "num_experts": num_experts,
            "topk": int(torch.randint(1, min(num_experts, 8) + 1, (1,), generator=gen))}


def _inputs(seed: int, iteration: int, rank: int, shape: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s tokens, routing and weights (any rank can rebuild any rank's)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 4099 + rank)
    tokens = int(torch.randint(0, MAX_TOKENS + 1, (1,), generator=gen))
    x = (torch.randn(tokens, shape["hidden"], generator=gen) * 2).bfloat16()
    scores = torch.rand(tokens, shape["num_experts"], generator=gen)
    topk_idx = scores.topk(shape["topk"], dim=1).indices.to(torch.int64)
    topk_idx = topk_idx.masked_fill(torch.rand(tokens, shape["topk"], generator=gen) < 0.1, -1)
    weights = torch.rand(tokens, shape["topk"], generator=gen) + 0.1
    return x, topk_idx, weights


def _ht_round(buffer: Any, rank: int, world: int, inputs: list[tuple[torch.Tensor, ...]],
              shape: dict[str, Any]) -> list[str]:
    from portep import reference

    x, topk_idx, weights = inputs[rank]
    num_experts = shape["num_experts"]
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights)
    ref = reference.ht_dispatch([i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs],
                                num_experts, rank)
    errors = []
    if not torch.equal(recv_x, ref.recv_x):
        errors.append("HT dispatch: recv_x differs from the reference")
    if not torch.equal(recv_idx, ref.recv_topk_idx):
        errors.append("HT dispatch: recv_topk_idx differs from the reference")
    combined, _, _ = buffer.combine(recv_x, handle)
    want = x.float() * in_rank.sum(1, keepdim=True)
    if x.size(0) and reference.calc_diff(combined.float(), want) > HT_COMBINE_DIFF:
        errors.append(f"HT combine: calc_diff {reference.calc_diff(combined.float(), want):.2e}")
    return errors


def _ll_round(buffer: Any, rank: int, world: int, inputs: list[tuple[torch.Tensor, ...]],
              shape: dict[str, Any]) -> list[str]:
    from portep import reference

    x, topk_idx, weights = inputs[rank]
    num_experts = shape["num_experts"]
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts,
                                                                   use_fp8=False)
    ref = reference.ll_dispatch([i[0] for i in inputs], [i[1] for i in inputs], MAX_TOKENS, num_experts, rank)
    errors = []
    if not torch.equal(recv_count, ref.recv_count):
        errors.append("LL dispatch: recv_count differs from the reference")
    else:
        for e, count in enumerate(recv_count.tolist()):
            if not torch.equal(recv_x[e, :count], ref.recv_x[e]):
                errors.append(f"LL dispatch: rows of local expert {e} differ from the reference")
    combined, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
    want = x.float() * torch.where(topk_idx >= 0, weights, 0.0).sum(1, keepdim=True)
    if x.size(0) and reference.calc_diff(combined.float(), want) > LL_COMBINE_DIFF:
        errors.append(f"LL combine: calc_diff {reference.calc_diff(combined.float(), want):.2e}")
    return errors


def soak_rank(rank: int, world: int, iterations: int, seed: int, time_budget_s: float) -> dict[str, Any]:
    """One rank's loop; returns its counts and the first mismatches."""
    from portep import Buffer

    group = dist.group.WORLD
    ht = Buffer(group, num_nvl_bytes=1 << 24, explicitly_destroy=True)
    ll_buffers: dict[int, Any] = {}
    done, mismatches, first = 0, 0, []
    start = time.monotonic()
    for iteration in range(iterations):
        shape = _shape(seed, iteration, world)
        inputs = [_inputs(seed, iteration, r, shape) for r in range(world)]
        if shape["mode"] == "ht":
            errors = _ht_round(ht, rank, world, inputs, shape)
        else:
            key = (shape["hidden"], shape["num_experts"])
            if key not in ll_buffers:
                size = Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, shape["hidden"], world, shape["num_experts"])
                ll_buffers[key] = Buffer(group, num_rdma_bytes=size, low_latency_mode=True,
                                         num_qps_per_rank=shape["num_experts"] // world, explicitly_destroy=True)
            errors = _ll_round(ll_buffers[key], rank, world, inputs, shape)
        done += 1
        if errors:
            mismatches += 1
            first.extend(f"iteration {iteration} ({shape}): {e}" for e in errors[:2])
        # Stop together: rank 0 decides, everyone follows (the decision itself goes through portep).
        if time.monotonic() - start > time_budget_s:
            flag = torch.ones(world, 1, dtype=torch.int64)
        else:
            flag = torch.zeros(world, 1, dtype=torch.int64)
        if int(ht._backend.exchange_counts(flag, "soak stop").max()):
            break
    from portep.proxy import service

    stats = ht.get_stats()
    buffers = [ht, *ll_buffers.values()]
    proxies = len(service.proxies())
    for buffer in buffers:
        buffer.destroy()
    return {"rank": rank, "pid": os.getpid(), "proxies": proxies, "buffers": len(buffers), "iterations": done,
            "mismatches": mismatches,
            "first_mismatches": first[:5],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "proxy_descriptors": stats.get("proxy_descriptors", 0), "backend": ht.backend_name}


def _segments_of(pids: list[int]) -> list[str]:
    """portep segments in /dev/shm created by ``pids`` (their names carry the creator's pid)."""
    marks = tuple(f"-{pid}-" for pid in pids)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("portep") and any(m in n for m in marks))


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")
            and open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"]


def main(argv: list[str] | None = None) -> int:
    from portep.launch import run_local

    parser = argparse.ArgumentParser(prog="python -m portep.bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=3600.0, help="stop early after this long")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)

    start = time.monotonic()
    results = run_local(soak_rank, args.ranks, args=(args.iterations, args.seed, args.time_budget_s),
                        ranks_per_node=args.ranks_per_node, timeout_s=args.time_budget_s + 600)
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    leaked_segments = _segments_of([r["pid"] for r in results])
    leaked_processes = _alive([r["pid"] for r in results])
    report = {
        "backend": results[0]["backend"], "ranks": args.ranks, "ranks_per_node": args.ranks_per_node,
        "iterations": results[0]["iterations"], "seconds": round(elapsed, 1),
        "mismatches": sum(r["mismatches"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "proxy_descriptors": sum(r["proxy_descriptors"] for r in results),
        "proxy_threads_per_rank": max(r["proxies"] for r in results),
        "buffers_per_rank": max(r["buffers"] for r in results),
        "leaked_segments": leaked_segments, "leaked_processes": leaked_processes,
        "first_mismatches": [m for r in results for m in r["first_mismatches"]][:10],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    ok = report["mismatches"] == 0 and not leaked_segments and not leaked_processes
    print("soak: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
