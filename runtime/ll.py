"""Low-latency dispatch and combine: direct (no node hop), expert-major output.

Dispatch sends each token straight to the ranks that own its experts, FP8-cast on the sender when
asked. The receiver lays rows out expert-major, `[num_local_experts, num_ranks * T, hidden]`: for
each local expert, rows grouped by source rank (ascending), in source token order within a group.
Combine sends every row back to its source, which reduces ``sum_k w[t, k] * y_k(t)`` in float32.

On a backend that runs LL itself (:meth:`CommBackend.native_ll`: the ring backend on host tensors)
each phase is one engine call, and a token crosses the wire once per destination rank, fanned out
to its experts on arrival; elsewhere each (token, expert) selection is one row of an exchange plan.
The results are the same.

Both are split into a send phase (returns at once, data in flight) and a receive phase (the
``hook`` of ``return_recv_hook=True``), which is what dual-batch overlap builds on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from portep.backends import CommBackend
from portep.backends.plan import Gather, Plan, Receive, RowLayout, WireColumn
from portep.memory import POOL
from portep.native import kernels_for
from portep.native.cpu import finish_sum, logfmt_row_bytes


class LowLatencyHandle(tuple):
    """DeepEP's LL handle ``(src_info, layout_range, T, hidden, num_experts)``.

    ``src_info``: int32 `[num_local_experts, num_ranks * T]`, source token index of each row;
    ``layout_range``: int64 `[num_local_experts, num_ranks]`, ``(begin << 32) | count`` per source.
    It also remembers the Buffer it came from and how many rows this rank sent to each rank, to
    validate the matching combine before any communication.
    """

    buffer_id: int
    send_counts: torch.Tensor
    masked: torch.Tensor
    dispatch: LLDispatch  # the routing the combine reuses

    def __new__(cls, src_info: torch.Tensor, layout_range: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                hidden: int, num_experts: int) -> LowLatencyHandle:
        return super().__new__(cls, (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts))


@dataclass
class LLRecvTensors:
    """Output tensors of an LL dispatch, allocated at send time and filled by the receive phase."""

    x: torch.Tensor
    scales: torch.Tensor | None
    count: torch.Tensor
    src_info: torch.Tensor
    layout_range: torch.Tensor


def _expert_major(local_experts: int, slots: int, width: int, dtype: torch.dtype, transposed: bool,
                  device: torch.device) -> torch.Tensor:
    if transposed:  # scale-major storage, as grouped GEMMs read scales
        return POOL.empty((local_experts, width, slots), dtype, device).transpose(1, 2)
    return POOL.empty((local_experts, slots, width), dtype, device)


_SHAPE_NAMES = ("num_max_dispatch_tokens_per_rank", "hidden", "num_experts", "use_fp8")


def _check_same_shape(op: str, rank: int, theirs: torch.Tensor, mine: torch.Tensor, exclude: frozenset[int]) -> None:
    """Every (unexcluded) rank must call with this rank's shape; name those that did not."""
    for peer, row in enumerate(theirs.tolist()):
        if peer in exclude or row == mine.tolist():
            continue
        diff = ", ".join(f"{name}={a} (rank {rank}: {b})" for name, a, b in zip(_SHAPE_NAMES, row, mine.tolist(),
                                                                              strict=True) if a != b)
        raise ValueError(f"{op}: rank {peer} called with {diff}: every rank must pass the same values")


def _split(index: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(index, counts))


