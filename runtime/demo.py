"""``portep demo``: one HT and one LL dispatch/combine on 4 local ranks (2 nodes x 2), checked."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import reference
from .buffer import Buffer

HIDDEN, NUM_EXPERTS, TOPK, NUM_TOKENS = 1024, 16, 4, 64


def _routing(num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(num_tokens, NUM_EXPERTS, generator=gen)
    return scores.topk(TOPK, dim=1).indices


def demo_rank(rank: int, world_size: int) -> dict:
    """Run on every rank: HT then LL round trips, compared with the reference."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).bfloat16()
    topk_idx = _routing(NUM_TOKENS, gen)
    weights = torch.rand(NUM_TOKENS, TOPK, generator=gen)
    group = dist.group.WORLD
    rdma = Buffer.get_low_latency_rdma_size_hint(NUM_TOKENS, HIDDEN, world_size, NUM_EXPERTS)
    buffer = Buffer(group, num_nvl_bytes=1 << 20, num_rdma_bytes=rdma, low_latency_mode=True)

    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights)
    combined, _, _ = buffer.combine(recv_x, handle)
    copies = in_rank.sum(1, keepdim=True).float()
    ht_diff = reference.calc_diff(combined.float(), x.float() * copies)
    ht_stats = buffer.get_stats()

    buffer.clean_low_latency_buffer(NUM_TOKENS, HIDDEN, NUM_EXPERTS)
    (recv_fp8, scales), recv_count, ll_handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, NUM_TOKENS, NUM_EXPERTS, use_fp8=True, return_recv_hook=True)
    hook()
    expert_out = reference.per_token_cast_back(recv_fp8.flatten(0, 1), scales.flatten(0, 1))
    expert_out = expert_out.view(recv_fp8.shape).bfloat16()
    out, _, _ = buffer.low_latency_combine(expert_out, topk_idx, weights, ll_handle)
    ll_diff = reference.calc_diff(out.float(), x.float() * weights.sum(1, keepdim=True))
    stats = buffer.get_stats()
    return {
        "rank": rank, "node": buffer.topology.node, "ht_recv_tokens": recv_x.size(0),
        "ht_rows_internode": ht_stats["rows_peers"], "ht_rows_intranode": ht_stats["rows_node"],
        "ht_bytes": ht_stats["bytes_peers"] + ht_stats["bytes_node"], "ht_combine_diff": ht_diff,
        "ll_recv_rows": int(recv_count.sum()), "ll_bytes": stats["bytes_world"] - ht_stats["bytes_world"],
        "ll_combine_diff": ll_diff, "backend": buffer.backend_name,
    }


def main(world_size: int = 4, ranks_per_node: int = 2) -> int:
    from .launch import run_local

    print(f"portep demo: {world_size} ranks ({world_size // ranks_per_node} nodes x {ranks_per_node}), "
          f"{NUM_TOKENS} tokens x hidden {HIDDEN}, top-{TOPK} of {NUM_EXPERTS} experts")
    rows = run_local(demo_rank, world_size, ranks_per_node=ranks_per_node, timeout_s=180)
    print(f"backend: {rows[0]['backend']}")
    header = ("rank", "node", "HT recv", "HT rows net", "HT rows node", "HT bytes", "HT diff",
              "LL recv", "LL bytes", "LL diff")
    print(" ".join(f"{h:>12}" for h in header))
    ok = True
    for r in rows:
        ok &= r["ht_combine_diff"] < 5e-6 and r["ll_combine_diff"] < 9e-4
        print(" ".join(f"{v:>12}" for v in (
            r["rank"], r["node"], r["ht_recv_tokens"], r["ht_rows_internode"], r["ht_rows_intranode"],
            r["ht_bytes"], f"{r['ht_combine_diff']:.1e}", r["ll_recv_rows"], r["ll_bytes"],
            f"{r['ll_combine_diff']:.1e}")))
    print("result: " + ("OK, every combine matches the reference" if ok else "MISMATCH"))
    return 0 if ok else 1
