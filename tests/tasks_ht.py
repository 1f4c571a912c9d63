"""High-throughput (normal) mode tasks, run on every rank of a pool.

Each task builds its inputs from ``(seed, rank)``, runs the implementation, gathers every rank's
inputs and compares this rank's outputs with :mod:`portep.reference`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import portep
from portep import reference
from portep.backends.ring import ARENA_ENV
from tests.tasks_common import (
    FaultsProved,
    assert_close,
    assert_equal,
    environment,
    gather,
    generator,
    ht_buffer,
    make_routing,
    make_x,
    new_ht_buffer,
)


def _num_tokens(num_tokens: int | list[int], rank: int) -> int:
    return num_tokens[rank] if isinstance(num_tokens, list) else num_tokens


def _internode_rows(is_token_in_rank: torch.Tensor, rank: int, ranks_per_node: int) -> int:
    """Rows a hierarchical dispatch sends over the network: one per (token, other node it needs)."""
    num_tokens, num_ranks = is_token_in_rank.shape
    nodes = is_token_in_rank.view(num_tokens, num_ranks // ranks_per_node, ranks_per_node).any(2)
    nodes[:, rank // ranks_per_node] = False
    return int(nodes.sum())


class _StatsDelta:
    """``ht_internode_rows`` moved by the calls inside a ``with`` block."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.rows = 0

    def __enter__(self) -> _StatsDelta:
        stats = self.buffer.get_stats()
        assert isinstance(stats, dict) and "ht_internode_rows" in stats, f"get_stats() = {stats!r}"
        self.start = stats["ht_internode_rows"]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.rows = self.buffer.get_stats()["ht_internode_rows"] - self.start


def _check_internode(rank: int, what: str, delta: _StatsDelta, is_token_in_rank: torch.Tensor,
                     ranks_per_node: int) -> None:
    want = _internode_rows(is_token_in_rank, rank, ranks_per_node)
    assert delta.rows == want, (
        f"rank {rank}: {what}: ht_internode_rows grew by {delta.rows}, expected {want} "
        f"(one row per token and per other destination node)"
    )


def check_ht_combine(rank: int, name: str, combined: torch.Tensor, ys: list[torch.Tensor],
                     recv_srcs: list, num_tokens: list[int], bias: Any = None, min_tokens: int = 16) -> float:
    """HT combine result against ``reference.ht_combine`` (collective: gathers every rank's result).

    DeepEP's ``calc_diff < 5e-6`` over the results of all ranks (and of this rank when it has
    enough tokens for the metric to be stable), and element-wise: the error is at most that of
    two bf16 roundings (a partial sum per node crosses the network in bf16, as in DeepEP) of
    the magnitudes involved.
    """
    want, _ = reference.ht_combine(ys, recv_srcs, num_tokens, rank, bias=bias)
    biases = () if bias is None else (bias if isinstance(bias, tuple) else (bias,))
    magnitude, _ = reference.ht_combine([y.float().abs() for y in ys], recv_srcs, num_tokens, rank,
                                        bias=tuple(b.float().abs() for b in biases) or None)
    assert combined.dtype == want.dtype, f"rank {rank}: {name}: dtype {combined.dtype}, expected {want.dtype}"
    assert tuple(combined.shape) == tuple(want.shape), f"rank {rank}: {name}: shape {tuple(combined.shape)}"
    assert torch.isfinite(combined.float()).all(), f"rank {rank}: {name}: contains NaN/inf"
    error = (combined.float() - want.float()).abs()
    bound = magnitude * 2.0**-7 + 1e-6
    bad = (error > bound).nonzero()
    assert bad.numel() == 0, (
        f"rank {rank}: {name}: {bad.size(0)} element(s) off by more than two bf16 roundings; first at "
        f"{tuple(bad[0].tolist())}: got {combined[tuple(bad[0])].item()}, want {want[tuple(bad[0])].item()}")
    everyone = gather((combined, want))
    diff = reference.calc_diff(torch.cat([g for g, _ in everyone]), torch.cat([w for _, w in everyone]))
    assert diff < 5e-6, f"rank {rank}: {name}: calc_diff over all ranks = {diff:.3g} >= 5e-6"
    if combined.size(0) >= min_tokens:
        assert_close(rank, name, combined, want, 5e-6)
    return diff


# --------------------------------------------------------------------------------------- layout


