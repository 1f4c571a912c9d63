"""Low-latency mode tasks, run on every rank of a pool.

The simulated expert GEMM multiplies the (dequantised) received rows by a power of two that
depends on the global expert (exact in bf16), so a row combined from the wrong expert shows up.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

import portep
from portep import reference
from portep.backends.ring import CHUNK_ENV, SLOTS_ENV
from tests.tasks_common import (
    FaultsProved,
    assert_close,
    assert_equal,
    gather,
    generator,
    ht_buffer_bytes,
    ll_buffer,
    make_routing,
    make_x,
    new_ll_buffer,
    set_topology,
)

BF16_COMBINE_DIFF = 1e-5  # DeepEP's thresholds
FP8_COMBINE_DIFF = 9e-4
FP8_ROUNDTRIP_DIFF = 1e-3
REFERENCE_DIFF = 1e-6  # same maths as the reference, only the summation order may differ


def expert_sums() -> bool:
    """Whether this job's LL combines sum on the expert side (the ring backend's default, but for
    combines received from a hook): each rank's share of a token comes back rounded to bf16, which
    the reference then does too."""
    from portep.backends import default_backend_name
    return default_backend_name().startswith("ring") and os.environ.get("PORTEP_LL_EXPERT_SUMS", "1") != "0"


def expert_scale(expert: int) -> float:
    """The simulated GEMM of global expert ``expert``: multiply by 0.5, 1 or 2."""
    return 2.0 ** (expert % 3 - 1)


def _num_tokens(num_tokens: int | list[int], rank: int) -> int:
    return num_tokens[rank] if isinstance(num_tokens, list) else num_tokens


class LLCase:
    """One LL problem on this rank: inputs, everyone's inputs and the references."""

    def __init__(self, rank: int, world_size: int, seed: int, num_tokens: int | list[int], max_tokens: int,
                 hidden: int, num_experts: int, topk: int, use_fp8: bool = False, round_scale: bool = False,
                 use_ue8m0: bool = False, masked_ranks: tuple[int, ...] = ()) -> None:
        self.rank, self.world_size, self.max_tokens, self.hidden = rank, world_size, max_tokens, hidden
        self.num_experts, self.topk = num_experts, topk
        self.local_experts = num_experts // world_size
        self.use_fp8, self.round_scale, self.use_ue8m0 = use_fp8, round_scale, use_ue8m0
        self.masked_ranks = masked_ranks
        gen = generator(seed, rank)
        n = _num_tokens(num_tokens, rank)
        self.topk_idx, self.topk_weights = make_routing(gen, n, num_experts, topk)
        self.x = make_x(gen, n, hidden)
        self.all_x, self.all_idx = gather(self.x), gather(self.topk_idx)
        self.ref = reference.ll_dispatch(self.all_x, self.all_idx, max_tokens, num_experts, rank, use_fp8,
                                         round_scale, use_ue8m0, masked_ranks)
        self.ref_bf16 = self.ref if not use_fp8 else reference.ll_dispatch(
            self.all_x, self.all_idx, max_tokens, num_experts, rank, masked_ranks=masked_ranks)

    def dispatch(self, buffer: Any, **kwargs: Any) -> tuple:
        return buffer.low_latency_dispatch(self.x, self.topk_idx, self.max_tokens, self.num_experts,
                                           use_fp8=self.use_fp8, round_scale=self.round_scale,
                                           use_ue8m0=self.use_ue8m0, **kwargs)

    # -------------------------------------------------------------------------- dispatch check
    def check_dispatch(self, recv_x: Any, recv_count: torch.Tensor, handle: Any, what: str = "") -> None:
        rank, ref, slots = self.rank, self.ref, self.world_size * self.max_tokens
        tag = f"low_latency_dispatch{what}"
        assert_equal(rank, f"{tag}: recv_count", recv_count, ref.recv_count)
        assert isinstance(handle, tuple) and len(handle) == 5, f"rank {rank}: {tag}: handle must be a 5-tuple"
        src_info, layout_range, max_tokens, hidden, num_experts = handle
        assert (max_tokens, hidden, num_experts) == (self.max_tokens, self.hidden, self.num_experts), (
            f"rank {rank}: {tag}: handle[2:] = {(max_tokens, hidden, num_experts)}")
        assert src_info.dtype == torch.int32 and tuple(src_info.shape) == (self.local_experts, slots), (
            f"rank {rank}: {tag}: src_info {src_info.dtype} {tuple(src_info.shape)}")
        assert_equal(rank, f"{tag}: layout_range", layout_range, ref.layout_range)
        if self.use_fp8:
            assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"rank {rank}: {tag}: recv_x must be (fp8, scales)"
            data, scales = recv_x
            assert data.dtype == torch.float8_e4m3fn and tuple(data.shape) == (self.local_experts, slots, self.hidden)
            width, dtype = (self.hidden // 512, torch.int32) if self.use_ue8m0 else (self.hidden // 128, torch.float32)
            assert scales.dtype == dtype and tuple(scales.shape) == (self.local_experts, slots, width), (
                f"rank {rank}: {tag}: scales {scales.dtype} {tuple(scales.shape)}, expected {dtype} "
                f"{(self.local_experts, slots, width)}")
        else:
            assert recv_x.dtype == torch.bfloat16 and tuple(recv_x.shape) == (self.local_experts, slots, self.hidden), (
                f"rank {rank}: {tag}: recv_x {recv_x.dtype} {tuple(recv_x.shape)}")
        for e in range(self.local_experts):
            count = int(ref.recv_count[e])
            assert_equal(rank, f"{tag}: src_info[{e}]", src_info[e, :count], ref.src_info[e])
            if self.use_fp8:
                assert_equal(rank, f"{tag}: recv_x[0][{e}] (fp8 bytes)", data[e, :count], ref.recv_x[e][0])
                assert_equal(rank, f"{tag}: recv_x[1][{e}] (scales)", scales[e, :count].contiguous(), ref.recv_x[e][1])
                if count:
                    back = reference.per_token_cast_back(data[e, :count], scales[e, :count])
                    assert_close(rank, f"{tag}: FP8 round trip of expert {e}", back, self.ref_bf16.recv_x[e],
                                 FP8_ROUNDTRIP_DIFF)
            else:
                assert_equal(rank, f"{tag}: recv_x[{e}]", recv_x[e, :count], ref.recv_x[e])

    # --------------------------------------------------------------------------- combine side
    def expert_output(self, recv_x: Any, recv_count: torch.Tensor) -> torch.Tensor:
        """bf16 `[E_local, R*T, H]`: scaled dequantised rows, NaN past each expert's count."""
        if self.use_fp8:
            rows = reference.per_token_cast_back(recv_x[0], recv_x[1])
        else:
            rows = recv_x
        y = torch.full_like(rows, float("nan"), dtype=torch.bfloat16)
        for e in range(self.local_experts):
            count = int(recv_count[e])
            scale = expert_scale(self.rank * self.local_experts + e)
            y[e, :count] = (rows[e, :count].float() * scale).to(torch.bfloat16)
        return y

    def expected_combine(self) -> torch.Tensor:
        """float32 `[N, H]`: ``x * Σ_k w_k * scale(e_k)`` over valid, unmasked selections."""
        valid = self.topk_idx >= 0
        for r in self.masked_ranks:
            valid &= self.topk_idx // self.local_experts != r
        scales = torch.tensor([expert_scale(e) for e in range(self.num_experts)])
        factor = torch.where(valid, self.topk_weights * scales[self.topk_idx.clamp(min=0)], 0.0).sum(1)
        return self.x.float() * factor.unsqueeze(1)

    def reference_combine(self, y: torch.Tensor, compute: bool = True, hook: bool = False) -> torch.Tensor | None:
        """``reference.ll_combine`` over every rank's expert output (valid rows only); collective
        (every rank must call it), ``compute=False`` only takes part in the gathers. ``hook``: for
        a combine received from a hook (one row per selection on every backend)."""
        ys = [[t[e, :c] for e, c in enumerate(counts.tolist())] for t, counts in
              zip(gather(y), gather(self.ref.recv_count), strict=True)]
        src_infos, layout_ranges = gather(self.ref.src_info), gather(self.ref.layout_range)
        if not compute:
            return None
        return reference.ll_combine(ys, src_infos, layout_ranges, self.topk_idx, self.topk_weights,
                                    self.num_experts, self.rank, self.masked_ranks,
                                    torch.bfloat16 if expert_sums() and not hook else None)

    def check_combine(self, combined: torch.Tensor, want_ref: torch.Tensor, what: str) -> None:
        rank, tag = self.rank, f"low_latency_combine{what}"
        assert combined.dtype == torch.bfloat16, f"rank {rank}: {tag}: dtype {combined.dtype}"
        assert tuple(combined.shape) == (self.x.size(0), self.hidden), f"rank {rank}: {tag}: shape {combined.shape}"
        assert_close(rank, f"{tag} vs reference.ll_combine", combined, want_ref, REFERENCE_DIFF)
        if self.x.size(0):
            threshold = FP8_COMBINE_DIFF if self.use_fp8 else BF16_COMBINE_DIFF
            assert_close(rank, f"{tag} vs x * weights", combined, self.expected_combine(), threshold)


# ------------------------------------------------------------------------------------ tasks


def dispatch_combine(rank: int, world_size: int, *, seed: int, num_nodes: int, num_tokens: int | list[int],
                     max_tokens: int, hidden: int, num_experts: int, topk: int, use_fp8: bool = False,
                     round_scale: bool = False, use_ue8m0: bool = False, use_logfmt: bool = False,
                     backend: str | None = None) -> None:
    """LL dispatch exact vs the reference, then combine plain / ``out=`` / zero-copy / async / hook."""
    buffer = ll_buffer(world_size, num_nodes, max_tokens, hidden, num_experts, backend)
    with FaultsProved(rank, buffer, backend):
        _dispatch_combine(buffer, rank, world_size, seed, num_tokens, max_tokens, hidden, num_experts, topk, use_fp8,
                          round_scale, use_ue8m0, use_logfmt)


def _dispatch_combine(buffer: Any, rank: int, world_size: int, seed: int, num_tokens: int | list[int],
                      max_tokens: int, hidden: int, num_experts: int, topk: int, use_fp8: bool, round_scale: bool,
                      use_ue8m0: bool, use_logfmt: bool) -> None:
    case = LLCase(rank, world_size, seed, num_tokens, max_tokens, hidden, num_experts, topk, use_fp8,
                  round_scale, use_ue8m0)
    cumulative = torch.zeros(case.local_experts, dtype=torch.int32)
    recv_x, recv_count, handle, event, hook = case.dispatch(buffer, cumulative_local_expert_recv_stats=cumulative)
    assert hook is None, f"rank {rank}: hook must be None without return_recv_hook"
    assert isinstance(event, portep.EventOverlap)
    case.check_dispatch(recv_x, recv_count, handle)
    assert_equal(rank, "cumulative_local_expert_recv_stats", cumulative, case.ref.recv_count)

    y = case.expert_output(recv_x, recv_count)
    want_ref = case.reference_combine(y)
    topk_idx, topk_weights = case.topk_idx, case.topk_weights

    combined, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
    assert hook is None and isinstance(event, portep.EventOverlap)
    case.check_combine(combined, want_ref, "")

    out = torch.full((case.x.size(0), hidden), float("nan"), dtype=torch.bfloat16)
    combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle, out=out)
    assert combined.data_ptr() == out.data_ptr() or case.x.size(0) == 0, f"rank {rank}: out= was not used"
    case.check_combine(out, want_ref, " (out=)")

    view = buffer.get_next_low_latency_combine_buffer(handle)
    assert view.dtype == torch.bfloat16 and tuple(view.shape) == tuple(y.shape), (
        f"rank {rank}: get_next_low_latency_combine_buffer: {view.dtype} {tuple(view.shape)}")
    view.copy_(y)
    combined, _, _ = buffer.low_latency_combine(torch.zeros_like(y), topk_idx, topk_weights, handle, zero_copy=True)
    case.check_combine(combined, want_ref, " (zero_copy)")

    combined, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle, async_finish=True)
    assert hook is None
    event.current_stream_wait()
    case.check_combine(combined, want_ref, " (async_finish)")

    want_hook = case.reference_combine(y, hook=True)
    combined, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle, return_recv_hook=True)
    assert callable(hook), f"rank {rank}: return_recv_hook=True must return a hook"
    hook()
    case.check_combine(combined, want_hook, " (return_recv_hook)")

    if use_logfmt:
        combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle, use_logfmt=True)
        assert_close(rank, "low_latency_combine (use_logfmt)", combined, want_ref, 1e-3)

    # async dispatch: an event to wait on, same result.
    recv_x, recv_count, handle, event, hook = case.dispatch(buffer, async_finish=True)
    assert hook is None
    event.current_stream_wait()
    case.check_dispatch(recv_x, recv_count, handle, " (async_finish)")
    dist.barrier()


