"""Credit-based byte streams between ranks: how rows travel on the rings + proxy path.

Every ordered pair of ranks ``(s, d)`` has one stream. ``d``'s window holds two receive slots of
``chunk_bytes`` for ``s``; a message (a 64-byte header, then the payload) is cut into chunks that
alternate between the two slots. Two counters per pair make the protocol:

* ``landed``: chunks from ``s`` that have fully arrived at ``d`` (one counter per slot in ``d``'s
  window, applied only after every byte of the chunk landed — by ``s`` itself when it is on
  ``d``'s node, by ``d``'s proxy otherwise);
* ``credits``: chunks ``d`` has copied out, so their slot is free again (a signal in ``s``'s window).

``s`` writes chunk ``n`` only when ``n - credits < slots``: a bounded amount in flight per peer,
whatever the fabric. Same-node chunks are copied straight into the peer's window (NVLink / xGMI /
shared memory); other-node chunks are staged in the sender's window and handed to its proxy as
PUT_SIGNAL descriptors, and credits travel back as SIGNAL descriptors.

The header carries a per-pair sequence number, the operation name and the row width, so ranks
that call different operations, or the same one with different shapes, get an error naming the
peer instead of a hang or a wrong result.

A peer that died can be *dropped* from an exchange started with ``drop_dead`` (rank masking, as
DeepEP's shrink mode does): the exchange completes without it, counting 0 rows from it, and the
engine leaves that peer out of every later exchange.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from portep.errors import CommTimeoutError, PeerFailureError, PortepError

from .descriptor import Descriptor, Op
from .ring import DescriptorRing, backoff
from .window import Window

HEADER_DTYPE = np.dtype([("magic", "<u4"), ("seq", "<u4"), ("row_bytes", "<u8"), ("nbytes", "<u8"),
                         ("op", "S40")])
HEADER_BYTES = HEADER_DTYPE.itemsize
MAGIC = 0x31504550  # "PEP1"
LIVENESS_PERIOD_S = 0.05


class StreamLayout:
    """Where each pair's slots sit in the data area of a window, and which signal counts what."""

    def __init__(self, world: int, chunk_bytes: int, slots: int = 2) -> None:
        if chunk_bytes <= HEADER_BYTES:
            raise ValueError(f"chunk_bytes must exceed the {HEADER_BYTES}-byte header, got {chunk_bytes}")
        self.world, self.chunk_bytes, self.slots = world, chunk_bytes, slots

    @property
    def num_signals(self) -> int:
        return self.world * self.slots + self.world

    @property
    def data_bytes(self) -> int:
        return 2 * self.world * self.slots * self.chunk_bytes

    def recv_offset(self, source: int, chunk: int) -> int:
        return (source * self.slots + chunk % self.slots) * self.chunk_bytes

    def stage_offset(self, dest: int, chunk: int) -> int:
        return (self.world * self.slots + dest * self.slots + chunk % self.slots) * self.chunk_bytes

    def landed_signal(self, source: int, chunk: int) -> int:
        """The counter of ``source``'s chunks that used ``chunk``'s slot. One counter per slot, so at
        most one put is in flight per counter: on an unordered fabric a later chunk's bytes can
        never be counted for an earlier chunk's signal."""
        return source * self.slots + chunk % self.slots

    def landed_value(self, chunk: int) -> int:
        """The value :meth:`landed_signal` reaches once ``chunk`` has landed."""
        return chunk // self.slots + 1

    def credit_signal(self, dest: int) -> int:
        return self.world * self.slots + dest


class Channel(ABC):
    """How this rank writes into one peer's window."""

    def __init__(self, me: int, peer: int, layout: StreamLayout) -> None:
        self.me, self.peer, self.layout = me, peer, layout

    @abstractmethod
    def write_chunk(self, chunk: int, parts: Sequence[np.ndarray]) -> None:
        """Place ``parts`` back to back in the peer's slot for cumulative chunk number ``chunk``,
        then make its ``landed`` counter reach ``chunk + 1`` once the bytes are there."""

    @abstractmethod
    def credit(self, consumed: int, delta: int) -> None:
        """Tell the peer that ``consumed`` of its chunks (``delta`` new ones) have been copied out."""


class DirectChannel(Channel):
    """A same-node peer: stores straight into its mapped window (a release store of the counter
    after the bytes, which x86's store order — or a fence on GPUs — keeps in that order)."""

    def __init__(self, me: int, peer: int, layout: StreamLayout, peer_window: Window) -> None:
        super().__init__(me, peer, layout)
        self.window = peer_window

    def write_chunk(self, chunk: int, parts: Sequence[np.ndarray]) -> None:
        offset = self.layout.recv_offset(self.me, chunk)
        for part in parts:
            self.window.data[offset : offset + part.size] = part
            offset += part.size
        self.window.signals[self.layout.landed_signal(self.me, chunk)] = self.layout.landed_value(chunk)

    def credit(self, consumed: int, delta: int) -> None:
        self.window.signals[self.layout.credit_signal(self.me)] = consumed


