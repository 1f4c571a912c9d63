"""Bad-input tasks: each bad call raises ValueError/TypeError naming the argument, before any
communication, on every rank; the same Buffer then works for a valid call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from portep import reference
from tests.tasks_common import (
    assert_close,
    assert_equal,
    assert_raises_naming,
    cached,
    gather,
    generator,
    ht_buffer,
    ll_buffer,
    make_routing,
    make_x,
    new_ht_buffer,
    new_ll_buffer,
)

HIDDEN = 128
T = 8
TOPK = 3


class Ctx:
    """Inputs and buffers shared by the cases of one run."""

    def __init__(self, rank: int, world_size: int, seed: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.num_experts = 2 * world_size
        gen = generator(seed, rank)
        self.topk_idx, self.topk_weights = make_routing(gen, T, self.num_experts, TOPK)
        self.x = make_x(gen, T, HIDDEN)
        self.ht = ht_buffer(world_size, 1, HIDDEN)
        self.ll = ll_buffer(world_size, 1, T, HIDDEN, self.num_experts)

    # ------------------------------------------------------------------ valid calls
    def layout(self) -> tuple:
        return self.ht.get_dispatch_layout(self.topk_idx, self.num_experts)[:4]

    def ht_dispatch(self, buffer: Any = None, x: Any = None) -> tuple:
        buffer = buffer or self.ht
        per_rank, per_rdma, per_expert, in_rank = self.layout()
        return buffer.dispatch(self.x if x is None else x, num_tokens_per_rank=per_rank,
                               num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=self.topk_idx,
                               topk_weights=self.topk_weights)

    def ll_dispatch(self, buffer: Any = None, **kwargs: Any) -> tuple:
        return (buffer or self.ll).low_latency_dispatch(self.x, self.topk_idx, T, self.num_experts, **kwargs)

    def check_buffers_work(self, what: str) -> None:
        """A valid HT and LL round trip, checked against the reference."""
        rank = self.rank
        recv_x, _, _, _, handle, _ = self.ht_dispatch()
        all_x, all_idx, all_w = gather(self.x), gather(self.topk_idx), gather(self.topk_weights)
        ref = reference.ht_dispatch(all_x, all_idx, all_w, self.num_experts, rank)
        assert_equal(rank, f"HT recv_x after {what}", recv_x, ref.recv_x)
        combined, _, _ = self.ht.combine(recv_x, handle)
        in_rank = self.layout()[3]
        assert_close(rank, f"HT combine after {what}", combined, self.x.float() * in_rank.sum(1, keepdim=True), 5e-6)

        recv_x, count, handle, _, _ = self.ll_dispatch(use_fp8=False)
        ref = reference.ll_dispatch(all_x, all_idx, T, self.num_experts, rank)
        assert_equal(rank, f"LL recv_count after {what}", count, ref.recv_count)
        for e, rows in enumerate(ref.recv_x):
            assert_equal(rank, f"LL recv_x[{e}] after {what}", recv_x[e, : rows.size(0)], rows)
        combined, _, _ = self.ll.low_latency_combine(recv_x, self.topk_idx, self.topk_weights, handle)
        factor = torch.where(self.topk_idx >= 0, self.topk_weights, 0.0).sum(1, keepdim=True)
        assert_close(rank, f"LL combine after {what}", combined, self.x.float() * factor, 1e-5)


def _expect(ctx: Ctx, what: str, call: Callable[[], Any], *names: str, buffer: Any = None) -> str:
    return assert_raises_naming(ctx.rank, what, call, names, buffer)


def _other_ht(ctx: Ctx) -> Any:
    return cached(("ht-other", ctx.world_size), lambda: new_ht_buffer(ctx.world_size, 1, HIDDEN))


def _other_ll(ctx: Ctx) -> Any:
    return cached(("ll-other", ctx.world_size),
                  lambda: new_ll_buffer(ctx.world_size, 1, T, HIDDEN, ctx.num_experts))


def _topk_out_of_range(ctx: Ctx, value: int) -> torch.Tensor:
    bad = ctx.topk_idx.clone()
    bad[-1, 0] = value
    return bad


# --------------------------------------------------------------------------------------- cases
# Each case makes the bad call(s) on every rank; collective set-up (other Buffers, handles) is
# done symmetrically before.


def case_ht_x_dtype(ctx: Ctx) -> None:
    _expect(ctx, "dispatch(x int32)", lambda: ctx.ht_dispatch(x=ctx.x.to(torch.int32)), "x", buffer=ctx.ht)


def case_ht_x_shape(ctx: Ctx) -> None:
    _expect(ctx, "dispatch(x 1-D)", lambda: ctx.ht_dispatch(x=ctx.x.reshape(-1)), "x", buffer=ctx.ht)
    _expect(ctx, "dispatch(x with wrong token count)", lambda: ctx.ht_dispatch(x=ctx.x[:-1]), "x",
            "is_token_in_rank", "num_tokens", buffer=ctx.ht)


def case_ht_fp8_without_scales(ctx: Ctx) -> None:
    x_fp8, _ = reference.per_token_cast_to_fp8(ctx.x)
    _expect(ctx, "dispatch(x_fp8 without scales)", lambda: ctx.ht_dispatch(x=x_fp8), "scales", buffer=ctx.ht)


def case_ht_topk_idx_dtype(ctx: Ctx) -> None:
    bad = ctx.topk_idx.to(torch.int32)
    _expect(ctx, "get_dispatch_layout(topk_idx int32)", lambda: ctx.ht.get_dispatch_layout(bad, ctx.num_experts),
            "topk_idx", buffer=ctx.ht)
    per_rank, per_rdma, per_expert, in_rank = ctx.layout()
    _expect(ctx, "dispatch(topk_idx int32)", lambda: ctx.ht.dispatch(
        ctx.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=bad, topk_weights=ctx.topk_weights), "topk_idx", buffer=ctx.ht)


def case_ht_topk_idx_range(ctx: Ctx) -> None:
    for value in (ctx.num_experts, -2):
        bad = _topk_out_of_range(ctx, value)
        _expect(ctx, f"get_dispatch_layout(topk_idx containing {value})",
                lambda bad=bad: ctx.ht.get_dispatch_layout(bad, ctx.num_experts), "topk_idx", buffer=ctx.ht)


def case_ht_num_experts(ctx: Ctx) -> None:
    _expect(ctx, "get_dispatch_layout(num_experts not a multiple of ranks)",
            lambda: ctx.ht.get_dispatch_layout(ctx.topk_idx, ctx.num_experts + 1), "num_experts", buffer=ctx.ht)


def case_ht_handle_other_buffer(ctx: Ctx) -> None:
    other = _other_ht(ctx)
    recv_x, _, _, _, handle, _ = ctx.ht_dispatch(buffer=other)
    _expect(ctx, "combine(handle of another Buffer)", lambda: ctx.ht.combine(recv_x, handle), "handle",
            buffer=ctx.ht)
    _expect(ctx, "dispatch(handle of another Buffer)", lambda: ctx.ht.dispatch(ctx.x, handle=handle), "handle",
            buffer=ctx.ht)
    other.combine(recv_x, handle)  # the other Buffer still works with its own handle


def case_ht_handle_other_mode(ctx: Ctx) -> None:
    recv_x, _, ll_handle, _, _ = ctx.ll_dispatch(use_fp8=False)
    _expect(ctx, "combine(LL handle)", lambda: ctx.ht.combine(ctx.x, ll_handle), "handle", buffer=ctx.ht)
    _expect(ctx, "dispatch(handle=LL handle)", lambda: ctx.ht.dispatch(ctx.x, handle=ll_handle), "handle",
            buffer=ctx.ht)


def case_ht_combine_x(ctx: Ctx) -> None:
    recv_x, _, _, _, handle, _ = ctx.ht_dispatch()
    _expect(ctx, "combine(x int32)", lambda: ctx.ht.combine(recv_x.to(torch.int32), handle), "x", buffer=ctx.ht)
    _expect(ctx, "combine(x wrong hidden)", lambda: ctx.ht.combine(recv_x[:, :64], handle), "x", buffer=ctx.ht)
    ctx.ht.combine(recv_x, handle)


def case_ll_x_dtype(ctx: Ctx) -> None:
    _expect(ctx, "low_latency_dispatch(x float32)", lambda: ctx.ll.low_latency_dispatch(
        ctx.x.float(), ctx.topk_idx, T, ctx.num_experts), "x", buffer=ctx.ll)


def case_ll_x_shape(ctx: Ctx) -> None:
    _expect(ctx, "low_latency_dispatch(x 1-D)", lambda: ctx.ll.low_latency_dispatch(
        ctx.x.reshape(-1), ctx.topk_idx, T, ctx.num_experts), "x", buffer=ctx.ll)


def case_ll_topk_idx_dtype(ctx: Ctx) -> None:
    _expect(ctx, "low_latency_dispatch(topk_idx int32)", lambda: ctx.ll.low_latency_dispatch(
        ctx.x, ctx.topk_idx.to(torch.int32), T, ctx.num_experts), "topk_idx", buffer=ctx.ll)


def case_ll_topk_idx_range(ctx: Ctx) -> None:
    for value in (ctx.num_experts, -2):
        bad = _topk_out_of_range(ctx, value)
        _expect(ctx, f"low_latency_dispatch(topk_idx containing {value})",
                lambda bad=bad: ctx.ll.low_latency_dispatch(ctx.x, bad, T, ctx.num_experts), "topk_idx",
                buffer=ctx.ll)


def case_ll_too_many_tokens(ctx: Ctx) -> None:
    _expect(ctx, "low_latency_dispatch(N > num_max_dispatch_tokens_per_rank)", lambda: ctx.ll.low_latency_dispatch(
        ctx.x, ctx.topk_idx, T - 1, ctx.num_experts), "num_max_dispatch_tokens_per_rank", buffer=ctx.ll)


def case_ll_fp8_hidden(ctx: Ctx) -> None:
    x = ctx.x[:, :96].contiguous()
    _expect(ctx, "low_latency_dispatch(use_fp8, hidden=96)", lambda: ctx.ll.low_latency_dispatch(
        x, ctx.topk_idx, T, ctx.num_experts, use_fp8=True), "hidden", buffer=ctx.ll)


def case_ll_ue8m0_without_round_scale(ctx: Ctx) -> None:
    _expect(ctx, "low_latency_dispatch(use_ue8m0 without round_scale)", lambda: ctx.ll.low_latency_dispatch(
        ctx.x, ctx.topk_idx, T, ctx.num_experts, use_fp8=True, round_scale=False, use_ue8m0=True),
        "round_scale", buffer=ctx.ll)


def case_ll_async_and_hook(ctx: Ctx) -> None:
    _expect(ctx, "low_latency_dispatch(async_finish and return_recv_hook)", lambda: ctx.ll_dispatch(
        async_finish=True, return_recv_hook=True), "async_finish", buffer=ctx.ll)
    recv_x, _, handle, _, _ = ctx.ll_dispatch(use_fp8=False)
    _expect(ctx, "low_latency_combine(async_finish and return_recv_hook)", lambda: ctx.ll.low_latency_combine(
        recv_x, ctx.topk_idx, ctx.topk_weights, handle, async_finish=True, return_recv_hook=True),
        "async_finish", buffer=ctx.ll)
    ctx.ll.low_latency_combine(recv_x, ctx.topk_idx, ctx.topk_weights, handle)


def case_ll_num_experts(ctx: Ctx) -> None:
    _expect(ctx, "low_latency_dispatch(num_experts not a multiple of ranks)", lambda: ctx.ll.low_latency_dispatch(
        ctx.x, ctx.topk_idx, T, ctx.num_experts + 1), "num_experts", buffer=ctx.ll)


def case_ll_handle_other_buffer(ctx: Ctx) -> None:
    other = _other_ll(ctx)
    recv_x, _, handle, _, _ = ctx.ll_dispatch(buffer=other, use_fp8=False)
    _expect(ctx, "low_latency_combine(handle of another Buffer)", lambda: ctx.ll.low_latency_combine(
        recv_x, ctx.topk_idx, ctx.topk_weights, handle), "handle", buffer=ctx.ll)
    _expect(ctx, "get_next_low_latency_combine_buffer(handle of another Buffer)",
            lambda: ctx.ll.get_next_low_latency_combine_buffer(handle), "handle", buffer=ctx.ll)
    other.low_latency_combine(recv_x, ctx.topk_idx, ctx.topk_weights, handle)


def case_ll_handle_other_mode(ctx: Ctx) -> None:
    recv_x, _, _, _, ht_handle, _ = ctx.ht_dispatch()
    y = torch.zeros(ctx.num_experts // ctx.world_size, ctx.world_size * T, HIDDEN, dtype=torch.bfloat16)
    _expect(ctx, "low_latency_combine(HT handle)", lambda: ctx.ll.low_latency_combine(
        y, ctx.topk_idx, ctx.topk_weights, ht_handle), "handle", buffer=ctx.ll)
    ctx.ht.combine(recv_x, ht_handle)


CASES = sorted(name.removeprefix("case_") for name in globals() if name.startswith("case_"))


def bad_input(rank: int, world_size: int, *, case: str, seed: int = 21) -> None:
    """Run bad-input ``case`` on every rank, then check both Buffers still work."""
    ctx = Ctx(rank, world_size, seed)
    globals()[f"case_{case}"](ctx)
    dist.barrier()
    ctx.check_buffers_work(case)
