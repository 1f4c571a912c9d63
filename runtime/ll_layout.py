"""Byte layout of the low-latency buffer: two symmetric halves used alternately.

Each LL call (dispatch or combine) uses one half and flips to the other, so the result of one
call stays valid while the next runs (double buffering). A half holds a send region, a receive
region and a signal region. Message sizes and therefore
:func:`low_latency_rdma_size_hint` match DeepEP's, so buffers sized for DeepEP fit portep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import BUFFER_ALIGNMENT_BYTES, align_up

FP8_GROUP = 128  # channels per FP8 scale
CONTROL_BYTES = 16  # per-message header (source token index and flags)


@dataclass(frozen=True)
class LowLatencyLayout:
    """Offsets of the regions of one LL buffer for the given problem size."""

    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_ranks: int
    num_experts: int

    @property
    def num_scales(self) -> int:
        return self.hidden // FP8_GROUP

    @property
    def dispatch_msg_bytes(self) -> int:
        """Header + the larger of a BF16 row and an FP8 row with its float32 scales."""
        return CONTROL_BYTES + max(self.hidden * 2, self.hidden + self.num_scales * 4)

    @property
    def combine_msg_bytes(self) -> int:
        """A BF16 row plus room for per-128-channel (min, max) pairs of compressed formats."""
        return self.num_scales * 4 + self.hidden * 2

    @property
    def send_bytes(self) -> int:
        tokens = self.num_max_dispatch_tokens_per_rank
        return max(tokens * self.dispatch_msg_bytes, self.num_experts * tokens * self.combine_msg_bytes)

    @property
    def recv_bytes(self) -> int:
        slots = self.num_experts * self.num_max_dispatch_tokens_per_rank
        return max(slots * self.dispatch_msg_bytes, slots * self.combine_msg_bytes)

    @property
    def signal_bytes(self) -> int:
        return align_up(self.num_experts * 4, BUFFER_ALIGNMENT_BYTES)

    @property
    def half_bytes(self) -> int:
        return self.send_bytes + self.recv_bytes + self.signal_bytes

    @property
    def total_bytes(self) -> int:
        return 2 * self.half_bytes

    def send_offset(self, half: int) -> int:
        """Byte offset of the send region of buffer half ``half`` (0 or 1)."""
        return half * self.send_bytes

    def combine_send_view(self, buffer: torch.Tensor, half: int) -> torch.Tensor:
        """BF16 view ``[num_local_experts, num_ranks * T, hidden]`` of a half's combine send region.

        Rows are ``combine_msg_bytes`` apart, as DeepEP's zero-copy combine buffer.
        """
        local_experts = self.num_experts // self.num_ranks
        slots = self.num_ranks * self.num_max_dispatch_tokens_per_rank
        row_elems = self.combine_msg_bytes // 2
        start = self.send_offset(half)
        region = buffer[start : start + self.send_bytes].view(torch.bfloat16)
        return region.as_strided((local_experts, slots, self.hidden), (slots * row_elems, row_elems, 1))


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of registered buffer an LL-mode :class:`~portep.Buffer` needs for this problem size."""
    layout = LowLatencyLayout(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
    return (layout.total_bytes + BUFFER_ALIGNMENT_BYTES) // BUFFER_ALIGNMENT_BYTES * BUFFER_ALIGNMENT_BYTES
