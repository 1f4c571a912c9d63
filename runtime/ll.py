"""Low-latency dispatch and combine: direct, one message per (token, expert), expert-major output.

Dispatch sends each selection of a token straight to the rank that owns the expert (no node
hop), FP8-cast on the sender when asked. The receiver lays rows out expert-major,
`[num_local_experts, num_ranks * T, hidden]`: for each local expert, rows grouped by source rank
(ascending), in source token order within a group. Combine sends every row back to its source,
which reduces ``sum_k w[t, k] * y_k(t)`` in float32.

Both are split into a send phase (returns at once, data in flight) and a receive phase (the
``hook`` of ``return_recv_hook=True``), which is what dual-batch overlap builds on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from portep.backends import CommBackend, PendingExchange
from portep.native import kernels_for
from portep.native.cpu import Field, RowFormat


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
        return torch.empty(local_experts, width, slots, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(local_experts, slots, width, dtype=dtype, device=device)


_SHAPE_NAMES = ("num_max_dispatch_tokens_per_rank", "hidden", "num_experts", "use_fp8")


def _check_same_shape(op: str, rank: int, theirs: torch.Tensor, mine: torch.Tensor, exclude: frozenset[int]) -> None:
    """Every (unexcluded) rank must call with this rank's shape; name those that did not."""
    for peer, row in enumerate(theirs.tolist()):
        if peer in exclude or row == mine.tolist():
            continue
        diff = ", ".join(f"{name}={a} (rank {rank}: {b})" for name, a, b in zip(_SHAPE_NAMES, row, mine.tolist(),
                                                                              strict=True) if a != b)
        raise ValueError(f"{op}: rank {peer} called with {diff}: every rank must pass the same values")