def layout(rank: int, world_size: int, *, seed: int, num_nodes: int, num_tokens: int | list[int],
           num_experts: int, topk: int) -> None:
    """``get_dispatch_layout`` equals ``reference.layout`` exactly."""
    buffer = ht_buffer(world_size, num_nodes, 128)
    ranks_per_node = world_size // num_nodes
    gen = generator(seed, rank)
    topk_idx, _ = make_routing(gen, _num_tokens(num_tokens, rank), num_experts, topk)
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(topk_idx, num_experts)
    want = reference.layout(topk_idx, num_experts, world_size, ranks_per_node)
    assert_equal(rank, "num_tokens_per_rank", per_rank, want[0])
    if num_nodes == 1:
        assert per_rdma is None, f"rank {rank}: num_tokens_per_rdma_rank must be None on one node, got {per_rdma}"
    else:
        assert_equal(rank, "num_tokens_per_rdma_rank", per_rdma, want[1])
    assert_equal(rank, "num_tokens_per_expert", per_expert, want[2])
    assert_equal(rank, "is_token_in_rank", in_rank, want[3])
    assert isinstance(event, portep.EventOverlap), f"rank {rank}: event is {type(event).__name__}"
    # async_finish returns an event that can be waited on.
    *again, event = buffer.get_dispatch_layout(topk_idx, num_experts, async_finish=True)
    event.current_stream_wait()
    assert_equal(rank, "is_token_in_rank (async_finish)", again[3], want[3])


# ------------------------------------------------------------------------------ dispatch/combine


