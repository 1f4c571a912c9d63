"""Communication backends, chosen by name.

``ring`` (the default): the compiled engine — direct stores into peers' windows inside a node,
descriptors and the process's proxy thread driving a transport between nodes
(:mod:`portep.backends.ring`).
``collective``: torch.distributed all-to-all (gloo / NCCL / RCCL), the portable fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the backends themselves, not by the transports' processes
    import torch.distributed as dist

    from portep.topology import Topology

    from .base import CommBackend

BACKEND_ENV = "PORTEP_BACKEND"

Factory = Callable[["dist.ProcessGroup", "Topology", float], "CommBackend"]
# name -> factory, or "module:attribute" of one (imported when first created)
_REGISTRY: dict[str, Factory | str] = {
    "ring": "portep.backends.ring:RingBackend",
    "collective": "portep.backends.collective:CollectiveBackend",
}
DEFAULT_BACKEND = "ring"


def __getattr__(name: str) -> object:
    if name in ("CommBackend", "PendingRows", "Scope", "TrafficStats"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(name: str, factory: Factory | str) -> None:
    """Make a backend available under ``name`` (a factory, or ``"module:attribute"`` naming one)."""
    _REGISTRY[name] = factory


def available() -> list[str]:
    """Names of the registered backends."""
    return sorted(_REGISTRY)


def default_backend_name() -> str:
    """``PORTEP_BACKEND`` if set, else rings + proxy (``ring``)."""
    return os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND


def create(name: str, group: dist.ProcessGroup, topology: Topology, timeout_s: float) -> CommBackend:
    """Instantiate backend ``name`` for ``group`` (collective over the group)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown portep backend {name!r}; available: {available()}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        import importlib

        module, _, attribute = factory.partition(":")
        factory = _REGISTRY[name] = getattr(importlib.import_module(module), attribute)
    return factory(group, topology, timeout_s)


__all__ = ["BACKEND_ENV", "DEFAULT_BACKEND", "available", "create", "default_backend_name", "register"]
