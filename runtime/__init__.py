"""portep: portable expert-parallel dispatch/combine with DeepEP's Python API.

``import portep as deep_ep`` (or install the ``deep_ep`` shim) and DeepEP callers run unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CommTimeoutError, PeerFailureError, PortepError, TransportError

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from .buffer import Buffer
    from .config import Config
    from .event import EventHandle, EventOverlap

    topk_idx_t: torch.dtype

# Imported on first use, so that processes that need only part of portep (the proxy, which never
# touches torch) start fast.
_LAZY = {"Buffer": ".buffer", "Config": ".config", "EventHandle": ".event", "EventOverlap": ".event"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name == "topk_idx_t":  # dtype of expert ids (``topk_idx``), as in DeepEP
        import torch

        value = torch.int64
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value

__all__ = [
    "Buffer",
    "CommTimeoutError",
    "Config",
    "EventHandle",
    "EventOverlap",
    "PeerFailureError",
    "PortepError",
    "TransportError",
    "__version__",
    "install_deep_ep_alias",
    "topk_idx_t",
]


# DeepEP's module layout and the portep modules behind it: ``import deep_ep.utils`` and the others
# must find these (not load a second copy of a portep module under a ``deep_ep`` name).
_DEEP_EP_MODULES = {
    "deep_ep": "portep",
    "deep_ep.buffer": "portep.buffer",
    "deep_ep.utils": "portep.utils",
    "deep_ep_cpp": "portep.deep_ep_cpp",
}


def install_deep_ep_alias() -> None:
    """Make ``deep_ep`` (with ``deep_ep.buffer`` and ``deep_ep.utils``) and ``deep_ep_cpp`` resolve
    to portep in this process (the in-process form of the shim).

    Does nothing if another ``deep_ep`` (the real DeepEP) is already imported.
    """
    import importlib
    import sys

    if sys.modules.setdefault("deep_ep", sys.modules[__name__]) is not sys.modules[__name__]:
        return
    for alias, target in _DEEP_EP_MODULES.items():
        sys.modules[alias] = importlib.import_module(target)