class LLDispatch:
    """One LL dispatch: the rows leave at construction, :meth:`recv` completes it (once).

    Each rank's message carries, in its header, the call's shape and how many rows go to each of
    the receiver's experts: the counts travel with the data, with no round trip of their own.
    """

    def __init__(self, comm: CommBackend, x: torch.Tensor, topk_idx: torch.Tensor, num_max_tokens: int,
                 num_experts: int, use_fp8: bool, round_scale: bool, use_ue8m0: bool, masked: torch.Tensor,
                 op: str = "low_latency_dispatch", drop_dead: bool = False) -> None:
        self.comm, self.op, self.masked = comm, op, masked.to(x.device)
        num_ranks = comm.topology.num_ranks
        local_experts, hidden = num_experts // num_ranks, x.size(1)
        self.use_fp8, self.use_ue8m0 = use_fp8, use_ue8m0
        self.kernels = kernels = kernels_for(x.device)
        self.topk_idx, self.topk_version = topk_idx, topk_idx._version

        if use_fp8:
            x_fp8, scales = kernels.fp8_cast(x, round_scale)
            columns = [x_fp8, kernels.pack_ue8m0(scales) if use_ue8m0 else scales]
        else:
            columns = [x]
        self.layout = RowLayout([WireColumn(t.dtype, t.size(1)) for t in columns] + [WireColumn(torch.int32, 1)])
        shape = [num_max_tokens, hidden, num_experts, int(use_fp8)]
        self.route = None  # the engine's, when the backend runs LL itself
        if comm.native_ll(x.device):
            self.route, self.pending = comm.ll_dispatch(op, topk_idx, num_experts, self.masked, shape, columns,
                                                        self.layout, drop_dead)
            self.send_counts = torch.from_numpy(self.route.send_counts())
        else:
            self.exclude = frozenset(masked.nonzero().flatten().tolist())
            token, k, counts = kernels.ll_send_order(topk_idx, num_experts, num_ranks, self.masked)
            self.send_counts = counts.sum(1)
            per_rank = self.send_counts.tolist()
            self.token, self.k = _split(token, per_rank), _split(k, per_rank)  # what a combine gets back
            src_token = torch.arange(x.size(0), dtype=torch.int32, device=x.device).unsqueeze(1)
            self.shape = torch.tensor(shape, dtype=torch.int32)
            header = torch.cat([self.shape.expand(num_ranks, -1), counts.to(torch.int32).cpu()], 1)
            sends = [[Gather([*columns, src_token], index=idx)] if idx.numel() else [] for idx in self.token]
            self.pending = comm.start(Plan(op, "world", self.layout, sends, counts=header, exclude=self.exclude,
                                           drop_dead=drop_dead))
        self.recv_rows: list[torch.Tensor] | None = None  # where each source's rows landed (plans)

        slots = num_ranks * num_max_tokens
        scales_out = None
        if use_fp8:
            scale_width = hidden // 512 if use_ue8m0 else hidden // 128
            scale_dtype = torch.int32 if use_ue8m0 else torch.float32
            scales_out = _expert_major(local_experts, slots, scale_width, scale_dtype, True, x.device)
        self.out = LLRecvTensors(
            x=_expert_major(local_experts, slots, hidden, torch.float8_e4m3fn if use_fp8 else x.dtype, False, x.device),
            scales=scales_out,
            count=torch.empty(local_experts, dtype=torch.int32, device=x.device),
            src_info=torch.empty(local_experts, slots, dtype=torch.int32, device=x.device),
            layout_range=torch.empty(local_experts, num_ranks, dtype=torch.int64, device=x.device),
        )
        self.done = False

    def recv(self, cumulative_stats: torch.Tensor | None = None, wait_cost_stats: torch.Tensor | None = None) -> None:
        """Wait for the rows and scatter them expert-major straight into the output tensors."""
        if self.done:
            raise RuntimeError(f"{self.op}: the receive hook was already called")
        started = time.perf_counter_ns()
        if self.route is not None:
            self._recv_native(started, cumulative_stats, wait_cost_stats)
            return
        _, header = self.pending.headers()
        dropped = self.pending.dropped
        ignore = self.exclude | dropped
        try:
            _check_same_shape(self.op, self.comm.topology.rank, header[:, : self.shape.numel()], self.shape, ignore)
        except ValueError as exc:
            self.comm.abandon(self.op, str(exc))
            raise
        masked = self.masked.clone()
        masked[sorted(dropped)] = True
        recv_counts = header[:, self.shape.numel():].to(torch.int64).to(self.masked.device)
        recv_counts = recv_counts.masked_fill(masked.unsqueeze(1), 0)
        out = self.out
        positions, layout_range, per_expert = self.kernels.ll_recv_positions(recv_counts, out.x.size(1))
        rows = _split(positions, recv_counts.sum(1).tolist())
        columns = [out.x, out.scales, out.src_info.unsqueeze(2)] if out.scales is not None else \
            [out.x, out.src_info.unsqueeze(2)]
        self.pending.receive([Receive(columns, index=index) for index in rows])
        self.pending.wait()
        waited = time.perf_counter_ns() - started
        out.layout_range.copy_(layout_range)
        out.count.copy_(per_expert)
        self.recv_rows = rows
        self.pending = None  # the engine's exchange is done; nothing else to keep
        if cumulative_stats is not None:
            cumulative_stats += out.count.to(cumulative_stats.dtype)
        if wait_cost_stats is not None:
            wait_cost_stats += (recv_counts.sum(1) > 0).to(wait_cost_stats.dtype) * waited
        self.masked = masked
        self.done = True

    def _recv_native(self, started: int, cumulative_stats: torch.Tensor | None,
                     wait_cost_stats: torch.Tensor | None) -> None:
        out = self.out
        columns = [out.x, out.scales, out.src_info.unsqueeze(2)] if out.scales is not None else \
            [out.x, out.src_info.unsqueeze(2)]
        dropped = self.comm.ll_receive(self.route, self.pending, self.layout, columns, out.x.size(1), out.layout_range,
                                       out.count)
        waited = time.perf_counter_ns() - started
        self.pending = None
        if dropped:
            self.masked = self.masked.clone()
            self.masked[sorted(dropped)] = True
        if cumulative_stats is not None:
            cumulative_stats += out.count.to(cumulative_stats.dtype)
        if wait_cost_stats is not None:
            received = (out.layout_range & 0xFFFFFFFF).sum(0) > 0
            wait_cost_stats += received.to(wait_cost_stats.dtype) * waited
        self.done = True


