"""Unix-socket transport: messages between processes of one host over datagram sockets.

A dependable message fabric with no library behind it: it carries the same wire format as UCX
and EFA send/recv (:mod:`portep.backends.wire`), so the protocol tests — with faults injected —
run between real processes. Sockets live in the abstract namespace, so nothing is left on disk.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

from portep.errors import CommTimeoutError, TransportError
from portep.proxy.ring import backoff

from . import wire
from .transport import DEFAULT_CHUNK_BYTES, Message, MessageTransport

SOCKET_BUFFER_BYTES = 4 << 20
_ids = itertools.count()


class UnixSocketTransport(MessageTransport):
    """One endpoint; a send that finds the peer's queue full keeps receiving until it fits."""

    name = "socket"

    def __init__(self, rank: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 100.0) -> None:
        super().__init__(rank, chunk_bytes)
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        self._name = f"\0portep-{os.getpid()}-{rank}-{next(_ids)}".encode()
        self.sock.bind(self._name)
        self.sock.setblocking(False)
        self.peers: dict[int, bytes] = {}
        self._inbox: list[Message] = []
        self._max_datagram = wire.message_bytes(chunk_bytes)

    def address(self) -> bytes:
        return self._name

    def connect(self, peer: int, address: bytes) -> None:
        self.peers[peer] = address

    def send(self, peer: int, message: Message) -> None:
        try:
            target = self.peers[peer]
        except KeyError:
            raise ValueError(f"socket: rank {self.rank} is not connected to rank {peer}") from None
        data = wire.encode(message)
        deadline, attempt = time.monotonic() + self.timeout_s, 0
        while True:
            try:
                self.sock.sendto(data, target)
                return
            except BlockingIOError:
                self._drain()  # the peer may be waiting on us: keep our own queue moving
                if time.monotonic() > deadline:
                    raise CommTimeoutError("socket send", self.timeout_s, ranks=[peer],
                                           detail=f"rank {peer}'s receive queue stayed full") from None
                backoff(attempt)
                attempt += 1
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                raise TransportError("socket send", f"rank {peer} is not listening ({exc})") from exc

    def _drain(self, max_messages: int | None = None) -> None:
        while max_messages is None or len(self._inbox) < max_messages:
            try:
                data = self.sock.recv(self._max_datagram)
            except BlockingIOError:
                return
            self._inbox.append(wire.decode(data, copy=True))

    def receive(self, max_messages: int | None) -> list[Message]:
        self._drain(max_messages)
        if max_messages is None:
            out, self._inbox = self._inbox, []
        else:
            out, self._inbox = self._inbox[:max_messages], self._inbox[max_messages:]
        return out

    def close(self) -> None:
        self.sock.close()
