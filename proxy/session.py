"""The control-plane session of a process group: one gRPC server and one client per rank.

The group's rank 0 hosts the :class:`~portep.proxy.control.ControlServer` in a background thread;
every rank connects a :class:`~portep.proxy.control.ControlClient` and sends heartbeats, with the
stats of its proxies riding on them (``portep status`` reads them). A session lives as long as
the process and is shared by every ring-backend Buffer on that group: Buffers rendezvous through
it under their own key prefix, and a rank that dies is named by every other rank's pending wait.

Failures of one operation (a rank that called with other shapes, a dead proxy) are published
under the Buffer's prefix rather than declared deaths, so the processes can go on and create a
new Buffer.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import socket
from collections.abc import Collection
from dataclasses import dataclass, field

import torch.distributed as dist

from portep.errors import PeerFailureError, PortepError

from .control import ControlClient, ControlServer

CONTROL_HOST_ENV = "PORTEP_CONTROL_HOST"


def _server_host(group: dist.ProcessGroup) -> str:
    """Where rank 0's server listens: ``PORTEP_CONTROL_HOST``, loopback when the whole group is on
    this host, else this host's address."""
    forced = os.environ.get(CONTROL_HOST_ENV)
    if forced:
        return forced
    hosts: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) == 1:
        return "127.0.0.1"
    return _reachable_address()


def _reachable_address() -> str:
    """This host's address as other hosts reach it: the one it resolves its own name to, unless
    that is a loopback address (Debian maps the host name to 127.0.1.1), then the source address of
    the route towards the job's master (``MASTER_ADDR``, as torchrun sets it)."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    if not address.startswith("127."):
        return address
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))  # no packet is sent
                routed = probe.getsockname()[0]
            if not routed.startswith("127."):
                return routed
        except OSError:
            pass
    raise PortepError(f"the control plane: this host's name resolves to {address} (loopback) and no route to "
                      f"MASTER_ADDR={master!r} gives another address; set {CONTROL_HOST_ENV} to an address the "
                      f"other hosts can reach")


@dataclass
class ControlSession:
    """This process's membership in its group's control plane."""

    rank: int
    world_size: int
    client: ControlClient
    server: ControlServer | None = None
    _prefixes: itertools.count = field(default_factory=itertools.count)
    _proxy_ids: itertools.count = field(default_factory=itertools.count)

    def new_prefix(self) -> str:
        """A key prefix for one Buffer (the same on every rank: Buffers are created collectively)."""
        return f"buffer{next(self._prefixes)}"

    def new_proxy_id(self) -> int:
        return next(self._proxy_ids)

    def publish_failure(self, prefix: str, op: str, detail: str, culprits: Collection[int] = ()) -> None:
        """Tell the Buffer's peers that this rank gave up on ``op`` (first failure wins), because of
        ``culprits`` (e.g. a peer it lost its link to) or, when there are none, of its own."""
        key = f"{prefix}/failed"
        if self.client.try_get(key) is None:
            self.client.put(key, json.dumps({"rank": self.rank, "op": op, "detail": detail,
                                             "culprits": sorted(culprits)}).encode())

    def check_failure_notice(self, prefix: str, op: str, ignored: Collection[int]) -> None:
        """Raise :class:`PeerFailureError` if a rank not in ``ignored`` gave up on the Buffer
        ``prefix`` (one RPC; dead ranks are found by :meth:`ControlClient.dead_ranks`)."""
        try:
            failed = self.client.try_get(f"{prefix}/failed")
        except PortepError:
            return  # the server is unreachable: heartbeats will name its host
        if failed is not None:
            info = json.loads(failed)
            ranks = [r for r in info.get("culprits", ()) if r not in ignored]
            if not ranks and info["rank"] not in ignored:
                ranks = [info["rank"]]
            if ranks:
                detail = f"rank {info['rank']} gave up in {info['op']}: {info['detail']}"
                raise PeerFailureError(op, ranks, detail=detail)

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()


_SESSIONS: dict[tuple[int, ...], ControlSession] = {}


def session_for(group: dist.ProcessGroup) -> ControlSession:
    """The session of ``group`` (collective the first time: every rank of the group must call it)."""
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks in _SESSIONS:
        return _SESSIONS[ranks]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    host = _server_host(group)
    server = ControlServer(world, host=host).start() if rank == 0 else None
    address = [server.address if server else None]
    dist.broadcast_object_list(address, group_src=0, group=group)
    client = ControlClient(address[0], rank, world)
    client.start_heartbeats()
    session = ControlSession(rank, world, client, server)
    _SESSIONS[ranks] = session
    if len(_SESSIONS) == 1:
        atexit.register(close_sessions)
    return session


def close_sessions() -> None:
    """Leave every session cleanly (at exit: a clean leave is not a death)."""
    while _SESSIONS:
        _, session = _SESSIONS.popitem()
        session.close()
