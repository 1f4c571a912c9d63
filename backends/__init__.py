"""Communication backends, chosen by name.

``collective``: torch.distributed all-to-all (gloo / NCCL / RCCL), the portable fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.distributed as dist

from portep.topology import Topology

from .base import CommBackend, PendingExchange, Scope, TrafficStats

BACKEND_ENV = "PORTEP_BACKEND"

_REGISTRY: dict[str, Callable[[dist.ProcessGroup, Topology, float], CommBackend]] = {}


def register(name: str, factory: Callable[[dist.ProcessGroup, Topology, float], CommBackend]) -> None:
    """Make a backend available under ``name``."""
    _REGISTRY[name] = factory


def available() -> list[str]:
    """Names of the registered backends."""
    return sorted(_REGISTRY)


def default_backend_name() -> str:
    """``PORTEP_BACKEND`` if set, else the best backend for this machine."""
    return os.environ.get(BACKEND_ENV) or "collective"


def create(name: str, group: dist.ProcessGroup, topology: Topology, timeout_s: float) -> CommBackend:
    """Instantiate backend ``name`` for ``group`` (collective over the group)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown portep backend {name!r}; available: {available()}")
    return _REGISTRY[name](group, topology, timeout_s)


def _register_builtin() -> None:
    from .collective import CollectiveBackend

    register("collective", CollectiveBackend)


_register_builtin()

__all__ = ["BACKEND_ENV", "CommBackend", "PendingExchange", "Scope", "TrafficStats", "available", "create",
           "default_backend_name", "register"]