class ProxyChannel(Channel):
    """A peer on another node: stage the chunk in my window and queue descriptors for my proxy."""

    def __init__(self, me: int, peer: int, layout: StreamLayout, my_window: Window, queue: list[np.ndarray]) -> None:
        super().__init__(me, peer, layout)
        self.window, self.queue = my_window, queue

    def write_chunk(self, chunk: int, parts: Sequence[np.ndarray]) -> None:
        stage = offset = self.layout.stage_offset(self.peer, chunk)
        for part in parts:
            self.window.data[offset : offset + part.size] = part
            offset += part.size
        self.queue.append(Descriptor(Op.PUT_SIGNAL, self.peer, stage, self.layout.recv_offset(self.me, chunk),
                                     offset - stage, self.layout.landed_signal(self.me, chunk), 1).to_record())

    def credit(self, consumed: int, delta: int) -> None:
        self.queue.append(Descriptor(Op.SIGNAL, self.peer, 0, 0, 0, self.layout.credit_signal(self.me),
                                     delta).to_record())


@dataclass
class _Outgoing:
    exchange: StreamExchange
    header: np.ndarray
    payload: np.ndarray
    next_chunk: int = 0

    @property
    def total(self) -> int:
        return HEADER_BYTES + self.payload.size


@dataclass
class _Incoming:
    exchange: StreamExchange
    index: int  # sender's position in the exchange's scope
    chunks_done: int = 0
    total: int | None = None  # header + payload bytes, known after the first chunk
    received: int = 0


@dataclass
class StreamExchange:
    """One exchange among ``peers`` (world ranks in scope order)."""

    op: str
    peers: list[int]
    row_bytes: int
    recv_counts: list[int | None]
    parts: list[np.ndarray | None]
    pending_from: set[int] = field(default_factory=set)  # peers whose message has not all arrived
    pending_to: set[int] = field(default_factory=set)  # peers not yet sent all of their message
    drop_dead: bool = False  # a dead peer is dropped (0 rows from it) instead of failing the exchange
    dropped: set[int] = field(default_factory=set)  # peers dropped that way
    excluded: frozenset[int] = frozenset()  # ranks left out of it from the start (masked)

    @property
    def done(self) -> bool:
        return not self.pending_from and not self.pending_to

    def result(self) -> np.ndarray:
        """The received rows, grouped by sender in scope order: uint8 ``[rows, row_bytes]``."""
        rows = sum(self.recv_counts)
        if rows == 0 or self.row_bytes == 0:
            return np.zeros((rows, self.row_bytes), dtype=np.uint8)
        return np.concatenate([p.reshape(-1, self.row_bytes) for p in self.parts])


