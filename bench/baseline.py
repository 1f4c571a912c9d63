"""The baseline a user would write without portep: ``torch.distributed.all_to_all_single`` routing.

Dispatch: each token goes once to every rank holding one of its experts, as one byte row
``[x (FP8 or BF16 bytes) | FP8 scales | topk_idx int32 | topk_weights float32]``; counts are exchanged
first, then the rows. Combine: the expert outputs go back along the same splits and are summed into
the tokens with ``index_add_``. Flat (no node hierarchy), no overlap, no preallocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .workload import FP8_GROUP, tokens_per_rank


@dataclass
class BaselineHandle:
    """What the combine needs: the token of every sent row and the splits of both directions."""

    token: torch.Tensor  # int64 [rows sent], the source token of each sent row
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


@dataclass
class BaselineRecv:
    """Received rows, unpacked as views of one byte buffer."""

    x: torch.Tensor  # fp8 or bf16 [M, hidden]
    scales: torch.Tensor | None  # float32 [M, hidden/128]
    topk_idx: torch.Tensor  # int32 [M, topk], global expert ids
    topk_weights: torch.Tensor  # float32 [M, topk]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).view(t.size(0), -1)


def pack_rows(x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], topk_idx: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, row_bytes]``: every token's payload and routing in one row."""
    parts = [_bytes(x[0]), _bytes(x[1])] if isinstance(x, tuple) else [_bytes(x)]
    parts += [_bytes(topk_idx.to(torch.int32)), _bytes(topk_weights.float())]
    return torch.cat(parts, dim=1)


def unpack_rows(rows: torch.Tensor, hidden: int, topk: int, fp8: bool) -> BaselineRecv:
    """Views of received rows (see :func:`pack_rows`)."""
    x_bytes = hidden if fp8 else 2 * hidden
    scale_bytes = hidden // FP8_GROUP * 4 if fp8 else 0
    at = 0

    def take(width: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal at
        view = rows[:, at : at + width].contiguous().view(dtype)
        at += width
        return view

    x = take(x_bytes, torch.float8_e4m3fn if fp8 else torch.bfloat16)
    scales = take(scale_bytes, torch.float32) if fp8 else None
    return BaselineRecv(x, scales, take(4 * topk, torch.int32), take(4 * topk, torch.float32))


def dispatch(rows: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
             group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, BaselineHandle]:
    """Send each row to every rank that holds one of its experts; returns received rows, grouped by source."""
    num_ranks = dist.get_world_size(group)
    in_rank = tokens_per_rank(topk_idx, num_experts, num_ranks)
    rank, token = in_rank.t().nonzero(as_tuple=True)  # sorted by destination rank, then token
    send_counts = torch.bincount(rank, minlength=num_ranks)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    out = rows.new_empty(sum(recv), rows.size(1))
    dist.all_to_all_single(out, rows[token], recv, send, group=group)
    return out, BaselineHandle(token, send, recv, topk_idx.size(0))


def combine(y: torch.Tensor, handle: BaselineHandle, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Return rows ``y`` (``[M, hidden]``, as received) to their tokens and sum them (float32, then y's dtype)."""
    back = y.new_empty(sum(handle.send_counts), y.size(1))
    dist.all_to_all_single(back, y.contiguous(), handle.send_counts, handle.recv_counts, group=group)
    out = torch.zeros(handle.num_tokens, y.size(1), dtype=torch.float32)
    out.index_add_(0, handle.token, back.float())
    return out.to(y.dtype)