def dispatch_combine_streams(rank: int, world_size: int, *, chunk_bytes: int, slots: int, **kwargs: Any) -> int:
    """:func:`dispatch_combine` on a fresh Buffer with streams of ``slots`` chunks of ``chunk_bytes``
    per pair; returns, over the group, how many combines summed their copies once all were in
    (those whose messages fit the slots) rather than copy by copy as they arrived."""
    buffer = new_ll_buffer(world_size, kwargs["num_nodes"], kwargs["max_tokens"], kwargs["hidden"],
                           kwargs["num_experts"], env={CHUNK_ENV: str(chunk_bytes), SLOTS_ENV: str(slots)},
                           explicitly_destroy=True)
    try:
        _dispatch_combine(buffer, rank, world_size, kwargs["seed"], kwargs["num_tokens"], kwargs["max_tokens"],
                          kwargs["hidden"], kwargs["num_experts"], kwargs["topk"], False, False, False, False)
        total = torch.tensor([buffer.get_stats().get("sums_at_end", 0)], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total[0])
    finally:
        buffer.destroy()


def double_buffer(rank: int, world_size: int, *, seed: int, num_nodes: int, max_tokens: int, hidden: int,
                  num_experts: int, topk: int, use_fp8: bool = False, backend: str | None = None) -> None:
    """Two LL dispatches alive at once with receive hooks (dual-batch overlap), then two combines."""
    buffer = ll_buffer(world_size, num_nodes, max_tokens, hidden, num_experts, backend)
    a = LLCase(rank, world_size, seed, max_tokens, max_tokens, hidden, num_experts, topk, use_fp8)
    b = LLCase(rank, world_size, seed + 100, [max(max_tokens - 3 * r, 0) for r in range(world_size)], max_tokens,
               hidden, num_experts, topk, use_fp8)
    xa, ca, ha, _, hook_a = a.dispatch(buffer, return_recv_hook=True)
    xb, cb, hb, _, hook_b = b.dispatch(buffer, return_recv_hook=True)
    assert callable(hook_a) and callable(hook_b), f"rank {rank}: return_recv_hook=True must return hooks"
    hook_a()
    hook_b()
    a.check_dispatch(xa, ca, ha, " (batch A, hook)")
    b.check_dispatch(xb, cb, hb, " (batch B, hook)")

    ya, yb = a.expert_output(xa, ca), b.expert_output(xb, cb)
    ref_a, ref_b = a.reference_combine(ya, hook=True), b.reference_combine(yb, hook=True)
    out_a, _, hook_a = buffer.low_latency_combine(ya, a.topk_idx, a.topk_weights, ha, return_recv_hook=True)
    out_b, _, hook_b = buffer.low_latency_combine(yb, b.topk_idx, b.topk_weights, hb, return_recv_hook=True)
    hook_a()
    hook_b()
    a.check_combine(out_a, ref_a, " (batch A, hook)")
    b.check_combine(out_b, ref_b, " (batch B, hook)")

    # Interleaved as two-batch overlap does: dispatch B while A's combine is in flight.
    out_a, _, hook_ca = buffer.low_latency_combine(ya, a.topk_idx, a.topk_weights, ha, return_recv_hook=True)
    xb, cb, hb, _, hook_db = b.dispatch(buffer, return_recv_hook=True)
    hook_ca()
    hook_db()
    a.check_combine(out_a, ref_a, " (batch A, interleaved)")
    b.check_dispatch(xb, cb, hb, " (batch B, interleaved)")
    dist.barrier()


