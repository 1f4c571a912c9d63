"""What one exchange moves, said once for every backend.

The algorithms (``portep.ht``, ``portep.ll``) describe an exchange as a :class:`Plan`: for every
peer of a scope, the rows to send — :class:`Gather` segments, each taking rows ``index`` of a few
column tensors — and, for every peer, where its rows go — a :class:`Receive` that scatters them
into rows of output tensors, or reduces them (float32, optional per-row weights) into
accumulators. A row travels as its columns back to back in a :class:`RowLayout` (each column in its
wire dtype, aligned to its element size).

The ring backend hands a plan to the compiled engine, which gathers straight from the column
tensors into the destination's window and scatters or reduces straight out of it. Backends that
move byte rows (collectives, device tensors on the ring backend) run the same plan with
:func:`pack_rows` and :func:`apply_rows`, the plain torch version of those two steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Scope = Literal["world", "node", "peers"]


@dataclass(frozen=True)
class WireColumn:
    """One column of a row on the wire: ``width`` elements of ``dtype``."""

    dtype: torch.dtype
    width: int

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


class RowLayout:
    """Columns back to back, each at an offset aligned to its element size; the row is padded to
    the largest element size, so that every column of every row is aligned."""

    def __init__(self, columns: Sequence[WireColumn]) -> None:
        self.columns = tuple(columns)
        offsets, at, align = [], 0, 1
        for column in self.columns:
            size = column.dtype.itemsize
            at = -(-at // size) * size
            offsets.append(at)
            at += column.nbytes
            align = max(align, size)
        self.offsets = tuple(offsets)
        self.row_bytes = -(-at // align) * align if at else 0

    def __repr__(self) -> str:
        return f"RowLayout({[(str(c.dtype), c.width) for c in self.columns]}, {self.row_bytes} bytes)"


def rows_of(tensor: torch.Tensor) -> int:
    """Rows of a column tensor: ``[N, width]``, ``[N]`` or ``[blocks, rows_per_block, width]``."""
    return tensor.size(0) * tensor.size(1) if tensor.dim() == 3 else tensor.size(0)


@dataclass(frozen=True)
class Gather:
    """Rows of a message taken from column tensors: row ``i`` is row ``index[i]`` (else
    ``first + i``) of every column, cast to the layout's wire dtype where they differ."""

    columns: Sequence[torch.Tensor]
    index: torch.Tensor | None = None  # int64 [rows]
    count: int = 0  # rows, when index is None
    first: int = 0

    @property
    def rows(self) -> int:
        return self.index.numel() if self.index is not None else self.count


@dataclass(frozen=True)
class Receive:
    """Where the rows from one peer go: row ``i`` to row ``index[i]`` (else ``first + i``) of every
    column (``None``: dropped). With ``reduce``, the columns are float32 accumulators and get
    ``weights[i] * row`` added instead; with ``touched`` (uint8, one per accumulator row, zero at
    first, shared by the receives of every peer) they need no zeroing: a row's first contribution
    is stored, later ones added, and its byte set. ``rows``: the exact number the peer must send."""

    columns: Sequence[torch.Tensor | None]
    index: torch.Tensor | None = None  # int64 [rows]
    first: int = 0
    reduce: bool = False
    weights: torch.Tensor | None = None  # float32 [rows]
    touched: torch.Tensor | None = None  # uint8 [accumulator rows]
    rows: int | None = None


@dataclass
class Plan:
    """One exchange among the ranks of ``scope``: ``sends[p]`` is the message to the scope's
    ``p``-th rank (an empty list sends no rows), ``counts[p]`` (int32 ``[k]``) travels in its
    header, and ``receives[p]`` (None: set after the headers arrived) says where ``p``'s rows go.

    ``exclude``: world ranks left out (masked): nothing is sent to them and nothing expected.
    ``drop_dead``: a rank that dies meanwhile is dropped (0 rows from it) instead of failing the
    exchange, as DeepEP's shrink mode does; backends that cannot tell a dead rank ignore it.
    """

    op: str
    scope: Scope
    layout: RowLayout
    sends: list[list[Gather]]
    counts: torch.Tensor | None = None
    receives: list[Receive | None] | None = None
    exclude: frozenset[int] = frozenset()
    drop_dead: bool = False
    num_counts: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_counts = 0 if self.counts is None else self.counts.size(1)


# ------------------------------------------------------------------------------- torch version
def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 3:
        return tensor[index // tensor.size(1), index % tensor.size(1)]
    return tensor[index] if tensor.dim() == 2 else tensor[index].unsqueeze(1)


def _rows(gather: Gather, device: torch.device) -> torch.Tensor:
    if gather.index is not None:
        return gather.index.to(device)
    return torch.arange(gather.first, gather.first + gather.count, device=device)


def pack_rows(gathers: Sequence[Gather], layout: RowLayout, device: torch.device) -> torch.Tensor:
    """The rows of ``gathers`` as uint8 ``[rows, layout.row_bytes]`` (the send side of a plan)."""
    total = sum(g.rows for g in gathers)
    out = torch.zeros(total, layout.row_bytes, dtype=torch.uint8, device=device)
    at = 0
    for gather in gathers:
        index = _rows(gather, device)
        for column, wire, offset in zip(gather.columns, layout.columns, layout.offsets, strict=True):
            values = _take(column, index).to(wire.dtype).reshape(index.numel(), wire.width)
            out[at : at + index.numel(), offset : offset + wire.nbytes] = values.view(torch.uint8)
        at += index.numel()
    return out


def apply_rows(rows: torch.Tensor, receive: Receive, layout: RowLayout) -> None:
    """Scatter or reduce uint8 ``rows`` (as :func:`pack_rows` made them) as ``receive`` says."""
    n = rows.size(0)
    index = receive.index if receive.index is not None else torch.arange(receive.first, receive.first + n)
    index = index.to(rows.device)
    for column, wire, offset in zip(receive.columns, layout.columns, layout.offsets, strict=True):
        if column is None or n == 0:
            continue
        values = rows[:, offset : offset + wire.nbytes].contiguous().view(wire.dtype)
        if receive.reduce:
            values = values.float()
            if receive.weights is not None:
                values = values * receive.weights.to(values.device).unsqueeze(1)
            if receive.touched is not None:
                column[index[receive.touched[index] == 0]] = 0
            column.index_add_(0, index, values)
        elif column.dim() == 3:
            column[index // column.size(1), index % column.size(1)] = values
        elif column.dim() == 1:
            column[index] = values.view(-1)
        else:
            column[index] = values
    if receive.reduce and receive.touched is not None and n:
        receive.touched[index] = 1
