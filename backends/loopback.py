"""Loopback transport: endpoints in one process joined by an in-memory fabric with fault injection.

The fabric can reorder messages, hold them back for a number of polls, and drop them
(:mod:`portep.backends.faults`), so tests can show that portep's protocol gives the right result
on unordered, slow fabrics and a clear timeout — never a wrong result — on a lossy one.
"""

from __future__ import annotations

from collections import defaultdict

from .faults import Faults, FaultyDelivery
from .transport import Message, MessageTransport

__all__ = ["Faults", "LoopbackFabric", "LoopbackTransport"]


class LoopbackFabric:
    """Connects :class:`LoopbackTransport` endpoints of one process."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self._queues: dict[int, list[Message]] = defaultdict(list)
        self._delivery: dict[int, FaultyDelivery] = {}
        self.endpoints: dict[int, LoopbackTransport] = {}

    def endpoint(self, rank: int, chunk_bytes: int | None = None) -> LoopbackTransport:
        transport = LoopbackTransport(rank, self, **({"chunk_bytes": chunk_bytes} if chunk_bytes else {}))
        self.endpoints[rank] = transport
        self._delivery[rank] = FaultyDelivery(self.faults, seed_offset=rank)
        return transport

    def enqueue(self, peer: int, message: Message) -> None:
        self._queues[peer].append(message)

    def take(self, rank: int, max_messages: int | None) -> list[Message]:
        arrived, self._queues[rank] = self._queues[rank], []
        return self._delivery[rank].deliver(arrived, max_messages)

    @property
    def dropped(self) -> int:
        return sum(d.dropped for d in self._delivery.values())

    def in_flight(self) -> int:
        return sum(len(q) for q in self._queues.values()) + sum(d.held() for d in self._delivery.values())


class LoopbackTransport(MessageTransport):
    """One endpoint of a :class:`LoopbackFabric`."""

    name = "loopback"

    def __init__(self, rank: int, fabric: LoopbackFabric, **kwargs: int) -> None:
        super().__init__(rank, **kwargs)
        self.fabric = fabric
        self.peers: set[int] = set()

    def address(self) -> bytes:
        return str(self.rank).encode()

    def connect(self, peer: int, address: bytes) -> None:
        if int(address) not in self.fabric.endpoints:
            raise ValueError(f"loopback: no endpoint at address {address!r}")
        self.peers.add(peer)

    def send(self, peer: int, message: Message) -> None:
        if peer not in self.peers:
            raise ValueError(f"loopback: rank {self.rank} is not connected to rank {peer}")
        self.fabric.enqueue(peer, message)

    def receive(self, max_messages: int | None) -> list[Message]:
        return self.fabric.take(self.rank, max_messages)
