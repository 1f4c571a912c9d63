"""The control plane: rendezvous, heartbeats, failure notices and live stats over gRPC.

* :mod:`.codec` — the wire format (JSON header + raw blobs) and protocol constants;
* :mod:`.server` — :class:`ControlServer`, one per job (rendezvous, rank health, stats);
* :mod:`.client` — :class:`ControlClient`, one per rank, and :func:`fetch_stats`;
* :mod:`.jobs` — job files of running servers and the ``portep status`` table.
"""

from .client import (
    CLOSE_TIMEOUT_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    RPC_TIMEOUT_S,
    STREAM_LIFETIME_S,
    ControlClient,
    fetch_stats,
)
from .codec import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    HEARTBEAT_TIMEOUT_ENV,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVICE,
    Message,
    decode,
    default_heartbeat_timeout_s,
    encode,
    stats_from_wire,
)
from .jobs import JOB_ENV, RUN_DIR_ENV, format_stats, list_jobs, run_dir
from .server import CONNECTION_GRACE_S, ControlServer

__all__ = [
    "CLOSE_TIMEOUT_S",
    "CONNECTION_GRACE_S",
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "HEARTBEAT_TIMEOUT_ENV",
    "JOB_ENV",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "RPC_TIMEOUT_S",
    "RUN_DIR_ENV",
    "SERVICE",
    "STREAM_LIFETIME_S",
    "ControlClient",
    "ControlServer",
    "Message",
    "decode",
    "default_heartbeat_timeout_s",
    "encode",
    "fetch_stats",
    "format_stats",
    "list_jobs",
    "run_dir",
    "stats_from_wire",
]
