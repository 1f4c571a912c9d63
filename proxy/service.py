"""The proxies of this process: one compiled proxy thread per transport (per NIC; on a CPU host, per
rank process), shared by every Buffer of the process.

A Buffer adds an endpoint (its descriptor ring and its window) to the proxy; the proxy thread lives
until the process exits. Which transport a Buffer's proxy uses:

* ``PORTEP_FAULTS`` set: ``fabric``, the software fabric that injects the faults (tests);
* ``PORTEP_TRANSPORT`` set: that one (``shm``, ``ucx``, ``verbs``, ``efa``, ``fabric``);
* otherwise ``shm`` when every rank of the job is on this host (virtual nodes included), else the
  best network transport this machine has: ``efa`` > ``verbs`` > ``ucx``.
"""

from __future__ import annotations

import atexit
import functools
import os
import socket

from portep.errors import TransportError
from portep.native import engine

TRANSPORT_ENV = "PORTEP_TRANSPORT"
FAULTS_ENV = "PORTEP_FAULTS"
NETWORK_TRANSPORTS = ("efa", "verbs", "ucx")
ALL_TRANSPORTS = ("shm", "fabric", *NETWORK_TRANSPORTS)
STOP_DRAIN_S = 2.0  # at exit, how long a proxy may post what its rings still hold

_PROXIES: dict[tuple[str, str], engine.Proxy] = {}


def faults() -> str:
    """The fault injection asked for (``PORTEP_FAULTS``), or ""."""
    return os.environ.get(FAULTS_ENV, "")


@functools.cache
def _probe(name: str) -> str | None:
    """None when transport ``name`` can work on this machine, else why not."""
    try:
        if name in ("efa", "verbs"):
            return engine.verbs_probe(efa=name == "efa")
        engine.transport_ops(name)
    except (engine.EngineError, ImportError, OSError) as exc:
        return str(exc)
    return None


def usable_transports() -> dict[str, str | None]:
    """Every transport, with None where it works here or the reason it does not."""
    return {name: _probe(name) for name in ALL_TRANSPORTS}


def choose_transport(hosts: list[str]) -> str:
    """The transport for a group whose ranks run on ``hosts`` (see the module docstring)."""
    forced = os.environ.get(TRANSPORT_ENV)
    if faults():
        if forced not in (None, "", "fabric"):
            raise ValueError(f"{FAULTS_ENV} needs {TRANSPORT_ENV}=fabric (the software fabric injects the faults), "
                             f"got {forced!r}")
        return "fabric"
    if forced:
        if forced not in ALL_TRANSPORTS:
            raise ValueError(f"{TRANSPORT_ENV}={forced!r}: expected one of {', '.join(ALL_TRANSPORTS)}")
        return forced
    if len(set(hosts)) == 1:
        return "shm"
    for name in NETWORK_TRANSPORTS:
        if _probe(name) is None:
            return name
    reasons = "; ".join(f"{name}: {_probe(name)}" for name in NETWORK_TRANSPORTS)
    raise TransportError("transport selection", f"the job spans hosts and no network transport works here ({reasons})")


def host_name() -> str:
    return socket.gethostname()


def proxy_for(transport: str, rank: int, world_size: int) -> engine.Proxy:
    """This process's proxy for ``transport`` (started on first use). ``rank``/``world_size``: this
    process's rank and the job's size (transports that connect per rank need them)."""
    options = ",".join(filter(None, (f"rank={rank},world={world_size}", faults() if transport == "fabric" else "")))
    key = (transport, options)
    if key not in _PROXIES:
        try:
            _PROXIES[key] = engine.Proxy(transport, options)
        except engine.EngineError as exc:
            raise TransportError("proxy start-up", str(exc)) from exc
        if len(_PROXIES) == 1:
            atexit.register(stop_proxies)
    return _PROXIES[key]


def proxies() -> list[engine.Proxy]:
    """The proxies running in this process."""
    return list(_PROXIES.values())


def stop_proxies() -> None:
    """Stop every proxy of this process (at exit), letting each post what its rings still hold."""
    while _PROXIES:
        _, proxy = _PROXIES.popitem()
        proxy.destroy(STOP_DRAIN_S)
