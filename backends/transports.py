"""Choosing a transport by name: a registry of factories, and an automatic choice from what the machine has.

``create_transport(name, rank, **opts)`` builds transport ``name`` (``None``: ``PORTEP_TRANSPORT`` if
set, else :func:`auto_transport_name`). Every factory is called as ``factory(rank, **opts)`` and
ignores ``world_size`` when it does not need it, so callers may always pass it.

Built in, highest priority first; each is chosen automatically only when its probe finds it usable:

* ``efa``: :class:`~portep.backends.verbs.EfaTransport`, when an AWS EFA device exists;
* ``verbs``: :class:`~portep.backends.verbs.VerbsTransport` (needs ``world_size``), when an IB / RoCE
  device exists;
* ``ucx``: :class:`~portep.backends.ucx.UcxTransport`, when ucxx imports (shared memory within a host,
  tcp across hosts);
* ``loopback``: :class:`~portep.backends.loopback.LoopbackTransport`, never automatic; pass
  ``fabric=LoopbackFabric()``.

Other transports join with :func:`register_transport` (a ``probe`` and a ``priority`` make them
candidates for the automatic choice).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portep.errors import TransportError

from .transport import Transport

TRANSPORT_ENV = "PORTEP_TRANSPORT"

TransportFactory = Callable[..., Transport]


@dataclass(frozen=True)
class _Entry:
    factory: TransportFactory
    probe: Callable[[], bool] | None
    priority: int


_REGISTRY: dict[str, _Entry] = {}


def register_transport(name: str, factory: TransportFactory, probe: Callable[[], bool] | None = None,
                       priority: int = 0) -> None:
    """Make ``factory(rank, **opts)`` available as transport ``name`` (replacing any earlier one).

    With a ``probe`` (True when the transport can work on this machine), :func:`auto_transport_name`
    considers it, preferring higher ``priority``.
    """
    _REGISTRY[name] = _Entry(factory, probe, priority)


def available_transports() -> list[str]:
    """Names of the registered transports."""
    return sorted(_REGISTRY)


def usable_transports() -> list[str]:
    """Registered transports whose probe says they work here, best first."""
    candidates = sorted(((entry.priority, name) for name, entry in _REGISTRY.items() if entry.probe), reverse=True)
    return [name for _, name in candidates if _probe(name)]


def _probe(name: str) -> bool:
    try:
        return bool(_REGISTRY[name].probe())  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - a failing probe means "not here"
        return False


def auto_transport_name() -> str:
    """``PORTEP_TRANSPORT`` if set, else the best usable transport (efa > verbs > ucx > registered others)."""
    forced = os.environ.get(TRANSPORT_ENV)
    if forced:
        return forced
    usable = usable_transports()
    if not usable:
        raise TransportError("transport selection", f"no usable transport on this machine (registered: "
                                                    f"{available_transports()}); set {TRANSPORT_ENV}")
    return usable[0]


def create_transport(name: str | None, rank: int, **opts: Any) -> Transport:
    """Build transport ``name`` (``None``: :func:`auto_transport_name`) for ``rank``."""
    name = name or auto_transport_name()
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown portep transport {name!r}; registered: {available_transports()}")
    return entry.factory(rank, **opts)


# ---------------------------------------------------------------- built-in transports
@functools.cache
def _has_efa() -> bool:
    from .verbs import efa_devices

    return bool(efa_devices())


@functools.cache
def _has_rdma() -> bool:
    from .verbs import efa_devices, rdma_devices

    devices = rdma_devices()
    return bool(devices) and set(devices) != set(efa_devices())


@functools.cache
def _has_ucx() -> bool:
    from .ucx import ucx_available

    return ucx_available()


def _ucx(rank: int, world_size: int | None = None, window: Any = None, **opts: Any) -> Transport:
    from .ucx import UcxTransport

    return UcxTransport(rank, **opts)


def _verbs(rank: int, world_size: int | None = None, window: Any = None, **opts: Any) -> Transport:
    from .verbs import VerbsTransport

    if world_size is None:
        raise ValueError("verbs: pass world_size (RC needs one queue pair per peer)")
    return VerbsTransport(rank, world_size, **opts)


def _efa(rank: int, world_size: int | None = None, window: Any = None, **opts: Any) -> Transport:
    from .verbs import EfaTransport

    return EfaTransport(rank, **opts)


def _loopback(rank: int, world_size: int | None = None, fabric: Any = None, **opts: Any) -> Transport:
    if fabric is None:
        raise ValueError("loopback joins endpoints of one process: pass fabric=LoopbackFabric()")
    return fabric.endpoint(rank, **opts)


register_transport("efa", _efa, _has_efa, priority=40)
register_transport("verbs", _verbs, _has_rdma, priority=30)
register_transport("ucx", _ucx, _has_ucx, priority=20)
register_transport("loopback", _loopback)


def _shm(rank: int, world_size: int | None = None, window: Any = None, **opts: Any) -> Transport:
    from .shm import ShmTransport

    if window is None:
        raise ValueError("shm: pass window= (the rank's shared-memory window)")
    return ShmTransport(rank, window)


def _socket(rank: int, world_size: int | None = None, window: Any = None, timeout_s: float = 100.0,
            **opts: Any) -> Transport:
    from .socket import UnixSocketTransport

    return UnixSocketTransport(rank, timeout_s=timeout_s)


# Same-host only: chosen automatically when nothing above is usable (virtual nodes on one machine).
register_transport("shm", _shm, lambda: True, priority=10)
register_transport("socket", _socket, lambda: True, priority=5)
