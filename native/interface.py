"""The kernel interface: what dispatch and combine ask of a device.

The runtime (``runtime/ht.py``, ``runtime/ll.py``) calls kernels only through a :class:`Kernels`
object from :func:`portep.native.kernels_for`, so the same code path runs on the CPU (torch ops,
``native/cpu.py``) and on a GPU (CUDA/HIP kernels, ``native/cuda.py``). Implementations give the
same results: bit-exact for layouts, indices and row movement; for FP8 casts and float32
reductions the native kernels use the same operations in the same order, and tests hold them to
DeepEP's tolerances at least.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .cpu import RowFormat


@runtime_checkable
class Kernels(Protocol):
    """Device kernels of one implementation (all tensors on that implementation's device)."""

    name: str

    # ---------------------------------------------------------------- layout
    def dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Routing counts: per rank `[num_ranks]`, per node `[num_nodes]` (None with one node), per
        expert `[num_experts]` (int32), and `is_token_in_rank` `[num_tokens, num_ranks]` bool."""
        ...

    def rows_by_column(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of a `[rows, cols]` bool mask's set entries by (column, row), and the count per
        column (int64 `[cols]`): the send order of an HT dispatch hop."""
        ...

    def ht_recv_positions(self, node_recv: torch.Tensor) -> torch.Tensor:
        """Output row of every row of an HT node hop, ordered by (local rank, source node), from
        the rows per (local rank, source node) `[ranks_per_node, num_nodes]`."""
        ...

    def local_routing(self, topk_idx: torch.Tensor, topk_weights: torch.Tensor, first_expert: int,
                      local_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Received global expert ids to this rank's local ids (-1 elsewhere), their weights (0
        elsewhere) and the selections per local expert."""
        ...

    # ---------------------------------------------------------------- number formats
    def fp8_cast(self, x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`[N, hidden]` to (`[N, hidden]` float8_e4m3fn, `[N, hidden / 128]` float32 scales)."""
        ...

    def fp8_cast_back(self, x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Dequantise to float32 with float32 or packed-ue8m0 int32 scales."""
        ...

    def pack_ue8m0(self, scales: torch.Tensor) -> torch.Tensor:
        """Power-of-two float32 scales `[..., S]` to int32 `[..., S / 4]`."""
        ...

    def unpack_ue8m0(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack_ue8m0`."""
        ...

    def logfmt_encode(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, hidden]` to 10-bit log-format uint8 rows."""
        ...

    def logfmt_decode(self, data: torch.Tensor, hidden: int) -> torch.Tensor:
        """Inverse of :meth:`logfmt_encode`, float32 `[N, hidden]`."""
        ...

    # ---------------------------------------------------------------- row movement
    def pack_rows(
        self, fmt: RowFormat, tensors: dict[str, torch.Tensor], index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``index`` (all when None) of each field of ``fmt`` as uint8 `[rows, fmt.row_bytes]`
        (dispatch send)."""
        ...

    def unpack_rows(self, fmt: RowFormat, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Byte rows back into `{field: [rows, width]}` (dispatch receive)."""
        ...

    def scatter_rows(self, out: torch.Tensor, expert: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor) -> None:
        """``out[expert, slot] = rows``: received rows into the expert-major LL output."""
        ...

    def reduce_rows(
        self, values: torch.Tensor, index: torch.Tensor, num_out: int, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 `[num_out, width]`: ``out[index[i]] += values[i] (* weights[i])`` in increasing i
        (HT combine reduce; LL combine weighted reduce with ``weights`` `[rows, 1]` float32)."""
        ...

    # ---------------------------------------------------------------- LL index maps
    def ll_send_order(
        self, topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rank_masked: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token, k) selections an LL dispatch sends, by (dest rank, local expert, token), and the
        counts `[num_ranks, num_local_experts]`."""
        ...

    def ll_recv_slots(self, recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert and slot of each received LL row, and the first slot of each (expert, source)."""
        ...

    def ll_recv_positions(self, recv_counts: torch.Tensor, slots: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat expert-major row (``expert * slots + slot``) of each received LL row, the layout
        ranges `[num_local_experts, num_ranks]` and the rows per expert."""
        ...

    def ll_combine_gather(self, layout_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert and slot of each row an LL combine sends back, and the rows per source rank."""
        ...
