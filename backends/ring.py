"""The ring backend: portep's own data path (DESIGN: the control/data-plane split).

Each rank owns a shared-memory window (:mod:`portep.proxy.window`), a descriptor ring and a proxy
process that drives a transport. Rows move as credit-based streams (:mod:`portep.proxy.streams`):

* to a rank on the same node, the rank copies straight into the peer's window (what NVLink /
  xGMI stores do on a GPU);
* to a rank on another node, it stages the bytes in its own window and writes PUT_SIGNAL
  descriptors into its ring; its proxy posts them on the transport, and the receiving proxy
  applies the signal once every byte landed.

The transport between nodes is chosen from what the machine has (``PORTEP_TRANSPORT`` forces one).
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from portep.deadlines import number_from_env
from portep.errors import PeerFailureError, PortepError
from portep.proxy.process import ProxyProcess
from portep.proxy.ring import DescriptorRing
from portep.proxy.session import session_for
from portep.proxy.streams import Channel, DirectChannel, ProxyChannel, StreamEngine, StreamExchange, StreamLayout
from portep.proxy.window import Window
from portep.topology import Topology

from .base import CommBackend, PendingExchange, Scope
from .transports import auto_transport_name

CHUNK_ENV = "PORTEP_CHUNK_BYTES"
DEFAULT_CHUNK_BYTES = 1 << 20
RING_CAPACITY = 4096
FAILURE_POLL_S = 0.25  # how often a waiting rank asks the control plane whether a peer gave up
CLOSE_DRAIN_S = 10.0  # the longest close() waits for peers to consume this rank's last messages

T = TypeVar("T")


def chunk_bytes_from_env() -> int:
    return int(number_from_env(CHUNK_ENV, DEFAULT_CHUNK_BYTES, kind=int, minimum=4096, unit="bytes"))


class _RingPending(PendingExchange):
    def __init__(self, backend: RingBackend, exchange: StreamExchange, keep: list[int], scope_size: int,
                 device: torch.device) -> None:
        self.backend, self.exchange = backend, exchange
        self.keep, self.scope_size, self.device = keep, scope_size, device
        self.rows: torch.Tensor | None = None

    @property
    def recv_counts(self) -> list[int | None]:  # type: ignore[override]
        """Rows from each rank of the scope (0 from excluded ranks; None until known)."""
        counts: list[int | None] = [0] * self.scope_size
        for i, count in zip(self.keep, self.exchange.recv_counts, strict=True):
            counts[i] = count
        return counts

    def wait(self) -> torch.Tensor:
        if self.rows is None:
            rows = self.backend.guarded(self.exchange.op, lambda: self.backend.engine.wait(self.exchange))
            # torch keeps numpy's strides, which are arbitrary for an empty array
            self.rows = torch.from_numpy(rows) if rows.size else torch.empty(rows.shape, dtype=torch.uint8)
            self.rows = self.rows.to(self.device)  # device rows were staged through host windows
        return self.rows

    @property
    def dropped(self) -> frozenset[int]:
        return frozenset(self.exchange.dropped)


def _release(proxy: ProxyProcess | None, windows: list[Window], ring: DescriptorRing) -> None:
    if proxy is not None:
        proxy.stop()
    for window in windows:
        window.close()
    ring.close()


class RingBackend(CommBackend):
    """Rows move through windows, rings and proxies; see the module docstring."""

    name = "ring"

    def __init__(self, group: dist.ProcessGroup, topology: Topology, timeout_s: float) -> None:
        super().__init__(topology)
        self.group, self.timeout_s = group, timeout_s
        self.failed: str | None = None
        self.session = session_for(group)
        self.prefix = self.session.new_prefix()
        self._last_failure_poll = 0.0
        rank, world = topology.rank, topology.num_ranks
        self.layout = layout = StreamLayout(world, chunk_bytes_from_env())
        self.window = Window.create(layout.num_signals, layout.data_bytes, tag=f"r{rank}-")
        self.ring = DescriptorRing.create(RING_CAPACITY)
        remote = [p for p in range(world) if topology.node_of(p) != topology.node]
        windows = [self.window]  # this rank's, then the same-node peers' it maps
        try:
            self.proxy = (ProxyProcess(rank, world, self.window, [self.ring], auto_transport_name(), timeout_s)
                          if remote else None)
        except BaseException:
            _release(None, windows, self.ring)
            raise
        self._finalizer = weakref.finalize(self, _release, self.proxy, windows, self.ring)

        # Rendezvous on the control plane: every rank learns its peers' windows and proxy addresses.
        mine = {"window": self.window.name,
                "proxy": self.proxy.address.hex() if self.proxy else None}
        client = self.session.client
        infos = [json.loads(blob) for blob in client.allgather(f"{self.prefix}/endpoints", json.dumps(mine).encode(),
                                                               timeout_s)]
        queue: list = []
        channels: dict[int, Channel] = {}
        for peer in range(world):
            if peer == rank:
                continue
            if peer in remote:
                channels[peer] = ProxyChannel(rank, peer, layout, self.window, queue)
            else:
                peer_window = Window.attach(infos[peer]["window"], layout.num_signals, layout.data_bytes)
                windows.append(peer_window)
                channels[peer] = DirectChannel(rank, peer, layout, peer_window)
        if self.proxy is not None:
            self.proxy.connect({p: bytes.fromhex(infos[p]["proxy"]) for p in remote})
        self.engine = StreamEngine(rank, self.window, layout, channels, self.ring, queue, timeout_s,
                                   check_alive=self._check_alive, diagnose=self._diagnose,
                                   wake=self.proxy.wake if self.proxy is not None else None)
        if self.proxy is not None:
            this = weakref.ref(self)  # the stats source must not keep the backend alive
            client.watch_stats(self.session.new_proxy_id(), lambda: this()._status() if this() else {})
        client.barrier(f"{self.prefix}/ready", timeout_s)  # every proxy is serving before any data moves

    # ------------------------------------------------------------------ moving rows
    def start_exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int] | None, scope: Scope, op: str,
        exclude: frozenset[int] = frozenset(), drop_dead: bool = False,
    ) -> PendingExchange:
        scope_ranks = self.scope_ranks(scope)
        me = scope_ranks.index(self.topology.rank)
        self.stats.record(scope, sum(send_counts) - send_counts[me], rows.size(1))
        keep = [i for i, r in enumerate(scope_ranks) if r not in exclude or i == me]
        if len(keep) < len(scope_ranks):
            if any(send_counts[i] for i in range(len(scope_ranks)) if i not in keep):
                raise ValueError(f"{op}: rows addressed to excluded rank(s) {sorted(exclude)}")
            send_counts = [send_counts[i] for i in keep]
            recv_counts = None if recv_counts is None else [recv_counts[i] for i in keep]
        peers = [scope_ranks[i] for i in keep]
        data = rows.contiguous().cpu().numpy()  # GPU rows are staged through host memory
        exchange = self.guarded(op, lambda: self.engine.start(peers, data, send_counts, recv_counts, op,
                                                                        drop_dead, exclude))
        return _RingPending(self, exchange, keep, len(scope_ranks), rows.device)

    def barrier(self, op: str) -> None:
        peers = self.scope_ranks("world")
        empty = torch.zeros(0, 0, dtype=torch.uint8).numpy()
        zeros = [0] * len(peers)
        self.guarded(op, lambda: self.engine.wait(self.engine.start(peers, empty, zeros, zeros, op)))

    def guarded(self, op: str, step: Callable[[], T]) -> T:
        """Run one step of ``op``; a failure breaks this Buffer (its streams are mid-message) and,
        when it started here, is published so that peers fail at once naming this rank."""
        if self.failed is not None:
            raise PortepError(f"{op}: this Buffer failed earlier ({self.failed}); create a new Buffer")
        try:
            return step()
        except PortepError as exc:
            self.failed = str(exc)
            if not isinstance(exc, PeerFailureError):
                try:
                    self.session.publish_failure(self.prefix, op, str(exc))
                except PortepError:
                    pass  # the control plane is gone too: peers will name this rank by its deadline
            raise

    # ------------------------------------------------------------------ health, stats, teardown
    def _check_alive(self, exchange: StreamExchange) -> None:
        """Fail ``exchange`` if this rank's proxy or another rank of the group is gone (the op as
        a whole cannot finish), naming it. Ranks masked out of the exchange do not count, and an
        exchange started with ``drop_dead`` (rank masking) drops the dead peers it waits on and
        goes on without them."""
        op = exchange.op
        if self.proxy is not None:
            self.proxy.check(op)
        me, ignored = self.topology.rank, exchange.excluded | self.engine.gone.keys()
        dead = {r: how for r, how in self.dead_ranks().items() if r != me and r not in ignored}
        if dead and exchange.drop_dead:
            self.engine.drop(dead)
        elif dead:
            raise PeerFailureError(op, dead, causes=dead)
        now = time.monotonic()
        if now - self._last_failure_poll > FAILURE_POLL_S:
            self._last_failure_poll = now
            self.session.check_failure_notice(self.prefix, op, ignored | {me})

    def dead_ranks(self) -> dict[int, str]:
        return self.session.client.dead_ranks()

    def _status(self) -> dict[str, object]:
        """What ``portep status`` shows for this Buffer's proxy."""
        stats = self.proxy.stats() if self.proxy is not None else {}
        return {"buffer": self.prefix, "transport": self.proxy.transport_name if self.proxy else "", **stats,
                "queue_depth": self.ring.pending(), "chunks_written": self.engine.chunks_written,
                "chunks_read": self.engine.chunks_read}

    def _diagnose(self) -> str:
        if self.proxy is None:
            return ""
        s = self.proxy.stats()
        return (f"this rank's proxy ({self.proxy.transport_name}): {s['descriptors']} descriptors, "
                f"{s['messages_in']} messages in, ring depth {self.ring.pending()}")

    def data_path_stats(self) -> dict[str, int]:
        """Chunks this rank wrote and read, and its proxy's counters (``proxy_*``; none on a single
        node, which needs no proxy)."""
        out = {"chunks_written": self.engine.chunks_written, "chunks_read": self.engine.chunks_read}
        if self.proxy is not None:
            out.update({f"proxy_{name}": value for name, value in self.proxy.stats().items()})
        return out

    def close(self) -> None:
        """Wait (briefly) until live peers have consumed everything this rank sent — so a rank
        that leaves first does not cut off its last message — then stop the proxy and unmap."""
        if self.failed is None and self._finalizer.alive:
            try:
                self.engine.drain(min(self.timeout_s, CLOSE_DRAIN_S), skip=self.dead_ranks().keys())
            except PortepError:
                pass  # a broken stream: there is nothing left to deliver
        self._finalizer()
