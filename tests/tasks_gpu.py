"""Buffer on a GPU (``PORTEP_DEVICE=cuda``): HT and LL round trips with CUDA tensors, checked
against the reference computed on the CPU. Several ranks share one GPU as separate processes."""

from __future__ import annotations

import torch

from portep import reference
from tests.tasks_common import (
    assert_close,
    assert_equal,
    gather,
    generator,
    make_routing,
    make_x,
    new_ht_buffer,
    new_ll_buffer,
)

HIDDEN, TOKENS, TOPK = 256, 24, 4


def gpu_round_trips(rank: int, world_size: int, *, num_nodes: int, seed: int) -> dict[str, str]:
    num_experts = 4 * world_size
    gen = generator(seed, rank)
    topk_idx, weights = make_routing(gen, TOKENS, num_experts, TOPK)
    x = make_x(gen, TOKENS, HIDDEN)
    all_x, all_idx, all_w = gather(x), gather(topk_idx), gather(weights)
    dev = torch.device("cuda", torch.cuda.current_device())
    x_d, idx_d, w_d = x.to(dev), topk_idx.to(dev), weights.to(dev)

    ht = new_ht_buffer(world_size, num_nodes, HIDDEN, explicitly_destroy=True)
    try:
        per_rank, per_rdma, per_expert, in_rank, _ = ht.get_dispatch_layout(idx_d, num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = ht.dispatch(
            x_d, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=idx_d, topk_weights=w_d)
        assert recv_x.is_cuda and recv_idx.is_cuda, f"rank {rank}: HT outputs left the GPU"
        ref = reference.ht_dispatch(all_x, all_idx, all_w, num_experts, rank)
        assert_equal(rank, "HT recv_x (cuda)", recv_x.cpu(), ref.recv_x)
        assert_equal(rank, "HT recv_topk_idx (cuda)", recv_idx.cpu(), ref.recv_topk_idx)
        combined, _, _ = ht.combine(recv_x, handle)
        assert combined.is_cuda
        assert_close(rank, "HT combine (cuda)", combined.cpu(), x.float() * in_rank.cpu().sum(1, keepdim=True), 1e-5)
    finally:
        ht.destroy()

    ll = new_ll_buffer(world_size, num_nodes, TOKENS, HIDDEN, num_experts, explicitly_destroy=True)
    try:
        for use_fp8 in (False, True):
            recv, count, handle, _, _ = ll.low_latency_dispatch(x_d, idx_d, TOKENS, num_experts, use_fp8=use_fp8)
            ref = reference.ll_dispatch(all_x, all_idx, TOKENS, num_experts, rank, use_fp8=use_fp8)
            assert_equal(rank, f"LL recv_count (cuda, fp8={use_fp8})", count.cpu(), ref.recv_count)
            rows = recv[0] if use_fp8 else recv
            assert rows.is_cuda, f"rank {rank}: LL outputs left the GPU"
            for e, want in enumerate(ref.recv_x):
                n = int(count[e])
                if use_fp8:
                    assert_equal(rank, f"LL recv_x[{e}] (cuda, fp8)", rows[e, :n].cpu(), want[0])
                    assert_equal(rank, f"LL scales[{e}] (cuda, fp8)", recv[1][e, :n].cpu(), want[1])
                else:
                    assert_equal(rank, f"LL recv_x[{e}] (cuda)", rows[e, :n].cpu(), want)
            y = reference.per_token_cast_back(rows.flatten(0, 1), recv[1].flatten(0, 1)).view(rows.shape) \
                if use_fp8 else rows.float()
            out, _, _ = ll.low_latency_combine(y.to(torch.bfloat16), idx_d, w_d, handle)
            assert out.is_cuda
            factor = torch.where(topk_idx >= 0, weights, 0.0).sum(1, keepdim=True)
            assert_close(rank, f"LL combine (cuda, fp8={use_fp8})", out.cpu(), x.float() * factor,
                         1e-3 if use_fp8 else 1e-5)
    finally:
        ll.destroy()
    from portep.native import kernels_for

    return {"kernels": type(kernels_for(dev)).__name__}