class LLCombine:
    """One LL combine: rows go back at construction, :meth:`recv` reduces them (once) — on arrival,
    straight out of the receive slots into a float32 accumulator, weighted."""

    def __init__(self, comm: CommBackend, expert_out: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 handle: LowLatencyHandle, use_logfmt: bool, masked: torch.Tensor,
                 op: str = "low_latency_combine", drop_dead: bool = False, out: torch.Tensor | None = None,
                 recv_later: bool = False) -> None:
        """``out``: where :meth:`recv` will write the result, if known now (a backend that runs LL
        itself then writes each token's sum there as soon as it is complete). ``recv_later``:
        :meth:`recv` runs from a receive hook, after other calls may have started."""
        self.comm, self.op = comm, op
        self.final_out: torch.Tensor | None = None
        num_ranks = comm.topology.num_ranks
        _, layout_range, _, hidden, num_experts = handle
        self.hidden, self.num_tokens, self.use_logfmt = hidden, topk_idx.size(0), use_logfmt
        self.kernels = kernels = kernels_for(expert_out.device)
        masked = masked.to(expert_out.device)
        dispatch = getattr(handle, "dispatch", None)
        same_routing = dispatch is not None and dispatch.done and (
            topk_idx is dispatch.topk_idx and topk_idx._version == dispatch.topk_version
            or torch.equal(topk_idx, dispatch.topk_idx))
        same = same_routing and torch.equal(masked, dispatch.masked)
        # After an engine dispatch every rank combines in the engine, whatever its view of the mask
        # (ranks masked since are left out there): ranks that see a death at different moments
        # must still agree on the order the rows come back in.
        self.native = same_routing and dispatch.route is not None and not use_logfmt and \
            comm.native_ll(expert_out.device)
        if self.native:  # the engine reuses the dispatch's routing and placement
            self.acc = POOL.empty((self.num_tokens, hidden), torch.float32, expert_out.device)
            self.touched = torch.zeros(self.num_tokens, dtype=torch.uint8, device=expert_out.device)
            self.route, self.masked = dispatch.route, masked
            self.final_out = out
            self.pending = comm.ll_combine(op, dispatch.route, expert_out, topk_weights, self.acc, self.touched, masked,
                                           drop_dead, out, one_step=recv_later)
            self.done = False
            return
        if same and dispatch.recv_rows is not None:
            # the dispatch's routing: which selections come back from where, and which rows go back
            self.token = dispatch.token
            ks = dispatch.k
            source_rows = dispatch.recv_rows
        else:
            expected = handle.send_counts.clone()
            expected[masked] = 0
            token, k, counts = kernels.ll_send_order(topk_idx, num_experts, num_ranks, masked)
            if not torch.equal(counts.sum(1), expected):
                raise ValueError(f"{op}: topk_idx does not match the one given to low_latency_dispatch for this "
                                 "handle")
            per_rank = counts.sum(1).tolist()
            self.token, ks = _split(token, per_rank), _split(k, per_rank)
            expert, slot, per_source = kernels.ll_combine_gather(layout_range)
            source_rows = _split(expert * expert_out.size(1) + slot, per_source.tolist())
        self.weights = [topk_weights[t, k] for t, k in zip(self.token, ks, strict=True)]
        if masked.any():
            dead = masked.tolist()
            self.token = [t[:0] if dead[r] else t for r, t in enumerate(self.token)]
            self.weights = [w[:0] if dead[r] else w for r, w in enumerate(self.weights)]
            source_rows = [rows[:0] if dead[r] else rows for r, rows in enumerate(source_rows)]
        per_source = torch.tensor([rows.numel() for rows in source_rows], dtype=torch.int64)
        rows = torch.cat(source_rows) if use_logfmt else None
        if use_logfmt:
            source = kernels.logfmt_encode(expert_out.reshape(-1, hidden)[rows]) if rows.numel() else \
                torch.empty(0, logfmt_row_bytes(hidden), dtype=torch.uint8, device=expert_out.device)
            firsts = (torch.cumsum(per_source, 0) - per_source).tolist()
            sends = [[Gather([source], first=f, count=n)] if n else [] for f, n in zip(firsts, per_source.tolist(),
                                                                                       strict=True)]
            self.layout = RowLayout([WireColumn(torch.uint8, source.size(1))])
        else:
            sends = [[Gather([expert_out], index=idx)] if idx.numel() else [] for idx in source_rows]
            self.layout = RowLayout([WireColumn(expert_out.dtype, hidden)])
        # Not zeroed: the first row to reach a token is stored, the others added (``touched``).
        self.acc = POOL.empty((self.num_tokens, hidden), torch.float32, expert_out.device)
        self.touched = torch.zeros(self.num_tokens, dtype=torch.uint8, device=expert_out.device)
        if use_logfmt:
            self.encoded = [torch.empty(t.numel(), self.layout.row_bytes, dtype=torch.uint8, device=expert_out.device)
                            for t in self.token]
            receives = [Receive([t], rows=t.size(0)) for t in self.encoded]
        else:
            receives = [Receive([self.acc], index=t, reduce=True, weights=w, touched=self.touched, rows=t.numel())
                        for t, w in zip(self.token, self.weights, strict=True)]
        exclude = frozenset(masked.nonzero().flatten().tolist())
        self.pending = comm.start(Plan(op, "world", self.layout, sends, receives=receives, exclude=exclude,
                                       drop_dead=drop_dead))
        self.done = False

    def recv(self, out: torch.Tensor | None = None, wait_cost_stats: torch.Tensor | None = None) -> torch.Tensor:
        """Wait for the expert outputs; the weighted float32 sums into `[num_tokens, hidden]` bf16."""
        if self.done:
            raise RuntimeError(f"{self.op}: the receive hook was already called")
        started = time.perf_counter_ns()
        self.pending.wait()
        waited = time.perf_counter_ns() - started
        if not self.native and self.use_logfmt:  # decoded here, then reduced like the plain rows
            dropped = self.pending.dropped
            for rank, (encoded, token, weights) in enumerate(zip(self.encoded, self.token, self.weights, strict=True)):
                if encoded.size(0) and rank not in dropped:
                    values = self.kernels.logfmt_decode(encoded, self.hidden) * weights.unsqueeze(1)
                    self.acc[token[self.touched[token] == 0]] = 0
                    self.acc.index_add_(0, token, values)
                    self.touched[token] = 1
        final_out = self.final_out
        if final_out is not None and out is not None and out is not final_out:
            raise ValueError(f"{self.op}: recv(out) must be given the tensor the combine was started with")
        result = out if out is not None else final_out if final_out is not None else \
            POOL.empty((self.num_tokens, self.hidden), torch.bfloat16, self.acc.device)
        finish_sum(self.acc, self.touched, result)
        if wait_cost_stats is not None:
            received = torch.from_numpy(self.route.send_counts() > 0) & ~self.masked if self.native else \
                torch.tensor([t.numel() > 0 for t in self.token])
            wait_cost_stats += received.to(wait_cost_stats.device, wait_cost_stats.dtype) * waited
        self.done = True
        return result