class LLDispatch:
    """One LL dispatch: :meth:`send` at construction, :meth:`recv` completes it (once)."""

    def __init__(self, comm: CommBackend, x: torch.Tensor, topk_idx: torch.Tensor, num_max_tokens: int,
                 num_experts: int, use_fp8: bool, round_scale: bool, use_ue8m0: bool, masked: torch.Tensor,
                 op: str = "low_latency_dispatch", drop_dead: bool = False) -> None:
        self.comm, self.op, self.masked = comm, op, masked.to(x.device)
        num_ranks = comm.topology.num_ranks
        local_experts, hidden = num_experts // num_ranks, x.size(1)
        self.use_fp8, self.use_ue8m0 = use_fp8, use_ue8m0
        self.kernels = kernels = kernels_for(x.device)
        token, _, counts = kernels.ll_send_order(topk_idx, num_experts, num_ranks, self.masked)
        self.send_counts = counts.sum(1)

        tensors = {"src_token": token.to(torch.int32).unsqueeze(1)}
        fields = [Field("src_token", torch.int32, 1)]
        if use_fp8:
            x_fp8, scales = kernels.fp8_cast(x, round_scale)
            tensors.update(x=x_fp8[token], scales=scales[token])
            fields += [Field("x", torch.float8_e4m3fn, hidden), Field("scales", torch.float32, hidden // 128)]
        else:
            tensors["x"] = x[token]
            fields.append(Field("x", x.dtype, hidden))
        self.format = RowFormat(fields)

        # Counts first (one small message per peer, with the call's shape so that ranks that
        # disagree fail here, naming each other), then the rows, left in flight.
        exclude = frozenset(masked.nonzero().flatten().tolist())
        shape = torch.tensor([num_max_tokens, hidden, num_experts, int(use_fp8)], dtype=torch.int64, device=x.device)
        got, dropped = comm.exchange_counts(torch.cat([shape.expand(num_ranks, -1), counts], 1), op, exclude,
                                            drop_dead)
        _check_same_shape(op, comm.topology.rank, got[:, : shape.numel()], shape, exclude | dropped)
        self.arriving = got[:, shape.numel():]
        self._mask_dropped(dropped)
        # Rows for a rank dropped during the counts are not sent: the backend skips dropped ranks.
        self.pending: PendingExchange = comm.start_exchange(
            kernels.pack_rows(self.format, tensors), self.send_counts.tolist(), self.arriving.sum(1).tolist(), "world",
            op, exclude, drop_dead)

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

    def _mask_dropped(self, dropped: frozenset[int]) -> None:
        """Mask ranks dropped after they died (shrink mode), as if masked from the start."""
        if dropped:
            self.masked = self.masked.clone()
            self.masked[sorted(dropped)] = True
        self.recv_counts = self.arriving.masked_fill(self.masked.unsqueeze(1), 0)

    def recv(self, cumulative_stats: torch.Tensor | None = None, wait_cost_stats: torch.Tensor | None = None) -> None:
        """Wait for the rows and lay them out expert-major into the output tensors."""
        if self.done:
            raise RuntimeError(f"{self.op}: the receive hook was already called")
        started = time.perf_counter_ns()
        rows = self.pending.wait()
        waited = time.perf_counter_ns() - started
        self._mask_dropped(self.pending.dropped)
        if self.masked.any():  # rows that masked ranks sent anyway (backends that cannot leave them out)
            got = torch.tensor(self.pending.recv_counts, device=self.masked.device)
            rows = rows[~self.masked.repeat_interleave(got)]
        kernels = self.kernels
        received = kernels.unpack_rows(self.format, rows)
        expert, slot, begin = kernels.ll_recv_slots(self.recv_counts)
        out = self.out
        kernels.scatter_rows(out.x, expert, slot, received["x"])
        if out.scales is not None:
            scales = received["scales"]
            kernels.scatter_rows(out.scales, expert, slot, kernels.pack_ue8m0(scales) if self.use_ue8m0 else scales)
        kernels.scatter_rows(out.src_info, expert, slot, received["src_token"].view(-1))
        count = self.recv_counts.t()
        out.layout_range.copy_((begin << 32) | count)
        out.count.copy_(count.sum(1))
        if cumulative_stats is not None:
            cumulative_stats += out.count.to(cumulative_stats.dtype)
        if wait_cost_stats is not None:
            wait_cost_stats += (self.recv_counts.sum(1) > 0).to(wait_cost_stats.dtype) * waited
        self.done = True


class LLCombine:
    """One LL combine: rows go back at construction, :meth:`recv` reduces them (once)."""

    def __init__(self, comm: CommBackend, expert_out: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 handle: LowLatencyHandle, use_logfmt: bool, masked: torch.Tensor,
                 op: str = "low_latency_combine", drop_dead: bool = False) -> None:
        self.comm, self.op = comm, op
        num_ranks = comm.topology.num_ranks
        _, layout_range, _, hidden, num_experts = handle
        self.hidden, self.num_tokens, self.use_logfmt = hidden, topk_idx.size(0), use_logfmt
        self.kernels = kernels = kernels_for(expert_out.device)
        masked = masked.to(expert_out.device)
        expected = handle.send_counts.clone()
        expected[masked] = 0
        self.token, self.k, counts = kernels.ll_send_order(topk_idx, num_experts, num_ranks, masked)
        if not torch.equal(counts.sum(1), expected):
            raise ValueError(f"{op}: topk_idx does not match the one given to low_latency_dispatch for this handle")
        self.weights = topk_weights[self.token, self.k].unsqueeze(1)

        expert, slot, per_source = kernels.ll_combine_gather(layout_range)
        keep = ~masked.repeat_interleave(per_source)
        per_source = per_source.masked_fill(masked, 0)
        rows = expert_out[expert[keep], slot[keep]]
        rows = kernels.logfmt_encode(rows) if use_logfmt else rows.contiguous().view(torch.uint8)
        expected = counts.sum(1)
        wrong: list[int] = []
        # With masks, ranks may disagree on who is cut off: learn the counts instead of assuming them.
        self.expected = expected
        self.pending = comm.start_exchange(rows, per_source.tolist(), None if masked.any() else expected.tolist(),
                                           "world", op, frozenset(masked.nonzero().flatten().tolist()), drop_dead)
        if masked.any() and self.pending.recv_counts != expected.tolist():
            self.pending.wait()  # some backends learn the counts only with the rows
            wrong = [r for r, (a, b) in enumerate(zip(self.pending.recv_counts, expected.tolist(), strict=True))
                     if a != b and r not in self.pending.dropped]
        if masked.any() and wrong:
            raise ValueError(f"{op}: rank(s) {wrong} sent back a different number of rows than were dispatched "
                             "to them; are the rank masks the same on every rank?")
        self.done = False

    def recv(self, out: torch.Tensor | None = None, wait_cost_stats: torch.Tensor | None = None) -> torch.Tensor:
        """Wait for the expert outputs and reduce them with the weights into `[num_tokens, hidden]` bf16."""
        if self.done:
            raise RuntimeError(f"{self.op}: the receive hook was already called")
        started = time.perf_counter_ns()
        rows = self.pending.wait()
        waited = time.perf_counter_ns() - started
        if self.pending.dropped:  # ranks that died in flight (shrink mode): their rows never came
            source = torch.arange(self.expected.numel(), device=self.expected.device).repeat_interleave(self.expected)
            keep = ~torch.isin(source, torch.tensor(sorted(self.pending.dropped), device=source.device))
            self.token, self.weights = self.token[keep], self.weights[keep]
        if self.use_logfmt:
            values = self.kernels.logfmt_decode(rows, self.hidden)
        else:
            values = rows.view(torch.bfloat16)
        total = self.kernels.reduce_rows(values, self.token, self.num_tokens, self.weights)
        result = out if out is not None else torch.empty(self.num_tokens, self.hidden, dtype=torch.bfloat16,
                                                         device=total.device)
        result.copy_(total)
        if wait_cost_stats is not None:
            received = torch.tensor(self.pending.recv_counts, device=wait_cost_stats.device) > 0
            wait_cost_stats += received.to(wait_cost_stats.dtype) * waited
        self.done = True
        return result