def _dequant(x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    if isinstance(x, tuple):
        return reference.per_token_cast_back(x[0], x[1])
    return x


def _assert_recv_equal(rank: int, name: str, got: Any, want: Any) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == 2, f"rank {rank}: {name}: FP8 recv_x must be (x, scales)"
        assert_equal(rank, f"{name}[0] (fp8)", got[0], want[0])
        assert_equal(rank, f"{name}[1] (scales)", got[1].contiguous(), want[1].contiguous())
    else:
        assert_equal(rank, name, got, want)


def _make_inputs(rank: int, seed: int, num_tokens: int, hidden: int, num_experts: int, topk: int,
                 fp8: bool, scales_noncontig: bool) -> tuple[Any, torch.Tensor, torch.Tensor]:
    gen = generator(seed, rank)
    topk_idx, topk_weights = make_routing(gen, num_tokens, num_experts, topk)
    x = make_x(gen, num_tokens, hidden)
    if fp8:
        x_fp8, scales = reference.per_token_cast_to_fp8(x)
        if scales_noncontig:  # same values, transposed storage (as grouped GEMMs produce them)
            scales = scales.t().contiguous().t()
        return (x_fp8, scales), topk_idx, topk_weights
    return x, topk_idx, topk_weights


def dispatch_combine(rank: int, world_size: int, *, seed: int, num_nodes: int, num_tokens: int | list[int],
                     hidden: int, num_experts: int, topk: int, expert_alignment: int = 1, fp8: bool = False,
                     scales_noncontig: bool = False, backend: str | None = None) -> dict[str, float]:
    """HT dispatch (routed, without topk_idx, cached) and combine (plain, with bias tensor and
    2-tuple, with combined_topk_weights) against the reference; checks the hierarchical rule."""
    buffer = ht_buffer(world_size, num_nodes, hidden, backend)
    with FaultsProved(rank, buffer, backend):
        return _dispatch_combine(buffer, rank, world_size, seed, num_nodes, num_tokens, hidden, num_experts, topk,
                                 expert_alignment, fp8, scales_noncontig)


def dispatch_combine_arena(rank: int, world_size: int, *, arena_bytes: int, **kwargs: Any) -> tuple[int, int]:
    """:func:`dispatch_combine` on a fresh Buffer whose network-hop rows land in arenas of
    ``arena_bytes`` (0: none; too small: the slots instead); returns, over the group, how many
    network-hop messages landed in an arena and how many bytes ranks read out of arenas themselves."""
    with environment(**{ARENA_ENV: str(arena_bytes)}):
        buffer = new_ht_buffer(world_size, kwargs["num_nodes"], kwargs["hidden"], explicitly_destroy=True)
    try:
        _dispatch_combine(buffer, rank, world_size, kwargs["seed"], kwargs["num_nodes"], kwargs["num_tokens"],
                          kwargs["hidden"], kwargs["num_experts"], kwargs["topk"], 1, False, False)
        stats = buffer.get_stats()
        totals = torch.tensor([stats.get("arena_messages", 0), stats.get("bytes_pulled", 0)], dtype=torch.int64)
        dist.all_reduce(totals)
        return int(totals[0]), int(totals[1])
    finally:
        buffer.destroy()


def _dispatch_combine(buffer: Any, rank: int, world_size: int, seed: int, num_nodes: int, num_tokens: int | list[int],
                      hidden: int, num_experts: int, topk: int, expert_alignment: int, fp8: bool,
                      scales_noncontig: bool) -> dict[str, float]:
    ranks_per_node = world_size // num_nodes
    n = _num_tokens(num_tokens, rank)
    x, topk_idx, topk_weights = _make_inputs(rank, seed, n, hidden, num_experts, topk, fp8, scales_noncontig)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)

    # Routed dispatch.
    with _StatsDelta(buffer) as delta:
        recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
            expert_alignment=expert_alignment, config=portep.Buffer.get_dispatch_config(world_size))
    _check_internode(rank, "dispatch", delta, in_rank, ranks_per_node)
    assert isinstance(event, portep.EventOverlap)
    assert handle is not None
    # The ring backend runs HT in its engine (the index maps included); the others run it as plans.
    assert (handle.route is not None) == buffer.backend_name.startswith("ring"), (
        f"rank {rank}: backend {buffer.backend_name} ran HT {'in' if handle.route else 'outside'} the engine")

    all_x, all_idx, all_w = gather(x), gather(topk_idx), gather(topk_weights)
    refs = [reference.ht_dispatch(all_x, all_idx, all_w, num_experts, r, expert_alignment)
            for r in range(world_size)]
    ref = refs[rank]
    _assert_recv_equal(rank, "recv_x", recv_x, ref.recv_x)
    assert_equal(rank, "recv_topk_idx", recv_topk_idx, ref.recv_topk_idx)
    assert_equal(rank, "recv_topk_weights", recv_topk_weights, ref.recv_topk_weights)
    assert_equal(rank, "num_recv_tokens_per_expert_list", list(counts), ref.num_recv_tokens_per_expert_list)
    assert all(isinstance(c, int) for c in counts), f"rank {rank}: counts must be Python ints: {counts!r}"

    # Dispatch without topk_idx: same rows, no routing outputs.
    with _StatsDelta(buffer) as delta:
        recv_x2, idx2, w2, counts2, handle2, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, expert_alignment=expert_alignment)
    _check_internode(rank, "dispatch without topk_idx", delta, in_rank, ranks_per_node)
    assert idx2 is None and w2 is None, f"rank {rank}: without topk_idx, recv_topk_idx/weights must be None"
    _assert_recv_equal(rank, "recv_x (no topk_idx)", recv_x2, ref.recv_x)
    assert_equal(rank, "num_recv_tokens_per_expert_list (no topk_idx)", list(counts2),
                 ref.num_recv_tokens_per_expert_list)

    # Cached dispatch of new data along the same routing.
    x3, _, _ = _make_inputs(rank, seed + 1, n, hidden, num_experts, topk, fp8, scales_noncontig)
    with _StatsDelta(buffer) as delta:
        out = buffer.dispatch(x3, handle=handle)
    _check_internode(rank, "cached dispatch", delta, in_rank, ranks_per_node)
    assert isinstance(out, tuple) and len(out) == 6, f"rank {rank}: cached dispatch returned {len(out)} items"
    assert out[1:5] == (None, None, None, None), f"rank {rank}: cached dispatch must return (recv_x, None x4, event)"
    assert isinstance(out[5], portep.EventOverlap)
    ref3 = reference.ht_dispatch(gather(x3), all_idx, all_w, num_experts, rank)
    _assert_recv_equal(rank, "recv_x (cached)", out[0], ref3.recv_x)

    # Combine: expert output = dequantised received rows scaled per rank (copies differ).
    y = (_dequant(recv_x).float() * (1 + 0.5 * rank)).to(torch.bfloat16)
    all_y = gather(y)
    recv_srcs = [r.recv_src for r in refs]
    num_tokens_all = [t.size(0) for t in all_idx]
    gen = generator(seed, rank, salt=1)
    bias0 = make_x(gen, n, hidden)
    bias1 = make_x(gen, n, hidden)
    diffs = {}
    for name, bias in (("none", None), ("tensor", bias0), ("tuple", (bias0, bias1))):
        with _StatsDelta(buffer):
            combined, combined_w, event = buffer.combine(
                y, handle, topk_weights=recv_topk_weights, bias=bias,
                config=portep.Buffer.get_combine_config(world_size))
        _, want_w = reference.ht_combine(all_y, recv_srcs, num_tokens_all, rank, bias=bias,
                                         recv_topk_weights=[r.recv_topk_weights for r in refs])
        assert combined.dtype == torch.bfloat16, f"rank {rank}: combined_x dtype {combined.dtype}"
        diffs[name] = check_ht_combine(rank, f"combine (bias={name})", combined, all_y, recv_srcs,
                                       num_tokens_all, bias)
        assert_equal(rank, f"combined_topk_weights (bias={name})", combined_w, want_w)
        assert isinstance(event, portep.EventOverlap)
    # combined_topk_weights restore the original weights (0 where no expert).
    assert_equal(rank, "combined_topk_weights vs topk_weights", combined_w,
                 torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights)))

    # DeepEP's own check: combining the received rows gives x times the number of ranks holding it.
    if not fp8:
        combined, none_w, _ = buffer.combine(recv_x, handle)
        assert none_w is None, f"rank {rank}: combined_topk_weights must be None without topk_weights"
        want = x.float() * in_rank.sum(1, keepdim=True)
        diffs["deep_ep"] = assert_close(rank, "combine(recv_x) vs x * ranks", combined, want, 5e-6)
    dist.barrier()
    return diffs


