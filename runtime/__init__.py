"""portep: portable expert-parallel dispatch/combine with DeepEP's Python API.

``import portep as deep_ep`` (or install the ``deep_ep`` shim) and DeepEP callers run unchanged.
"""

from __future__ import annotations

import torch

from .buffer import Buffer
from .config import Config
from .errors import CommTimeoutError, PeerFailureError, PortepError, TransportError
from .event import EventOverlap

__version__ = "0.1.0"

#: dtype of expert ids (``topk_idx``), as in DeepEP.
topk_idx_t = torch.int64

__all__ = [
    "Buffer",
    "CommTimeoutError",
    "Config",
    "EventOverlap",
    "PeerFailureError",
    "PortepError",
    "TransportError",
    "__version__",
    "install_deep_ep_alias",
    "topk_idx_t",
]


def install_deep_ep_alias() -> None:
    """Make ``import deep_ep`` return portep in this process (the in-process form of the shim)."""
    import sys

    sys.modules.setdefault("deep_ep", sys.modules[__name__])
