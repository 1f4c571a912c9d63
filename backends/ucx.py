"""UCX transport: puts and signals as UCX tag messages (ucxx, synchronous API, explicit progress).

Each :class:`UcxTransport` owns a UCX context and worker. Puts are split into chunks of
``chunk_bytes`` and sent as tag messages in the :mod:`~portep.backends.wire` format (header with
the source rank, then the payload), all with one tag, :data:`PORTEP_TAG`. The receiver keeps a
window of receives for any source pre-posted, each of one maximum-size message; a completed
receive is applied to the region (signals through the order-independent
:class:`~portep.proxy.signals.SignalTable`) and posted again. Nothing blocks: :meth:`poll` makes
one bounded round of worker progress, completes sends and applies what arrived.

Flow control: at most ``window_ops`` sends and ``window_bytes`` bytes in flight per peer. A send
beyond the window keeps progressing (and applying arrivals, so two ranks sending to each other
cannot deadlock) until there is room, or raises :class:`~portep.errors.CommTimeoutError` naming
the peer at ``timeout_s``. UCX errors become :class:`~portep.errors.TransportError` naming the peer.

Choice of UCX transports: UCX picks them (``UCX_TLS`` unset or ``tls=None``): shared memory
(``sysv``/``posix``/``cma``) between processes of one host, ``tcp`` otherwise (the ucxx wheel's UCX
has no verbs transport). Force with ``UCX_TLS`` (e.g. ``sm,self`` or ``tcp,self``) or ``tls=...``;
pick NICs with ``UCX_NET_DEVICES`` (e.g. ``eth0``). Shared memory is only used when
``error_handling=False`` (the default): UCX's peer-failure mode excludes it. Without it a dead
peer shows up as a send-window or :meth:`flush` timeout naming that peer.

Measured with ``python -m portep.backends.ucx --tls ... --size ...`` (two processes on the 2-core
development VM, puts-with-signal streamed one way, default windows; best of a few runs, the VM is
shared so figures vary): 64 KiB puts: ``UCX_TLS=sm,self`` ~2.9 GB/s (44 k puts/s),
``UCX_TLS=tcp,self`` ~0.9 GB/s (14 k puts/s); 4 KiB puts: ~81 k puts/s (sm), ~52 k puts/s (tcp).
Each put-with-signal is two messages (data, signal); Python per message (~10 us) bounds small puts.

Threading: one thread drives a transport (every call, :meth:`poll` included, from the proxy's
thread); nothing here is locked. Several transports in one process, one per thread, work (each has
its own UCX context and worker).
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from portep.deadlines import default_timeout_s
from portep.errors import CommTimeoutError, TransportError

from . import wire
from .transport import DEFAULT_CHUNK_BYTES, Kind, Message, MessageTransport

#: UCX tag of every portep message ("portep" in ASCII); receives match it exactly, any source.
PORTEP_TAG = 0x706F7274_65700000
DEFAULT_WINDOW_OPS = 64
DEFAULT_WINDOW_BYTES = 8 << 20
DEFAULT_RECV_BUFFERS = 64
# address() = this prefix (format tag, receive-buffer size) + the UCX worker address
_ADDRESS_PREFIX = struct.Struct("<4sI")
_ADDRESS_MAGIC = b"UCXP"
_PROGRESS_ROUNDS = 4  # ucp_worker_progress calls per poll at most (bounded: poll never blocks long)
_UCS_OK = 0


def _import_ucxx() -> tuple[Any, Any]:
    """``(ucxx._lib.libucxx, ucxx._lib.arr.Array)``, or a TransportError saying how to get them."""
    # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows: silence the warning.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx._lib.libucxx as libucxx
        from ucxx._lib.arr import Array
    except Exception as exc:  # noqa: BLE001 - ImportError or a failing native library load
        raise TransportError("ucx", f"ucxx is not importable ({type(exc).__name__}: {exc}); "
                                    f"install it with `pip install ucxx-cu12`") from exc
    return libucxx, Array


def ucx_available() -> bool:
    """Whether ucxx imports on this machine."""
    try:
        _import_ucxx()
    except TransportError:
        return False
    return True


class UcxTransport(MessageTransport):
    """A portep endpoint over one UCX worker (tag messages, receive window, per-peer send window)."""

    name = "ucx"

    def __init__(self, rank: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, window_ops: int = DEFAULT_WINDOW_OPS,
                 window_bytes: int = DEFAULT_WINDOW_BYTES, recv_buffers: int = DEFAULT_RECV_BUFFERS,
                 timeout_s: float | None = None, tls: str | None = None, error_handling: bool = False,
                 ucx_config: dict[str, str] | None = None) -> None:
        super().__init__(rank, chunk_bytes)
        if chunk_bytes <= 0 or window_ops <= 0 or recv_buffers <= 0:
            raise ValueError("ucx: chunk_bytes, window_ops and recv_buffers must be positive")
        self.slot_bytes = wire.message_bytes(chunk_bytes)
        if window_bytes < self.slot_bytes:
            raise ValueError(f"ucx: window_bytes={window_bytes} cannot hold one {self.slot_bytes}-byte message")
        self.window_ops, self.window_bytes = window_ops, window_bytes
        self.timeout_s = default_timeout_s() if timeout_s is None else timeout_s
        self.error_handling = error_handling
        self._ucx, self._array = _import_ucxx()
        config = dict(ucx_config or {})
        if tls:
            config["TLS"] = tls
        try:
            self._context = self._ucx.UCXContext(config or None, feature_flags=(self._ucx.Feature.TAG,))
            self._worker = self._ucx.UCXWorker(self._context)
        except Exception as exc:  # noqa: BLE001 - any UCX error while opening the device
            raise TransportError(f"ucx rank {rank}: open worker", str(exc)) from exc
        self._tag = self._ucx.UCXXTag(PORTEP_TAG)
        self._tag_mask = self._ucx.UCXXTagMaskFull
        self._endpoints: dict[int, Any] = {}
        self._in_flight: dict[int, deque[tuple[Any, np.ndarray, int]]] = {}
        self._in_flight_bytes: dict[int, int] = {}
        self._free_send_buffers: list[np.ndarray] = []
        self._recv_slots = np.zeros((recv_buffers, self.slot_bytes), dtype=np.uint8)
        self._recv_requests: list[Any] = [self._post_receive(i) for i in range(recv_buffers)]
        self._posted = deque(range(recv_buffers))  # receive buffers in the order they were posted
        self._handled_outside_poll = 0
        self.stats = {"sent_messages": 0, "sent_bytes": 0, "received_messages": 0, "received_bytes": 0,
                      "window_waits": 0}

    # ---------------------------------------------------------------- addressing
    @property
    def tls(self) -> str:
        """The UCX transports this context may use (``UCX_TLS``, ``all`` when UCX chooses)."""
        return str(self._context.config.get("TLS", "all"))

    def address(self) -> bytes:
        return _ADDRESS_PREFIX.pack(_ADDRESS_MAGIC, self.slot_bytes) + self._worker.address.tobytes()

    def connect(self, peer: int, address: bytes) -> None:
        if len(address) <= _ADDRESS_PREFIX.size or address[:4] != _ADDRESS_MAGIC:
            raise ValueError(f"ucx: rank {self.rank} was given a bad address for rank {peer} (not from "
                             f"UcxTransport.address())")
        _, peer_slot_bytes = _ADDRESS_PREFIX.unpack_from(address)
        if peer_slot_bytes != self.slot_bytes:
            raise ValueError(f"ucx: rank {peer} receives {peer_slot_bytes}-byte messages, rank {self.rank} sends "
                             f"{self.slot_bytes}: every rank must use the same chunk_bytes")
        try:
            ucx_address = self._ucx.UCXAddress.create_from_buffer(bytes(address[_ADDRESS_PREFIX.size :]))
            endpoint = self._worker.create_endpoint_from_worker_address(
                ucx_address, endpoint_error_handling=self.error_handling)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"ucx connect rank {self.rank} -> rank {peer}", str(exc)) from exc
        self._endpoints[peer] = endpoint
        self._in_flight.setdefault(peer, deque())
        self._in_flight_bytes.setdefault(peer, 0)

    # ---------------------------------------------------------------- sending
    def _send_buffer(self) -> np.ndarray:
        return self._free_send_buffers.pop() if self._free_send_buffers else np.empty(self.slot_bytes, np.uint8)

    def _send_data(self, peer: int, src_offset: int, dst_offset: int, length: int, slot: int) -> None:
        """Chunks of a put, each copied once from the region into a send buffer behind its header."""
        region = self._source(src_offset, length)
        header = wire.HEADER_BYTES
        for start in range(0, length, self.chunk_bytes):
            size = min(self.chunk_bytes, length - start)
            buffer = self._send_buffer()
            wire.encode_header_into(buffer, Kind.DATA, self.rank, size, dst_offset + start, slot)
            buffer[header : header + size] = region[src_offset + start : src_offset + start + size]
            self._post_send(peer, buffer, header + size)

    def send(self, peer: int, message: Message) -> None:
        size = wire.message_bytes(memoryview(message.payload).nbytes)
        if size > self.slot_bytes:
            raise ValueError(f"ucx: a {size}-byte message exceeds the {self.slot_bytes}-byte receive buffers "
                             f"(chunk_bytes={self.chunk_bytes})")
        buffer = self._send_buffer()
        wire.encode_into(buffer, message)
        self._post_send(peer, buffer, size)

    def _post_send(self, peer: int, buffer: np.ndarray, size: int) -> None:
        endpoint = self._endpoints.get(peer)
        if endpoint is None:
            self._free_send_buffers.append(buffer)
            raise ValueError(f"ucx: rank {self.rank} is not connected to rank {peer}")
        in_flight = self._in_flight[peer]
        if len(in_flight) >= self.window_ops or self._in_flight_bytes[peer] + size > self.window_bytes:
            self._wait_for_room(peer, size)
        try:
            request = endpoint.tag_send(self._array(buffer[:size]), self._tag)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"ucx send rank {self.rank} -> rank {peer}", str(exc)) from exc
        in_flight.append((request, buffer, size))
        self._in_flight_bytes[peer] += size
        self.stats["sent_messages"] += 1
        self.stats["sent_bytes"] += size

    def _complete_sends(self, peer: int) -> int:
        """Retire the completed sends at the head of ``peer``'s queue; returns how many."""
        in_flight, done = self._in_flight[peer], 0
        while in_flight and in_flight[0][0].completed:
            request, buffer, size = in_flight.popleft()
            if request.status != _UCS_OK:
                self._raise_request_error(request, f"ucx send rank {self.rank} -> rank {peer}")
            self._in_flight_bytes[peer] -= size
            self._free_send_buffers.append(buffer)
            done += 1
        return done

    def _wait_for_room(self, peer: int, size: int) -> None:
        self.stats["window_waits"] += 1
        deadline = time.monotonic() + self.timeout_s
        in_flight, spins = self._in_flight[peer], 0
        while len(in_flight) >= self.window_ops or self._in_flight_bytes[peer] + size > self.window_bytes:
            self._progress()
            self._handled_outside_poll += self._drain(None, self._apply_slot)
            if self._complete_sends(peer):
                continue
            if time.monotonic() > deadline:
                raise CommTimeoutError(f"ucx send rank {self.rank} -> rank {peer}", self.timeout_s, ranks=[peer],
                                       detail=f"{len(in_flight)} messages ({self._in_flight_bytes[peer]} bytes) "
                                              f"still in flight")
            spins += 1
            if spins > 64:
                os.sched_yield()

    def in_flight(self, peer: int | None = None) -> int:
        """Sends not yet completed (to ``peer``, or to all)."""
        if peer is not None:
            return len(self._in_flight.get(peer, ()))
        return sum(len(q) for q in self._in_flight.values())

    def flush(self, timeout_s: float | None = None) -> None:
        """Progress (applying arrivals) until every send has completed; CommTimeoutError names the
        peers still owed data at the deadline."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        spins = 0
        while True:
            self._progress()
            self._handled_outside_poll += self._drain(None, self._apply_slot)
            for peer in self._in_flight:
                self._complete_sends(peer)
            waiting = [peer for peer, q in self._in_flight.items() if q]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise CommTimeoutError(f"ucx flush rank {self.rank}", timeout, ranks=waiting,
                                       detail=f"{self.in_flight()} messages still in flight")
            spins += 1
            if spins > 64:
                os.sched_yield()

    # ---------------------------------------------------------------- receiving
    def _post_receive(self, index: int) -> Any:
        try:
            return self._worker.tag_recv(self._array(self._recv_slots[index]), self._tag, self._tag_mask)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"ucx rank {self.rank}: post receive", str(exc)) from exc

    def _progress(self) -> None:
        try:
            for _ in range(_PROGRESS_ROUNDS):
                if not self._worker.progress_once():
                    break
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"ucx rank {self.rank}: progress", str(exc)) from exc

    def _drain(self, max_messages: int | None, handle: Callable[[np.ndarray], None]) -> int:
        """Hand each completed receive's buffer to ``handle``, then post it again; returns how many.

        UCX matches receives of one tag in the order they were posted, so completions are taken
        from the oldest posted receive on and the scan stops at the first one still pending.
        """
        if not self._recv_requests:
            raise RuntimeError(f"ucx: rank {self.rank}'s transport is closed")
        posted, requests = self._posted, self._recv_requests
        limit = len(requests) if max_messages is None else max_messages
        handled = 0
        while handled < limit:
            index = posted[0]
            request = requests[index]
            if not request.completed:
                break
            posted.popleft()
            if request.status != _UCS_OK:
                self._raise_request_error(request, f"ucx receive at rank {self.rank}")
            handle(self._recv_slots[index])
            requests[index] = self._post_receive(index)
            posted.append(index)
            handled += 1
        return handled

    def _apply_slot(self, slot: np.ndarray) -> None:
        if self.region is None:
            raise RuntimeError(f"ucx: rank {self.rank} received a message before registering memory")
        message = wire.decode(slot)
        self.stats["received_messages"] += 1
        self.stats["received_bytes"] += len(message.payload)
        self._apply(message)

    def _raise_request_error(self, request: Any, op: str) -> None:
        try:
            request.check_error()
        except Exception as exc:  # noqa: BLE001
            raise TransportError(op, f"{type(exc).__name__}: {exc}") from exc
        raise TransportError(op, f"UCX request ended with status {request.status}")

    def receive(self, max_messages: int | None) -> list[Message]:
        self._progress()
        messages: list[Message] = []
        self._drain(max_messages, lambda slot: messages.append(wire.decode(slot, copy=True)))
        return messages

    def poll(self, max_messages: int | None = None) -> int:
        self._progress()
        for peer, in_flight in self._in_flight.items():
            if in_flight:
                self._complete_sends(peer)
        handled = self._drain(max_messages, self._apply_slot) + self._handled_outside_poll
        self._handled_outside_poll = 0
        return handled

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        """Drop endpoints, requests and the worker without waiting for peers (flush first to deliver)."""
        if not hasattr(self, "_worker"):
            return
        try:
            self._worker.cancel_inflight_requests()
        except Exception:  # noqa: BLE001, S110 - best effort during teardown
            pass
        for endpoint in self._endpoints.values():
            try:
                endpoint.close()
            except Exception:  # noqa: BLE001, S110
                pass
        self._endpoints.clear()
        self._in_flight.clear()
        self._recv_requests = []
        del self._worker, self._context



# ---------------------------------------------------------------- measurement
def _bench_rank(rank: int, conn: Any, tls: str | None, size: int, count: int) -> None:
    transport = UcxTransport(rank, chunk_bytes=max(size, DEFAULT_CHUNK_BYTES), tls=tls)
    slots = 64
    region = np.random.default_rng(rank).integers(0, 256, size * slots, dtype=np.uint8)
    transport.register(region, num_signal_slots=2)
    conn.send(transport.address())
    transport.connect(1 - rank, conn.recv())
    conn.send("connected")
    conn.recv()
    if rank == 0:
        start = time.perf_counter()
        for i in range(count):
            offset = (i % slots) * size
            transport.put_with_signal(1, offset, offset, size, 0, 1)
            transport.poll()
        while transport.signals.values[1] == 0:  # rank 1 acknowledges once every put has landed
            transport.poll()
        conn.send(time.perf_counter() - start)
    else:
        while transport.signals.values[0] < count:
            transport.poll()
        transport.put_with_signal(0, 0, 0, 0, 1, 1)
        transport.flush()
        conn.send(None)
    conn.recv()
    transport.close()


def main(argv: list[str] | None = None) -> None:
    """Stream puts-with-signal of one size from rank 0 to rank 1 (two processes) and print the rate."""
    import argparse
    import multiprocessing as mp

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tls", default=None, help="UCX_TLS for both ranks (default: UCX chooses)")
    parser.add_argument("--size", type=int, default=65536, help="bytes per put")
    parser.add_argument("--count", type=int, default=10000, help="puts")
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    pipes = [context.Pipe() for _ in range(2)]
    procs = [context.Process(target=_bench_rank, args=(r, pipes[r][1], args.tls, args.size, args.count))
             for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        addresses = [pipes[r][0].recv() for r in range(2)]
        for r in range(2):
            pipes[r][0].send(addresses[1 - r])
        for r in range(2):
            pipes[r][0].recv()
        for r in range(2):
            pipes[r][0].send("start")
        seconds = [pipes[r][0].recv() for r in range(2)][0]
        for r in range(2):
            pipes[r][0].send("stop")
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    rate = args.count / seconds
    print(f"ucx tls={args.tls or 'auto'} size={args.size} B count={args.count}: {args.size * rate / 1e6:.0f} MB/s, "
          f"{rate / 1e3:.1f} k puts/s")


if __name__ == "__main__":
    main()
