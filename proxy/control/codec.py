"""The control plane's wire format and protocol constants.

Calls use gRPC *generic method handlers* with explicit serializers, not a ``.proto`` with generated
code. Every message is ``<u32 little-endian header length><JSON header><raw blobs>``, the header
listing the blob sizes, so rendezvous values travel as raw bytes (no base64) and the header stays
readable. The reasons: the messages are a handful of small, Python-only control messages; there is no
codegen step nor generated files to keep in sync, and no coupling between protobuf's generated code
and runtime versions (protobuf 7 gencode refuses other runtime majors), so the only dependency is
``grpcio``. The header carries ``v`` (:data:`PROTOCOL_VERSION`); a mismatch is refused, not
misread. The service name is versioned too (``portep.control.v1.Control``).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from typing import Any

from portep.deadlines import number_from_env

PROTOCOL_VERSION = 1
SERVICE = "portep.control.v1.Control"
HEARTBEAT_TIMEOUT_ENV = "PORTEP_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 64 << 20

Message = tuple[dict[str, Any], list[bytes]]

_HEADER_LEN = struct.Struct("<I")


def default_heartbeat_timeout_s() -> float:
    """Seconds of heartbeat silence before a rank is declared dead: ``PORTEP_HEARTBEAT_TIMEOUT_S`` or 5 s."""
    return number_from_env(HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT_S)


def _json_default(value: Any) -> Any:
    """JSON form of values ``json`` does not know: dataclasses, numpy/torch scalars, sets and tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def encode(message: Message) -> bytes:
    """``(header, blobs)`` -> ``<u32 header length><JSON header><blobs>``."""
    header, blobs = message
    head = json.dumps({**header, "blobs": [len(blob) for blob in blobs]}, separators=(",", ":"),
                      default=_json_default).encode()
    return b"".join((_HEADER_LEN.pack(len(head)), head, *blobs))


def decode(data: bytes) -> Message:
    """Inverse of :func:`encode`."""
    (length,) = _HEADER_LEN.unpack_from(data)
    end = _HEADER_LEN.size + length
    header = json.loads(data[_HEADER_LEN.size:end])
    blobs = []
    for size in header.pop("blobs", ()):
        blobs.append(bytes(data[end:end + size]))
        end += size
    if end != len(data):
        raise ValueError(f"control message: {len(data) - end} trailing bytes")
    return header, blobs


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def jsonable_stats(stats: Any) -> dict[str, Any]:
    """One proxy's stats (a mapping or a dataclass instance) as a plain JSON object."""
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        stats = dataclasses.asdict(stats)
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping or a dataclass instance, got {type(stats).__name__}")
    return json.loads(json.dumps(dict(stats), default=_json_default))


def stats_from_wire(header: Mapping[str, Any]) -> dict[str, Any]:
    """The ``get_stats`` dict from a GetStats reply header (JSON keys turned back into ints)."""
    proxies: dict[int, dict[int, dict[str, Any]]] = {}
    for rank, proxy, age, stats in header["proxies"]:
        proxies.setdefault(rank, {})[proxy] = {"age_s": age, "stats": stats}
    return {
        "world_size": header["world_size"],
        "uptime_s": header["uptime_s"],
        "heartbeat_timeout_s": header["heartbeat_timeout_s"],
        "ranks": {rank: {"state": state, "heartbeat_age_s": age} for rank, state, age in header["ranks"]},
        "proxies": proxies,
        "dead": {rank: how for rank, how in header["dead"]},
    }
