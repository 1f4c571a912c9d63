"""Loopback transport: endpoints in one process joined by an in-memory fabric with fault injection.

The fabric can reorder messages, hold them back for a number of polls, and drop them, so tests
can show that portep's protocol gives the right result on unordered, slow fabrics and a clear
timeout — never a wrong result — on a lossy one.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from .transport import Message, MessageTransport


@dataclass
class Faults:
    """What the fabric does to messages: shuffle what is deliverable, hold each back for up to
    ``max_delay_polls`` polls, drop with probability ``drop_rate``."""

    reorder: bool = False
    max_delay_polls: int = 0
    drop_rate: float = 0.0
    seed: int = 0


class LoopbackFabric:
    """Connects :class:`LoopbackTransport` endpoints of one process."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self._queues: dict[int, list[tuple[int, Message]]] = defaultdict(list)
        self._polls: dict[int, int] = defaultdict(int)
        self.endpoints: dict[int, LoopbackTransport] = {}
        self.dropped = 0

    def endpoint(self, rank: int, chunk_bytes: int | None = None) -> LoopbackTransport:
        transport = LoopbackTransport(rank, self, **({"chunk_bytes": chunk_bytes} if chunk_bytes else {}))
        self.endpoints[rank] = transport
        return transport

    def enqueue(self, peer: int, message: Message) -> None:
        if self._rng.random() < self.faults.drop_rate:
            self.dropped += 1
            return
        due = self._polls[peer] + self._rng.randint(0, self.faults.max_delay_polls)
        self._queues[peer].append((due, message))

    def take(self, rank: int, max_messages: int | None) -> list[Message]:
        self._polls[rank] += 1
        queue = self._queues[rank]
        ready = [i for i, (due, _) in enumerate(queue) if due <= self._polls[rank]]
        if self.faults.reorder:
            self._rng.shuffle(ready)
        ready = ready[:max_messages] if max_messages is not None else ready
        taken = [queue[i][1] for i in ready]
        for i in sorted(ready, reverse=True):
            del queue[i]
        return taken

    def in_flight(self) -> int:
        return sum(len(q) for q in self._queues.values())


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
