"""CPU implementation of portep's device kernels, vectorised with torch.

Each function is the CPU body of one kernel: the routing layout, FP8/LogFMT casts, packing rows
into a byte-row send buffer and unpacking them, the index computations of the HT and LL
send/receive sides, and the combine reductions. No per-token Python loops: everything is a handful
of tensor ops, which also run unchanged on any other torch device. :data:`CPU_KERNELS` gathers them
behind the :class:`~portep.native.interface.Kernels` interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FP8_MAX = 448.0
FP8_MIN_AMAX = 1e-4
FP8_GROUP = 128
LOGFMT_GROUP = 128
LOGFMT_LEVELS = 511  # codes 1..511 hold log2|x|; code 0 is an exact zero
_CAST_TYPES = {torch.bfloat16: 3, torch.float16: 4, torch.float32: 5}  # enum pe_type of pe_engine.h


# ----------------------------------------------------------------------------- layout
def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Counts of a routing.

    Arguments:
        topk_idx: `[num_tokens, num_topk]` int64 expert ids, -1 for none.

    Returns:
        num_tokens_per_rank: `[num_ranks]` int32, tokens with ≥1 expert on each rank.
        num_tokens_per_rdma_rank: `[num_nodes]` int32, likewise per node (None with one node).
        num_tokens_per_expert: `[num_experts]` int32, selections per expert.
        is_token_in_rank: `[num_tokens, num_ranks]` bool.
    """
    num_tokens = topk_idx.size(0)
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    experts = topk_idx[valid]
    num_tokens_per_expert = torch.bincount(experts, minlength=num_experts).to(torch.int32)
    is_token_in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    dest = torch.where(valid, topk_idx // experts_per_rank, num_ranks)  # column R collects the -1s
    is_token_in_rank.scatter_(1, dest, True)
    is_token_in_rank = is_token_in_rank[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_nodes = num_ranks // ranks_per_node
    num_tokens_per_rdma_rank = None
    if num_nodes > 1:
        in_node = is_token_in_rank.view(num_tokens, num_nodes, ranks_per_node).any(2)
        num_tokens_per_rdma_rank = in_node.sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


def rows_by_column(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a `[rows, cols]` bool mask: the row indices of the set entries ordered by (column, row),
    and the number of entries per column (int64 `[cols]`). On the CPU the engine does it in one
    pass."""
    if mask.is_cpu and mask.dim() == 2 and mask.dtype in (torch.bool, torch.uint8):
        from .engine import rows_by_column as native_rows_by_column

        mask = mask.contiguous()
        index = torch.empty(mask.numel(), dtype=torch.int64)
        counts = torch.empty(mask.size(1), dtype=torch.int64)
        n = native_rows_by_column(mask.data_ptr(), mask.size(0), mask.size(1), index.data_ptr(), counts.data_ptr())
        return index[:n], counts
    return rows_by_column_torch(mask)


def rows_by_column_torch(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rows_by_column` with torch ops (any device)."""
    cols, rows = mask.t().nonzero(as_tuple=True)
    return rows, torch.bincount(cols, minlength=mask.size(1))


def ht_recv_positions(node_recv: torch.Tensor) -> torch.Tensor:
    """Where the rows of an HT node hop land: ``node_recv`` (int64 `[ranks_per_node, num_nodes]`)
    rows arrive from each local rank j grouped by source node n; the output holds them grouped by
    source rank ``n * ranks_per_node + j``, source order kept. Returns the output row of every
    arriving row, ordered by (j, n)."""
    per_node, nodes = node_recv.shape
    if node_recv.is_cpu:
        from .engine import ht_positions

        counts = node_recv.to(torch.int64).contiguous()
        positions = torch.empty(int(counts.sum()), dtype=torch.int64)
        ht_positions(counts.data_ptr(), per_node, nodes, positions.data_ptr())
        return positions
    return ht_recv_positions_torch(node_recv)


def ht_recv_positions_torch(node_recv: torch.Tensor) -> torch.Tensor:
    """:func:`ht_recv_positions` with torch ops (any device)."""
    per_node, nodes = node_recv.shape
    per_source = node_recv.t().reshape(-1)  # by source rank n * per_node + j
    base = torch.cumsum(per_source, 0) - per_source
    starts, lengths = base.view(nodes, per_node).t().reshape(-1), node_recv.reshape(-1)
    block_first = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
    return block_first + torch.arange(int(lengths.sum()), device=node_recv.device)


def local_routing(topk_idx: torch.Tensor, topk_weights: torch.Tensor, first_expert: int, local_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dispatch's received routing for this rank: global expert ids `[rows, topk]` to local ones
    (-1 for experts of other ranks), their weights (0 there), and the selections per local expert
    (int64 `[local_experts]`)."""
    if topk_idx.is_cpu and topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32:
        from .engine import ht_local_routing

        topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.contiguous()
        local = torch.empty_like(topk_idx)
        weights = torch.empty_like(topk_weights)
        per_expert = torch.empty(local_experts, dtype=torch.int64)
        ht_local_routing(topk_idx.data_ptr(), topk_weights.data_ptr(), topk_idx.size(0), topk_idx.size(1),
                         first_expert, local_experts, local.data_ptr(), weights.data_ptr(), per_expert.data_ptr())
        return local, weights, per_expert
    return local_routing_torch(topk_idx, topk_weights, first_expert, local_experts)


def local_routing_torch(topk_idx: torch.Tensor, topk_weights: torch.Tensor, first_expert: int, local_experts: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`local_routing` with torch ops (any device)."""
    shifted = topk_idx - first_expert
    mine = (topk_idx >= 0) & (shifted >= 0) & (shifted < local_experts)
    local = torch.where(mine, shifted, torch.full_like(shifted, -1))
    weights = torch.where(mine, topk_weights, torch.zeros_like(topk_weights))
    return local, weights, torch.bincount(local[mine], minlength=local_experts)


# ----------------------------------------------------------------------------- FP8
def fp8_cast(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel cast to e4m3.

    Returns `(x_fp8 [N, hidden] float8_e4m3fn, scales [N, hidden // 128] float32)` with
    `x ≈ x_fp8 * scales` (scales broadcast over each group of 128 channels). On the CPU the compiled
    engine does it in one pass (same operations, same results); elsewhere torch ops do.
    """
    n, hidden = x.shape
    if x.is_cpu and x.dtype in _CAST_TYPES and x.stride(1) == 1:
        from portep.memory import POOL

        from .engine import fp8_cast as native_fp8_cast

        x_fp8 = POOL.empty((n, hidden), torch.float8_e4m3fn)
        scales = torch.empty(n, hidden // FP8_GROUP, dtype=torch.float32)
        native_fp8_cast(x.data_ptr(), _CAST_TYPES[x.dtype], n, hidden, x.stride(0) * x.element_size(),
                        x_fp8.data_ptr(), scales.data_ptr(), round_scale)
        return x_fp8, scales
    return fp8_cast_torch(x, round_scale)


def fp8_cast_torch(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_cast` with torch ops (any device)."""
    n, hidden = x.shape
    groups = x.float().view(n, hidden // FP8_GROUP, FP8_GROUP)
    amax = groups.abs().amax(dim=2).clamp(min=FP8_MIN_AMAX)
    if round_scale:
        scale_inv = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
        scale = 1.0 / scale_inv
    else:
        scale = FP8_MAX / amax
        scale_inv = amax / FP8_MAX
    x_fp8 = (groups * scale.unsqueeze(2)).view(n, hidden).to(torch.float8_e4m3fn)
    return x_fp8, scale_inv


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales `[..., S]` into int32 `[..., S/4]` of 4 exponent bytes."""
    exponents = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    return exponents.view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: int32 `[..., S/4]` to float32 `[..., S]`."""
    exponents = packed.contiguous().view(torch.uint8).to(torch.int32)
    return (exponents << 23).view(torch.float32)


def fp8_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantise `[N, hidden]` e4m3 with float32 `[N, hidden/128]` or ue8m0 int32 scales."""
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    n, hidden = x_fp8.shape
    groups = x_fp8.float().view(n, scales.size(1), hidden // scales.size(1))
    return (groups * scales.unsqueeze(2)).view(n, hidden)


# ----------------------------------------------------------------------------- LogFMT
def logfmt_encode(x: torch.Tensor) -> torch.Tensor:
    """Compress `[N, hidden]` rows to 10 bits per value (sign + 9-bit log2 magnitude) with a
    per-128-channel (min, max) log2 range in float32. Returns uint8 `[N, hidden*10/8 + hidden/128*8]`."""
    n, hidden = x.shape
    groups = x.float().view(n, hidden // LOGFMT_GROUP, LOGFMT_GROUP)
    magnitude = groups.abs()
    nonzero = magnitude > 0
    logs = torch.log2(torch.where(nonzero, magnitude, torch.ones_like(magnitude)))
    inf = torch.tensor(float("inf"), device=x.device)
    lo = torch.where(nonzero, logs, inf).amin(dim=2)
    hi = torch.where(nonzero, logs, -inf).amax(dim=2)
    empty = ~nonzero.any(dim=2)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    step = ((hi - lo) / (LOGFMT_LEVELS - 1)).clamp(min=1e-30)
    level = torch.round((logs - lo.unsqueeze(2)) / step.unsqueeze(2)).clamp(0, LOGFMT_LEVELS - 1)
    code = torch.where(nonzero, level.to(torch.int64) + 1, torch.zeros_like(level, dtype=torch.int64))
    code = code | ((groups < 0).to(torch.int64) << 9)
    quads = code.view(n, hidden // 4, 4)
    packed = quads[..., 0] | (quads[..., 1] << 10) | (quads[..., 2] << 20) | (quads[..., 3] << 30)
    shifts = torch.arange(0, 40, 8, dtype=torch.int64, device=x.device)
    body = ((packed.unsqueeze(2) >> shifts) & 0xFF).to(torch.uint8).view(n, -1)
    ranges = torch.stack([lo, hi], dim=2).contiguous().view(torch.uint8).view(n, -1)
    return torch.cat([body, ranges], dim=1)


def logfmt_decode(data: torch.Tensor, hidden: int) -> torch.Tensor:
    """Inverse of :func:`logfmt_encode`: uint8 rows to float32 `[N, hidden]`."""
    n = data.size(0)
    body_bytes = hidden * 10 // 8
    body = data[:, :body_bytes].to(torch.int64).view(n, hidden // 4, 5)
    shifts = torch.arange(0, 40, 8, dtype=torch.int64, device=data.device)
    packed = (body << shifts).sum(dim=2)
    groups = hidden // LOGFMT_GROUP
    code = torch.stack([(packed >> s) & 0x3FF for s in (0, 10, 20, 30)], dim=2).view(n, groups, LOGFMT_GROUP)
    ranges = torch.empty(n, groups * 8, dtype=torch.uint8, device=data.device)
    ranges = ranges.copy_(data[:, body_bytes:]).view(torch.float32).view(n, groups, 2)
    lo, hi = ranges[..., 0:1], ranges[..., 1:2]
    step = (hi - lo) / (LOGFMT_LEVELS - 1)
    level = (code & 0x1FF).float()
    value = torch.exp2(lo + (level - 1) * step)
    value = torch.where(level > 0, value, torch.zeros_like(value))
    value = torch.where((code >> 9) > 0, -value, value)
    return value.view(n, hidden)


def logfmt_row_bytes(hidden: int) -> int:
    return hidden * 10 // 8 + hidden // LOGFMT_GROUP * 8


# ----------------------------------------------------------------------------- row packing
@dataclass(frozen=True)
class Field:
    """One per-row field of a byte row: `width` elements of `dtype`."""

    name: str
    dtype: torch.dtype
    width: int

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


class RowFormat:
    """Packs several per-row tensors into one uint8 `[rows, row_bytes]` message and back."""

    def __init__(self, fields: Sequence[Field]) -> None:
        self.fields = tuple(fields)
        self.row_bytes = sum(f.nbytes for f in self.fields)

    def pack(self, tensors: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `index` (all rows when None) of each field's `[N, width]` tensor, as byte rows."""
        parts = []
        for field in self.fields:
            value = tensors[field.name]
            if index is not None:
                value = value[index]
            parts.append(value.reshape(value.size(0), field.width).contiguous().view(torch.uint8))
        if not parts:
            return torch.empty(0, 0, dtype=torch.uint8, device=index.device if index is not None else None)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def unpack(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split byte rows back into `{name: [rows, width] tensor}`."""
        out, start = {}, 0
        for field in self.fields:
            # A fresh copy: a slice of one row counts as contiguous but may sit at an unaligned offset.
            chunk = torch.empty(rows.size(0), field.nbytes, dtype=torch.uint8, device=rows.device)
            chunk.copy_(rows[:, start : start + field.nbytes])
            out[field.name] = chunk.view(field.dtype).view(rows.size(0), field.width)
            start += field.nbytes
        return out


# ----------------------------------------------------------------------------- LL index maps
def ll_send_order(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rank_masked: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) selections an LL dispatch sends, ordered by (dest rank, local expert, token).

    Returns `token [S]`, `k [S]` (int64) and `counts [num_ranks, num_local_experts]` int64.
    Selections of -1 and of experts on masked ranks are skipped. On the CPU one compiled counting
    sort does it; elsewhere torch ops do.
    """
    num_tokens, num_topk = topk_idx.shape
    if topk_idx.is_cpu and topk_idx.dtype == torch.int64:
        from .engine import ll_route

        topk_idx = topk_idx.contiguous()
        token = torch.empty(num_tokens * num_topk, dtype=torch.int64)
        k = torch.empty(num_tokens * num_topk, dtype=torch.int64)
        counts = torch.empty(num_experts, dtype=torch.int32)
        masked = None if rank_masked is None else rank_masked.to(torch.uint8).contiguous()
        n = ll_route(topk_idx.data_ptr(), num_tokens, num_topk, num_experts, num_ranks,
                     masked.data_ptr() if masked is not None else 0, token.data_ptr(), k.data_ptr(), counts.data_ptr())
        if n < 0:
            raise MemoryError("ll_send_order: out of memory")
        return token[:n], k[:n], counts.view(num_ranks, num_experts // num_ranks).to(torch.int64)
    local_experts = num_experts // num_ranks
    valid = topk_idx >= 0
    if rank_masked is not None:
        valid &= ~rank_masked[(topk_idx // local_experts).clamp(min=0)]
    flat = topk_idx.reshape(-1)
    tokens = torch.arange(num_tokens, device=topk_idx.device).repeat_interleave(num_topk)
    key = torch.where(valid.reshape(-1), flat * num_tokens + tokens, torch.full_like(flat, -1))
    order = torch.argsort(key, stable=True)
    order = order[key[order] >= 0]
    token, k = order // num_topk, order % num_topk
    counts = torch.bincount(flat[order], minlength=num_experts).view(num_ranks, local_experts)
    return token, k, counts


def _slots(counts: torch.Tensor, begin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert and slot of each row of consecutive blocks `counts [num_ranks, local_experts]`
    (source-major), given the first slot `begin [local_experts, num_ranks]` of each block."""
    local_experts = counts.size(1)
    flat = counts.reshape(-1)
    block = torch.arange(flat.numel(), device=counts.device).repeat_interleave(flat)
    position = torch.arange(block.numel(), device=counts.device) - (torch.cumsum(flat, 0) - flat)[block]
    source, expert = block // local_experts, block % local_experts
    return expert, begin[expert, source] + position


def ll_recv_slots(recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where LL rows land on the receiver.

    Arguments:
        recv_counts: `[num_ranks, num_local_experts]` rows received from each source per expert,
            arriving grouped by source rank, then local expert.

    Returns:
        expert `[rows]` and slot `[rows]` (int64) of each received row in the expert-major output,
        and begin `[num_local_experts, num_ranks]`: first slot of each source within an expert.
    """
    begin = (torch.cumsum(recv_counts, dim=0) - recv_counts).t().contiguous()
    expert, slot = _slots(recv_counts, begin)
    return expert, slot, begin


def ll_recv_positions(recv_counts: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where LL rows land on the receiver, as flat rows of the `[num_local_experts * slots]` output.

    Arguments:
        recv_counts: int64 `[num_ranks, num_local_experts]` rows from each source per expert,
            arriving grouped by source rank, then local expert.

    Returns:
        positions `[rows]` int64 (``expert * slots + slot``), layout_range `[num_local_experts,
        num_ranks]` int64 (``begin << 32 | count``) and the rows per expert `[num_local_experts]` int32.
    """
    num_ranks, local = recv_counts.shape
    if recv_counts.is_cpu:
        from .engine import ll_place

        counts = recv_counts.to(torch.int64).contiguous()
        positions = torch.empty(int(counts.sum()), dtype=torch.int64)
        layout_range = torch.empty(local, num_ranks, dtype=torch.int64)
        per_expert = torch.empty(local, dtype=torch.int32)
        ll_place(counts.data_ptr(), num_ranks, local, slots, positions.data_ptr(), layout_range.data_ptr(),
                 per_expert.data_ptr())
        return positions, layout_range, per_expert
    expert, slot, begin = ll_recv_slots(recv_counts)
    count = recv_counts.t()
    return expert * slots + slot, (begin << 32) | count, count.sum(1).to(torch.int32)


def ll_combine_gather(layout_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows an LL combine sends back, ordered by (source rank, local expert, slot).

    Arguments:
        layout_range: `[num_local_experts, num_ranks]` int64 `(begin << 32) | count`.

    Returns expert `[rows]`, slot `[rows]` (int64) and rows per source rank `[num_ranks]`.
    """
    count = layout_range & 0xFFFFFFFF
    expert, slot = _slots(count.t(), layout_range >> 32)
    return expert, slot, count.sum(0)


# ----------------------------------------------------------------------------- row movement and reduction
def pack_rows(fmt: RowFormat, tensors: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``index`` (all when None) of each field of ``fmt`` as uint8 `[rows, fmt.row_bytes]`."""
    return fmt.pack(tensors, index)


def unpack_rows(fmt: RowFormat, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Byte rows back into `{field: [rows, width]}`."""
    return fmt.unpack(rows)


def scatter_rows(out: torch.Tensor, expert: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[expert, slot] = rows`` (received rows into an expert-major output)."""
    out[expert, slot] = rows


def reduce_rows(values: torch.Tensor, index: torch.Tensor, num_out: int,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `[num_out, width]` with ``out[index[i]] += values[i] (* weights[i])``, in increasing i."""
    values = values.float()
    if weights is not None:
        values = values * weights
    out = torch.zeros(num_out, values.size(1), dtype=torch.float32, device=values.device)
    return out.index_add_(0, index, values)


def finish_sum(acc: torch.Tensor, touched: torch.Tensor | None, out: torch.Tensor,
               biases: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``out = acc + sum(biases)`` in ``out``'s dtype, where ``acc`` is a float32 `[N, W]` sum whose
    rows with ``touched == 0`` were never written (they count as zeros) and rows with ``touched == 2``
    are final in ``out`` already (written by the engine; only without biases). ``acc`` is overwritten."""
    fast = acc.is_cpu and out.is_cpu and acc.is_contiguous() and out.is_contiguous() and out.dtype in _CAST_TYPES
    if fast and touched is not None and not biases and acc.dim() == 2 and touched.is_contiguous():
        from .engine import finish_rows

        finish_rows(out.data_ptr(), _CAST_TYPES[out.dtype], acc.data_ptr(), touched.data_ptr(), acc.size(0),
                    acc.size(1))
        return out
    if touched is not None and bool((touched == 2).any()):
        if biases:
            raise ValueError("finish_sum: rows already final cannot take a bias")
        rows = (touched == 1).nonzero().flatten()
        out[rows] = acc[rows].to(out.dtype)
        out[(touched == 0).nonzero().flatten()] = 0
        return out
    if touched is not None:
        untouched = (touched == 0).nonzero().flatten()
        if untouched.numel():
            acc[untouched] = 0
    for bias in biases:
        acc.add_(bias)
    if acc.is_cpu and out.is_cpu and acc.is_contiguous() and out.is_contiguous() and out.dtype in _CAST_TYPES:
        from .engine import cast_f32

        cast_f32(out.data_ptr(), _CAST_TYPES[out.dtype], acc.data_ptr(), acc.numel())
    else:
        out.copy_(acc)
    return out


class CpuKernels:
    """The torch implementation of :class:`~portep.native.interface.Kernels`.

    Written for the CPU; its ops also run on other torch devices, which is how a native
    implementation covers the kernels it does not replace.
    """

    name = "cpu"
    dispatch_layout = staticmethod(dispatch_layout)
    rows_by_column = staticmethod(rows_by_column)
    ht_recv_positions = staticmethod(ht_recv_positions)
    local_routing = staticmethod(local_routing)
    fp8_cast = staticmethod(fp8_cast)
    fp8_cast_back = staticmethod(fp8_cast_back)
    pack_ue8m0 = staticmethod(pack_ue8m0)
    unpack_ue8m0 = staticmethod(unpack_ue8m0)
    logfmt_encode = staticmethod(logfmt_encode)
    logfmt_decode = staticmethod(logfmt_decode)
    pack_rows = staticmethod(pack_rows)
    unpack_rows = staticmethod(unpack_rows)
    scatter_rows = staticmethod(scatter_rows)
    reduce_rows = staticmethod(reduce_rows)
    ll_send_order = staticmethod(ll_send_order)
    ll_recv_slots = staticmethod(ll_recv_slots)
    ll_recv_positions = staticmethod(ll_recv_positions)
    ll_combine_gather = staticmethod(ll_combine_gather)


CPU_KERNELS = CpuKernels()