def worst_tokens(rank: int, world_size: int, *, seed: int, num_nodes: int, num_tokens: int, hidden: int,
                 num_experts: int, topk: int, backend: str | None = None) -> None:
    """``num_worst_tokens``: padded outputs (-1 routing rows), empty list, combine ignores padding."""
    buffer = ht_buffer(world_size, num_nodes, hidden, backend)
    x, topk_idx, topk_weights = _make_inputs(rank, seed, num_tokens, hidden, num_experts, topk, False, False)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    worst = num_tokens * world_size
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst)
    all_x, all_idx, all_w = gather(x), gather(topk_idx), gather(topk_weights)
    refs = [reference.ht_dispatch(all_x, all_idx, all_w, num_experts, r) for r in range(world_size)]
    ref = refs[rank]
    m = ref.recv_topk_idx.size(0)
    assert m < worst, "test setup: some rank must receive fewer than num_worst_tokens rows"
    assert tuple(recv_x.shape) == (worst, hidden), f"rank {rank}: recv_x shape {tuple(recv_x.shape)}"
    assert tuple(recv_idx.shape) == (worst, topk), f"rank {rank}: recv_topk_idx shape {tuple(recv_idx.shape)}"
    assert recv_w.size(0) == worst, f"rank {rank}: recv_topk_weights shape {tuple(recv_w.shape)}"
    assert_equal(rank, "recv_x[:M]", recv_x[:m], ref.recv_x)
    assert_equal(rank, "recv_topk_idx[:M]", recv_idx[:m], ref.recv_topk_idx)
    assert_equal(rank, "recv_topk_weights[:M]", recv_w[:m], ref.recv_topk_weights)
    assert bool((recv_idx[m:] == -1).all()), f"rank {rank}: padded recv_topk_idx rows must be -1"
    assert list(counts) == [], f"rank {rank}: num_recv_tokens_per_expert_list must be empty, got {counts!r}"

    y = recv_x.float() * (1 + rank)
    y[m:] = float("nan")  # padding must be ignored by combine
    y = y.to(torch.bfloat16)
    combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w)
    all_y = [t[: r.recv_topk_idx.size(0)] for t, r in zip(gather(y), refs, strict=True)]
    recv_srcs, num_tokens_all = [r.recv_src for r in refs], [t.size(0) for t in all_idx]
    _, want_w = reference.ht_combine(all_y, recv_srcs, num_tokens_all, rank,
                                     recv_topk_weights=[r.recv_topk_weights for r in refs])
    check_ht_combine(rank, "combine after num_worst_tokens", combined, all_y, recv_srcs, num_tokens_all)
    assert_equal(rank, "combined_topk_weights after num_worst_tokens", combined_w, want_w)


def fresh_buffer_roundtrip(rank: int, world_size: int, *, seed: int, num_nodes: int, hidden: int,
                           num_experts: int, backend: str | None = None) -> dict[str, Any]:
    """A newly created Buffer (explicitly destroyed) works, and exposes DeepEP's attributes."""
    buffer = new_ht_buffer(world_size, num_nodes, hidden, backend, explicitly_destroy=True)
    try:
        assert buffer.rank == rank and buffer.group_size == world_size
        assert buffer.group is dist.group.WORLD
        assert buffer.low_latency_mode is False
        assert buffer.num_nvl_bytes > 0
        assert isinstance(buffer.num_rdma_bytes, int)
        x, topk_idx, topk_weights = _make_inputs(rank, seed, 16, hidden, num_experts, 4, False, False)
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, _, _, _, handle, event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights, async_finish=True)
        event.current_stream_wait()
        with event:
            pass
        ref = reference.ht_dispatch(gather(x), gather(topk_idx), gather(topk_weights), num_experts, rank)
        assert_equal(rank, "recv_x (fresh buffer)", recv_x, ref.recv_x)
        combined, _, event = buffer.combine(recv_x, handle, async_finish=True)
        event.current_stream_wait()
        assert_close(rank, "combine (fresh buffer)", combined, x.float() * in_rank.sum(1, keepdim=True), 5e-6)
        return {"comm_stream": repr(buffer.get_comm_stream())}
    finally:
        buffer.destroy()