def clean_and_switch(rank: int, world_size: int, *, seed: int, num_nodes: int, max_tokens: int, hidden: int,
                     num_experts: int, topk: int, backend: str | None = None) -> None:
    """One Buffer for both modes (SGLang's auto mode): HT, clean_low_latency_buffer, LL, HT, LL."""
    set_topology(world_size, num_nodes, backend)
    nvl, rdma = ht_buffer_bytes(hidden, world_size)
    rdma = max(rdma, portep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, world_size, num_experts))
    buffer = portep.Buffer(dist.group.WORLD, nvl, rdma, low_latency_mode=True,
                           num_qps_per_rank=num_experts // world_size)
    assert buffer.low_latency_mode is True and buffer.num_rdma_bytes == rdma
    case = LLCase(rank, world_size, seed, [max_tokens - r for r in range(world_size)], max_tokens, hidden,
                  num_experts, topk, use_fp8=True)
    for round_ in range(2):
        # HT round trip on the same Buffer.
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(case.topk_idx, num_experts)
        recv, _, _, _, ht_handle, _ = buffer.dispatch(
            case.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=case.topk_idx, topk_weights=case.topk_weights)
        combined, _, _ = buffer.combine(recv, ht_handle)
        assert_close(rank, f"HT combine (round {round_})", combined,
                     case.x.float() * in_rank.sum(1, keepdim=True), 5e-6)

        buffer.clean_low_latency_buffer(max_tokens, hidden, num_experts)
        recv_x, recv_count, handle, _, _ = case.dispatch(buffer)
        case.check_dispatch(recv_x, recv_count, handle, f" (after clean, round {round_})")
        y = case.expert_output(recv_x, recv_count)
        combined, _, _ = buffer.low_latency_combine(y, case.topk_idx, case.topk_weights, handle)
        case.check_combine(combined, case.reference_combine(y), f" (after clean, round {round_})")
    dist.barrier()


def masked(rank: int, world_size: int, *, seed: int, max_tokens: int, hidden: int, num_experts: int, topk: int,
           masked_rank: int) -> None:
    """``enable_shrink``: with a rank masked, nobody receives from it nor combines its outputs."""
    buffer = new_ll_buffer(world_size, 1, max_tokens, hidden, num_experts, enable_shrink=True)
    status = torch.full((world_size,), -1, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    assert_equal(rank, "mask status (fresh)", status, torch.zeros(world_size, dtype=torch.int32))
    buffer.low_latency_update_mask_buffer(masked_rank, True)
    buffer.low_latency_query_mask_buffer(status)
    want_status = torch.zeros(world_size, dtype=torch.int32)
    want_status[masked_rank] = 1
    assert_equal(rank, "mask status (masked)", status, want_status)

    case = LLCase(rank, world_size, seed, max_tokens, max_tokens, hidden, num_experts, topk,
                  masked_ranks=(masked_rank,))
    recv_x, recv_count, handle, _, _ = case.dispatch(buffer)
    if rank != masked_rank:
        case.check_dispatch(recv_x, recv_count, handle, " (masked rank)")
    y = case.expert_output(recv_x, recv_count)
    combined, _, _ = buffer.low_latency_combine(y, case.topk_idx, case.topk_weights, handle)
    want = case.reference_combine(y, compute=rank != masked_rank)
    if rank != masked_rank:
        case.check_combine(combined, want, " (masked rank)")

    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    assert_equal(rank, "mask status (cleaned)", status, torch.zeros(world_size, dtype=torch.int32))
    case = LLCase(rank, world_size, seed + 1, max_tokens, max_tokens, hidden, num_experts, topk)
    recv_x, recv_count, handle, _, _ = case.dispatch(buffer)
    case.check_dispatch(recv_x, recv_count, handle, " (unmasked again)")
    dist.barrier()


def wire_rows(rank: int, world_size: int, *, seed: int, num_nodes: int, max_tokens: int, hidden: int,
              num_experts: int, topk: int) -> None:
    """The ring backend sends a token once per destination rank, with the list of that rank's experts
    it selected, and the receiver fans it out: the rows counted on the wire are the distinct
    (token, rank) pairs, fewer than the selections; the results are still the reference's."""
    buffer = new_ll_buffer(world_size, num_nodes, max_tokens, hidden, num_experts, backend="ring")
    case = LLCase(rank, world_size, seed, max_tokens, max_tokens, hidden, num_experts, topk, use_fp8=True)
    before = buffer.get_stats()
    recv_x, recv_count, handle, _, _ = case.dispatch(buffer)
    after = buffer.get_stats()
    case.check_dispatch(recv_x, recv_count, handle, " (deduplicated wire)")
    owners = [[e // case.local_experts for e in row if e >= 0] for row in case.topk_idx.tolist()]
    pairs = sum(len({r for r in row if r != rank}) for row in owners)
    selections = sum(sum(1 for r in row if r != rank) for row in owners)
    sent = after["rows_world"] - before["rows_world"]
    assert sent == pairs, f"rank {rank}: {sent} rows on the wire, expected one per (token, other rank): {pairs}"
    assert pairs < selections, f"rank {rank}: the routing should select several experts of one rank per token"
    row_bytes = hidden + hidden // 128 * 4 + 4 + 4 * topk  # e4m3, scales, source token, list of experts
    assert after["bytes_world"] - before["bytes_world"] == pairs * row_bytes, f"rank {rank}: wire bytes"
    y = case.expert_output(recv_x, recv_count)
    combined, _, _ = buffer.low_latency_combine(y, case.topk_idx, case.topk_weights, handle)
    case.check_combine(combined, case.reference_combine(y), " (deduplicated wire)")


def wait_cost_stats(rank: int, world_size: int, *, seed: int, num_nodes: int, max_tokens: int, hidden: int,
                    num_experts: int, topk: int, backend: str | None = None) -> None:
    """``dispatch_wait_recv_cost_stats`` / ``combine_wait_recv_cost_stats`` grow for exactly the ranks
    this rank received rows from (the dispatch: ranks that selected its experts; the combine: ranks
    owning experts it selected), and the results are still the reference's."""
    buffer = ll_buffer(world_size, num_nodes, max_tokens, hidden, num_experts, backend)
    case = LLCase(rank, world_size, seed, [max_tokens, 0, 3, max_tokens][:world_size], max_tokens, hidden,
                  num_experts, topk)
    local = num_experts // world_size
    owners = [{int(e) // local for e in idx.flatten().tolist() if e >= 0} for idx in case.all_idx]
    dispatch_stats = torch.zeros(world_size, dtype=torch.int64)
    recv_x, recv_count, handle, _, _ = case.dispatch(buffer, dispatch_wait_recv_cost_stats=dispatch_stats)
    case.check_dispatch(recv_x, recv_count, handle, " (with wait stats)")
    want = [rank in owners[src] for src in range(world_size)]
    assert (dispatch_stats > 0).tolist() == want, f"rank {rank}: dispatch wait stats {dispatch_stats.tolist()}"
    combine_stats = torch.zeros(world_size, dtype=torch.int64)
    y = case.expert_output(recv_x, recv_count)
    combined, _, _ = buffer.low_latency_combine(y, case.topk_idx, case.topk_weights, handle,
                                                combine_wait_recv_cost_stats=combine_stats)
    case.check_combine(combined, case.reference_combine(y), " (with wait stats)")
    want = [r in owners[rank] for r in range(world_size)]
    assert (combine_stats > 0).tolist() == want, f"rank {rank}: combine wait stats {combine_stats.tolist()}"
