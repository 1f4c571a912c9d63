"""The names of DeepEP's compiled module ``deep_ep_cpp``, on portep.

Frameworks import a few names from it directly (``from deep_ep_cpp import Config, EventHandle``);
with the ``deep_ep`` shim they resolve here. DeepEP's low-level ``deep_ep_cpp.Buffer`` (the C++
runtime behind ``deep_ep.Buffer``) has no counterpart: use ``deep_ep.Buffer``.
"""

from __future__ import annotations

import torch

from .config import Config
from .event import EventHandle
from .ll_layout import low_latency_rdma_size_hint

__all__ = ["Config", "EventHandle", "get_low_latency_rdma_size_hint", "is_sm90_compiled", "topk_idx_t"]

topk_idx_t: torch.dtype = torch.int64
"""dtype of expert ids (``topk_idx``)."""


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                   num_experts: int) -> int:
    """Bytes of ``num_rdma_bytes`` a low-latency Buffer needs (``Buffer.get_low_latency_rdma_size_hint``)."""
    return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)


def is_sm90_compiled() -> bool:
    """True: portep has the SM90 feature set (FP8 casts, UE8M0 scales) on every device."""
    return True
