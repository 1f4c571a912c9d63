"""Buffer with CUDA tensors against the same Buffer with CPU tensors, in one run.

    python -m portep.bench.gpu_buffer --ranks 4 --ranks-per-node 2 [--json FILE]

Local ranks share the machine's GPU(s) as separate processes. For each mode and size it times
dispatch + combine (median and p99 over the iterations, slowest rank) with ``PORTEP_DEVICE=cuda``
and with ``PORTEP_DEVICE=cpu`` on the same inputs, and checks the combined result once. On CUDA the
kernels run on the GPU and rows cross between ranks through host windows (staged copies), so the
difference between the two columns is what the kernels gain minus what staging costs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

HIDDEN, EXPERTS, TOPK = 7168, 256, 8


def _inputs(rank: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(tokens, HIDDEN, generator=gen).bfloat16()
    idx = torch.rand(tokens, EXPERTS, generator=gen).topk(TOPK, dim=1).indices
    weights = torch.rand(tokens, TOPK, generator=gen)
    return x.to(device), idx.to(device), weights.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Any, device: torch.device, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed) * 1e3)
    return times


def _ll_round(ll: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, max_tokens: int) -> torch.Tensor:
    recv, _, handle, _, _ = ll.low_latency_dispatch(x, idx, max_tokens, EXPERTS, use_fp8=False)
    return ll.low_latency_combine(recv, idx, w, handle)[0]


def _ht_round(ht: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, layout: tuple) -> torch.Tensor:
    recv, _, _, _, handle, _ = ht.dispatch(x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                                           is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                                           topk_idx=idx, topk_weights=w)
    return ht.combine(recv, handle)[0]


def _row(mode: str, tokens: int, device: str, times: list[float], diff: float) -> dict[str, Any]:
    times = sorted(times)
    return {"mode": mode, "tokens": tokens, "device": device, "median_ms": times[len(times) // 2],
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))], "diff": diff}


def bench_rank(rank: int, world: int, device_name: str, ll_tokens: list[int], ht_tokens: list[int],
               iters: int) -> list[dict[str, Any]]:
    """One rank: LL and HT round trips at each size on ``device_name``; returns rows (rank 0's)."""
    os.environ["PORTEP_DEVICE"] = device_name
    from portep import Buffer
    from portep.reference import calc_diff

    device = torch.device("cuda", torch.cuda.current_device()) if device_name == "cuda" else torch.device("cpu")
    rows = []
    ll = Buffer(dist.group.WORLD, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(
        max(ll_tokens), HIDDEN, world, EXPERTS), low_latency_mode=True, num_qps_per_rank=EXPERTS // world)
    for tokens in ll_tokens:
        x, idx, w = _inputs(rank, tokens, device)
        step = functools.partial(_ll_round, ll, x, idx, w, max(ll_tokens))
        diff = calc_diff(step().float().cpu(), (x.float() * w.sum(1, keepdim=True)).cpu())
        rows.append(_row("LL", tokens, device_name, _time(step, device, iters), diff))
    ht = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 28)
    for tokens in ht_tokens:
        x, idx, w = _inputs(rank, tokens, device)
        layout = ht.get_dispatch_layout(idx, EXPERTS)
        step = functools.partial(_ht_round, ht, x, idx, w, layout)
        diff = calc_diff(step().float().cpu(), (x.float() * layout[3].sum(1, keepdim=True).float()).cpu())
        rows.append(_row("HT", tokens, device_name, _time(step, device, iters), diff))
    return rows


def main(argv: list[str] | None = None) -> int:
    from portep.launch import run_local

    parser = argparse.ArgumentParser(prog="python -m portep.bench.gpu_buffer", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--ll-tokens", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--ht-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_buffer: no GPU visible to torch")
        return 2
    results = []
    for device in ("cuda", "cpu"):
        rows = run_local(bench_rank, args.ranks, args=(device, args.ll_tokens, args.ht_tokens, args.iters),
                         ranks_per_node=args.ranks_per_node, timeout_s=600)
        results.extend(rows[0])
    print(f"{args.ranks} ranks ({args.ranks // args.ranks_per_node} nodes x {args.ranks_per_node}) on "
          f"{torch.cuda.get_device_name()}, hidden {HIDDEN}, top-{TOPK} of {EXPERTS}, BF16, dispatch + combine")
    print(f"{'mode':>4} {'tokens':>6} {'cuda median/p99 ms':>20} {'cpu median/p99 ms':>20} {'cuda diff':>10}")
    by_key = {(r["mode"], r["tokens"], r["device"]): r for r in results}
    for mode, tokens in dict.fromkeys((r["mode"], r["tokens"]) for r in results):
        g, c = by_key[(mode, tokens, "cuda")], by_key[(mode, tokens, "cpu")]
        print(f"{mode:>4} {tokens:>6} {g['median_ms']:>9.2f} /{g['p99_ms']:>8.2f} {c['median_ms']:>9.2f} /"
              f"{c['p99_ms']:>8.2f} {g['diff']:>10.1e}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
