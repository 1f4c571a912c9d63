"""The transport interface: one-sided puts into a peer's registered buffer, with signals.

A transport fills a small table of operations (register memory, address, connect, put,
put-with-signal, poll), in the spirit of NCCL's network plugins, so that a new fabric is one
module. :class:`MessageTransport` implements puts and signals for fabrics that move messages
(shared memory, UCX tag/stream, loopback): it splits puts into chunks, tags the bytes of a
put-with-signal, and applies signals on the receiver only when their bytes have all landed
(:class:`~portep.proxy.signals.SignalTable`), so delivery order never matters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from portep.proxy.signals import SignalTable

from .faults import Faults, FaultyDelivery

DEFAULT_CHUNK_BYTES = 64 * 1024


class Kind(IntEnum):
    DATA = 1  # bytes for dst_offset (tagged with slot when they are guarded by a signal)
    SIGNAL = 2  # add value to slot once cumulative_bytes tagged bytes have landed


@dataclass(frozen=True)
class Message:
    """What a message-based fabric carries between two transports."""

    kind: Kind
    source: int
    dst_offset: int = 0
    slot: int = -1  # -1: untagged data
    value: int = 0
    cumulative_bytes: int = 0
    payload: bytes = b""


class Transport(ABC):
    """Puts from this rank's registered buffer into peers' registered buffers."""

    name: str = "abstract"

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.region: np.ndarray | None = None
        self.signals: SignalTable | None = None

    def register(self, region: np.ndarray, num_signal_slots: int, signal_values: np.ndarray | None = None) -> None:
        """Expose ``region`` (uint8, this rank's buffer) to peers, with ``num_signal_slots`` signals
        (kept in ``signal_values`` when given, e.g. shared memory the rank polls)."""
        if region.dtype != np.uint8 or region.ndim != 1:
            raise TypeError(f"{self.name}: the registered region must be a 1-D uint8 array")
        self.region, self.signals = region, SignalTable(num_signal_slots, signal_values)

    @abstractmethod
    def address(self) -> bytes:
        """This endpoint's address, for peers' :meth:`connect` (exchanged by the control plane)."""

    @abstractmethod
    def connect(self, peer: int, address: bytes) -> None:
        """Open the path to ``peer``."""

    @abstractmethod
    def put(self, peer: int, src_offset: int, dst_offset: int, length: int) -> None:
        """Copy ``length`` bytes of my region at ``src_offset`` to ``peer``'s at ``dst_offset``."""

    @abstractmethod
    def put_with_signal(self, peer: int, src_offset: int, dst_offset: int, length: int, slot: int,
                        value: int) -> None:
        """A put, then ``peer``'s signal ``slot`` += ``value`` once every byte of it has landed."""

    @abstractmethod
    def poll(self, max_messages: int | None = None) -> int:
        """Make progress; apply what arrived. Returns the number of messages handled."""

    def flush(self, timeout_s: float | None = None) -> None:  # noqa: B027 (optional hook)
        """Wait until every posted put has completed at the source (its bytes may be reused)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the endpoint."""


class MessageTransport(Transport):
    """Puts and signals over a fabric that only moves messages; subclasses implement :meth:`send`
    and :meth:`receive`."""

    def __init__(self, rank: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(rank)
        self.chunk_bytes = chunk_bytes
        self._tagged_sent: dict[tuple[int, int], int] = defaultdict(int)
        self._delivery: FaultyDelivery | None = None
        self.messages_in = 0

    def inject_faults(self, faults: Faults) -> None:
        """Reorder / delay / drop what this endpoint receives (tests of the protocol's robustness)."""
        self._delivery = FaultyDelivery(faults, seed_offset=self.rank)

    @abstractmethod
    def send(self, peer: int, message: Message) -> None:
        """Hand one message to the fabric."""

    @abstractmethod
    def receive(self, max_messages: int | None) -> list[Message]:
        """Messages that have arrived for this endpoint."""

    def _source(self, src_offset: int, length: int) -> np.ndarray:
        """The registered region, after checking that ``[src_offset, src_offset + length)`` is in it."""
        region = self.region
        if region is None:
            raise RuntimeError(f"{self.name}: register memory before putting")
        if src_offset < 0 or length < 0 or src_offset + length > region.size:
            raise ValueError(f"{self.name}: source bytes [{src_offset}, {src_offset + length}) are outside the "
                             f"{region.size}-byte region")
        return region

    def _send_data(self, peer: int, src_offset: int, dst_offset: int, length: int, slot: int) -> None:
        self._source(src_offset, length)
        for start in range(0, length, self.chunk_bytes):
            size = min(self.chunk_bytes, length - start)
            payload = self.region[src_offset + start : src_offset + start + size].tobytes()
            self.send(peer, Message(Kind.DATA, self.rank, dst_offset + start, slot, payload=payload))

    def put(self, peer: int, src_offset: int, dst_offset: int, length: int) -> None:
        self._send_data(peer, src_offset, dst_offset, length, slot=-1)

    def put_with_signal(self, peer: int, src_offset: int, dst_offset: int, length: int, slot: int,
                        value: int) -> None:
        self._send_data(peer, src_offset, dst_offset, length, slot)
        self._tagged_sent[(peer, slot)] += length
        self.send(peer, Message(Kind.SIGNAL, self.rank, slot=slot, value=value,
                                cumulative_bytes=self._tagged_sent[(peer, slot)]))

    def poll(self, max_messages: int | None = None) -> int:
        messages = self.receive(max_messages)
        if self._delivery is not None:
            messages = self._delivery.deliver(messages, max_messages)
        self.messages_in += len(messages)
        for message in messages:
            self._apply(message)
        return len(messages)

    def _apply(self, message: Message) -> None:
        if message.kind == Kind.DATA:
            end = message.dst_offset + len(message.payload)
            if end > self.region.size:
                raise ValueError(f"{self.name}: rank {message.source} wrote past the end of rank {self.rank}'s "
                                 f"region ({end} > {self.region.size})")
            self.region[message.dst_offset : end] = np.frombuffer(message.payload, dtype=np.uint8)
            if message.slot >= 0:
                self.signals.on_data(message.source, message.slot, len(message.payload))
        else:
            self.signals.on_signal(message.source, message.slot, message.value, message.cumulative_bytes)
