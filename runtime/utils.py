"""DeepEP's ``deep_ep.utils`` module on portep: events and the connectivity check.

With the ``deep_ep`` shim, ``from deep_ep.utils import EventHandle, EventOverlap`` (as Megatron-core
does) resolves here. ``EventHandle`` and ``EventOverlap`` are portep's (:mod:`portep.event`): a real
device event on CUDA/HIP, an already-completed one on CPU.
"""

from __future__ import annotations

import torch.distributed as dist

from .config import Config
from .event import EventHandle, EventOverlap

__all__ = ["Config", "EventHandle", "EventOverlap", "check_nvlink_connections"]


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """DeepEP asserts here that the GPUs of ``group`` reach each other over NVLink.

    portep moves intra-node rows through shared host-memory windows (also when the tensors are
    on a GPU), so it needs no NVLink and every group passes. The argument is still checked, and
    nothing is communicated.

    Raises:
        TypeError: ``group`` is not a ``torch.distributed`` process group.
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"check_nvlink_connections: group must be a torch.distributed ProcessGroup, "
                        f"got {type(group).__name__}")