class StreamEngine:
    """Drives every stream of one rank: starts exchanges, makes progress, waits with a deadline."""

    def __init__(self, rank: int, window: Window, layout: StreamLayout, channels: dict[int, Channel],
                 ring: DescriptorRing | None, descriptor_queue: list[np.ndarray], timeout_s: float,
                 check_alive: Callable[[StreamExchange], None] | None = None,
                 diagnose: Callable[[], str] | None = None, wake: Callable[[], None] | None = None) -> None:
        self.rank, self.window, self.layout = rank, window, layout
        self.channels, self.ring, self.timeout_s = channels, ring, timeout_s
        self.queue = descriptor_queue
        self.check_alive = check_alive or (lambda exchange: None)
        self.diagnose = diagnose or (lambda: "")
        self.wake = wake or (lambda: None)
        world = layout.world
        self.sent = [0] * world  # chunks written to each peer
        self.consumed = [0] * world  # chunks copied out from each peer
        self.send_seq = [0] * world
        self.recv_seq = [0] * world
        self.outgoing: dict[int, deque[_Outgoing]] = {p: deque() for p in range(world)}
        self.incoming: dict[int, deque[_Incoming]] = {p: deque() for p in range(world)}
        self.chunks_written = 0
        self.chunks_read = 0
        self.gone: dict[int, str] = {}  # peers dropped after they died, and why

    # ------------------------------------------------------------------ starting
    def start(self, peers: list[int], rows: np.ndarray, send_counts: Sequence[int],
              recv_counts: Sequence[int] | None, op: str, drop_dead: bool = False,
              excluded: frozenset[int] = frozenset()) -> StreamExchange:
        """Queue ``rows`` (uint8 ``[sum(send_counts), row_bytes]``, grouped by destination in the
        order of ``peers``) and expect one message from every peer; returns at once.

        ``drop_dead``: peers dropped earlier are skipped (0 rows each way) instead of failing.
        ``excluded``: ranks the caller left out of ``peers`` (their failures do not concern it)."""
        row_bytes = rows.shape[1] if rows.ndim == 2 else 0
        flat = rows.reshape(-1)
        if self.rank not in peers:
            raise ValueError(f"{op}: rank {self.rank} is not among the exchange's ranks {peers}")
        counts_in: list[int | None] = list(recv_counts) if recv_counts is not None else [None] * len(peers)
        gone = [p for p in peers if p in self.gone]
        if gone and not drop_dead:
            raise PeerFailureError(op, gone, causes={p: self.gone[p] for p in gone})
        exchange = StreamExchange(op, peers, row_bytes, counts_in, [None] * len(peers), drop_dead=drop_dead,
                                  excluded=excluded)
        offsets = np.concatenate([[0], np.cumsum(send_counts)]).astype(np.int64) * row_bytes
        for index, peer in enumerate(peers):
            payload = flat[offsets[index] : offsets[index + 1]]
            if peer == self.rank:
                exchange.parts[index] = payload.copy()
                exchange.recv_counts[index] = send_counts[index]
                continue
            if peer in self.gone:
                self._mark_dropped(exchange, index)
                continue
            header = np.zeros(1, dtype=HEADER_DTYPE)
            header[0] = (MAGIC, self.send_seq[peer], row_bytes, payload.size, op.encode()[:40])
            self.send_seq[peer] += 1
            self.outgoing[peer].append(_Outgoing(exchange, header.view(np.uint8), payload))
            self.incoming[peer].append(_Incoming(exchange, index))
            exchange.pending_to.add(peer)
            exchange.pending_from.add(peer)
        self.progress()
        return exchange

    # ------------------------------------------------------------------ progress
    def progress(self) -> int:
        """Write what credits allow, copy out what has landed; returns chunks moved (0: idle)."""
        moved = 0
        for peer, queue in self.outgoing.items():
            while queue and self.sent[peer] - int(self.window.signals[self.layout.credit_signal(peer)]) \
                    < self.layout.slots:
                moved += 1
                if self._send_chunk(peer, queue[0]):
                    queue.popleft().exchange.pending_to.discard(peer)
        for source, queue in self.incoming.items():
            while queue and self._landed(source):
                moved += 1
                if self._recv_chunk(source, queue[0]):
                    queue.popleft().exchange.pending_from.discard(source)
        self.flush()
        return moved

    def _landed(self, source: int) -> bool:
        chunk = self.consumed[source]
        return int(self.window.signals[self.layout.landed_signal(source, chunk)]) >= self.layout.landed_value(chunk)

    def flush(self) -> None:
        """Hand queued descriptors to the proxy."""
        if self.queue:
            records = np.concatenate(self.queue)
            self.queue.clear()
            self.ring.push(records, self.timeout_s, op="descriptor ring push")
            self.wake()

    def _send_chunk(self, peer: int, item: _Outgoing) -> bool:
        chunk_bytes = self.layout.chunk_bytes
        start = item.next_chunk * chunk_bytes
        end = min(start + chunk_bytes, item.total)
        if start == 0:
            parts = [item.header, item.payload[: end - HEADER_BYTES]]
        else:
            parts = [item.payload[start - HEADER_BYTES : end - HEADER_BYTES]]
        self.channels[peer].write_chunk(self.sent[peer], parts)
        self.sent[peer] += 1
        self.chunks_written += 1
        item.next_chunk += 1
        return end == item.total

    def _recv_chunk(self, source: int, item: _Incoming) -> bool:
        exchange, chunk_bytes = item.exchange, self.layout.chunk_bytes
        offset = self.layout.recv_offset(source, self.consumed[source])
        slot = self.window.data[offset : offset + chunk_bytes]
        if item.total is None:
            header = slot[:HEADER_BYTES].view(HEADER_DTYPE)[0]
            self._check_header(source, exchange, header)
            nbytes = int(header["nbytes"])
            item.total = HEADER_BYTES + nbytes
            rows = nbytes // exchange.row_bytes if exchange.row_bytes else 0
            expected = exchange.recv_counts[item.index]
            if expected is not None and expected != rows:
                raise PortepError(f"{exchange.op}: rank {source} sent {rows} row(s), rank {self.rank} expected "
                                  f"{expected}")
            exchange.recv_counts[item.index] = rows
            exchange.parts[item.index] = np.empty(nbytes, dtype=np.uint8)
            body = slot[HEADER_BYTES : min(chunk_bytes, item.total)]
        else:
            body = slot[: min(chunk_bytes, item.total - item.chunks_done * chunk_bytes)]
        out = exchange.parts[item.index]
        out[item.received : item.received + body.size] = body
        item.received += body.size
        item.chunks_done += 1
        self.consumed[source] += 1
        self.chunks_read += 1
        self.channels[source].credit(self.consumed[source], 1)
        return HEADER_BYTES + item.received == item.total

    def _check_header(self, source: int, exchange: StreamExchange, header: np.void) -> None:
        op = bytes(header["op"]).decode(errors="replace")
        if int(header["magic"]) != MAGIC:
            raise PortepError(f"{exchange.op}: corrupt message from rank {source} (bad magic)")
        if int(header["seq"]) != self.recv_seq[source] or op != exchange.op[:40]:
            raise PortepError(f"{exchange.op}: rank {source} is in {op!r} (its call #{int(header['seq'])} with this "
                              f"rank) while rank {self.rank} is in {exchange.op!r} (call #{self.recv_seq[source]}): "
                              f"ranks called portep operations in different orders")
        if int(header["row_bytes"]) != exchange.row_bytes:
            raise PortepError(f"{exchange.op}: rank {source} sends rows of {int(header['row_bytes'])} bytes, rank "
                              f"{self.rank} expects {exchange.row_bytes}: ranks disagree on the shape (hidden, "
                              f"top-k, dtype or buffer sizes)")
        self.recv_seq[source] += 1

    # ------------------------------------------------------------------ waiting
    def wait(self, exchange: StreamExchange) -> np.ndarray:
        """Progress until ``exchange`` completed; a deadline or a failed peer raises, naming ranks."""
        start = last_check = time.monotonic()
        idle = 0
        while not exchange.done:
            if self.progress():
                idle = 0
                continue
            self.wake()  # the proxy may have gone to sleep while this rank waits for its peers
            now = time.monotonic()
            if now - last_check > LIVENESS_PERIOD_S:
                last_check = now
                self.check_alive(exchange)
                if now - start > self.timeout_s:
                    raise self._timeout(exchange)
            backoff(idle)
            idle += 1
        return exchange.result()

    # ------------------------------------------------------------------ dead peers
    def drop(self, dead: Mapping[int, str]) -> None:
        """Give up on the ``dead`` peers (rank: how its death was seen): exchanges started with
        ``drop_dead`` complete without them; others waiting on them stay pending (their liveness
        check fails them)."""
        for peer, cause in dead.items():
            self.gone[peer] = cause
            waiting = {id(i.exchange): i.exchange for i in [*self.outgoing[peer], *self.incoming[peer]]}
            self.outgoing[peer].clear()
            self.incoming[peer].clear()
            for exchange in waiting.values():
                if exchange.drop_dead:
                    self._mark_dropped(exchange, exchange.peers.index(peer))

    @staticmethod
    def _mark_dropped(exchange: StreamExchange, index: int) -> None:
        peer = exchange.peers[index]
        exchange.pending_from.discard(peer)
        exchange.pending_to.discard(peer)
        exchange.dropped.add(peer)
        exchange.recv_counts[index] = 0
        exchange.parts[index] = np.zeros(0, dtype=np.uint8)

    def drain(self, timeout_s: float, skip: Collection[int] = ()) -> list[int]:
        """Progress until every peer but ``skip`` has consumed every chunk sent to it (its credits
        came back), or ``timeout_s`` passed; returns the peers still owing credits."""
        deadline = time.monotonic() + timeout_s
        idle = 0
        while True:
            owing = [p for p in range(self.layout.world) if p not in skip and p != self.rank and p not in self.gone
                     and int(self.window.signals[self.layout.credit_signal(p)]) < self.sent[p]]
            if not owing or time.monotonic() > deadline:
                return owing
            if self.progress():
                idle = 0
                continue
            self.wake()
            backoff(idle)
            idle += 1

    def _timeout(self, exchange: StreamExchange) -> CommTimeoutError:
        missing = []
        for source in sorted(exchange.pending_from):
            item = next((i for i in self.incoming[source] if i.exchange is exchange), None)
            if item is not None:
                have = item.received + (HEADER_BYTES if item.total is not None else 0)
                need = f"{item.total - have} of {item.total}" if item.total is not None else "all"
                missing.append(f"rank {source}: {need} byte(s) missing")
        stuck = [f"rank {d}: no credit for chunk {self.sent[d]}" for d in sorted(exchange.pending_to)]
        ranks = exchange.pending_from | exchange.pending_to
        extra = self.diagnose()
        return CommTimeoutError(exchange.op, self.timeout_s, ranks=ranks,
                                detail="; ".join(missing + stuck + ([extra] if extra else [])))
