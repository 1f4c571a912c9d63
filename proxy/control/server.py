"""The control-plane server: rendezvous, rank health and stats for one job.

One :class:`ControlServer` per job runs in a background thread of rank 0's process (or standalone:
``portep control-server --world-size N``); every rank talks to it through a
:class:`~portep.proxy.control.ControlClient`.

* **Rendezvous** — ``put``/``get`` of bytes by key, and ``allgather`` (every rank's value once all
  have arrived). Waits happen server-side, bounded by the caller's timeout; a rank that died while
  others wait for it ends the wait at once with :class:`~portep.errors.PeerFailureError`.
* **Health** — each client keeps one bidirectional heartbeat stream open and sends a heartbeat every
  ``interval`` (0.5 s). The server declares a rank dead, permanently, when

  - its stream breaks without ``leave()`` and it does not reconnect within ``CONNECTION_GRACE_S``
    (``connection lost``: the kernel closed the socket of a killed or crashed process),
  - its heartbeats stop for ``heartbeat_timeout_s`` (``heartbeat``: a hung process or host, a partition),
  - it reports a failure (``reported failure``) or its process exits without ``close()`` (``exiting``).

  The server pushes the dead set (with how each death was detected) down every stream as soon as it
  changes, so ``ControlClient.check`` is a local lookup.
* **Stats** — ranks report a JSON-able dict per proxy (explicitly or piggybacked on heartbeats);
  ``get_stats`` returns them with their age. While running, the server leaves a job file
  (:mod:`~portep.proxy.control.jobs`) through which ``portep status`` finds it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from portep.errors import CommTimeoutError, TransportError

from .codec import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVICE,
    Message,
    decode,
    default_heartbeat_timeout_s,
    encode,
    format_address,
    stats_from_wire,
)
from .jobs import job_name, remove_job_file, write_job_file

CONNECTION_GRACE_S = 0.25

_SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclasses.dataclass
class _Rank:
    """One rank as the server sees it."""

    state: str = "unknown"  # unknown -> alive <-> suspect -> left | dead (left and dead are final)
    last_seen: float = 0.0
    suspect_since: float = 0.0


@dataclasses.dataclass
class _Gather:
    """One allgather in progress: values received, and ranks already answered."""

    values: dict[int, bytes] = dataclasses.field(default_factory=dict)
    answered: set[int] = dataclasses.field(default_factory=set)


class _BadRequest(ValueError):
    """A malformed request, answered in band with an ``invalid`` error."""


_END, _WAKE = object(), object()


class ControlServer:
    """The job's control plane: rendezvous, heartbeats and stats for ``world_size`` ranks.

    Arguments:
        world_size: number of ranks.
        host, port: where to listen (``port=0``: any free port; :attr:`address` tells which).
        heartbeat_timeout_s: heartbeat silence after which a rank is dead (default
            :func:`default_heartbeat_timeout_s`).
        job: name of the job file (default ``$PORTEP_JOB`` or ``<hostname>-<pid>-<port>``).
        job_file: write a job file for ``portep status`` while running.
    """

    def __init__(self, world_size: int, host: str = "127.0.0.1", port: int = 0,
                 heartbeat_timeout_s: float | None = None, *, job: str | None = None,
                 job_file: bool = True) -> None:
        if world_size < 1:
            raise ValueError(f"ControlServer: world_size must be >= 1, got {world_size}")
        self.world_size, self.host, self._port = world_size, host, port
        if heartbeat_timeout_s is None:
            heartbeat_timeout_s = default_heartbeat_timeout_s()
        self.heartbeat_timeout_s = heartbeat_timeout_s
        if self.heartbeat_timeout_s <= 0:
            raise ValueError(f"ControlServer: heartbeat_timeout_s must be positive, got {self.heartbeat_timeout_s}")
        self._job, self._write_job_file = job, job_file
        self.job_path: Path | None = None
        self._ranks = [_Rank() for _ in range(world_size)]
        self._dead: dict[int, str] = {}
        self._store: dict[str, bytes] = {}
        self._gathers: dict[str, _Gather] = {}
        self._stats: dict[tuple[int, int], tuple[dict[str, Any], float]] = {}
        self._inboxes: set[asyncio.Queue] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stop_grace_s = 0.0
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._bound_port: int | None = None
        self._start_time = time.time()
        self._start_monotonic = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        """``host:port`` clients connect to (valid after :meth:`start`)."""
        if self._bound_port is None:
            raise RuntimeError("ControlServer: not started")
        host = self.host
        if host in ("", "0.0.0.0", "::", "[::]"):
            host = socket.gethostname()
        return format_address(host, self._bound_port)

    def start(self, timeout_s: float = 10.0) -> ControlServer:
        """Start serving in a daemon thread; returns ``self`` once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("ControlServer: already started")
        self._thread = threading.Thread(target=self._thread_main, name="portep-control-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise CommTimeoutError("ControlServer.start", timeout_s, detail="the server thread did not start")
        if self._start_error is not None:
            self._thread.join()
            raise TransportError("ControlServer.start",
                                 f"cannot serve on {format_address(self.host, self._port)}: {self._start_error}")
        if self._write_job_file:
            self._publish_job_file()
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving: wait up to ``grace_s`` for live ranks to ``leave()``, then tell the rest and close."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive():
            def request() -> None:
                self._stop_grace_s = grace_s
                if self._stop_requested is not None:
                    self._stop_requested.set()
            try:
                loop.call_soon_threadsafe(request)
            except RuntimeError:  # loop already closed
                pass
        thread.join(grace_s + 10.0)
        self._remove_job_file()
        if thread.is_alive():
            raise CommTimeoutError("ControlServer.stop", grace_s + 10.0, detail="the server thread did not exit")

    def __enter__(self) -> ControlServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._start_error = exc
        finally:
            self._started.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._changed, self._stop_requested = asyncio.Event(), asyncio.Event()
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        server.add_generic_rpc_handlers((self._handlers(),))
        self._bound_port = server.add_insecure_port(format_address(self.host, self._port))
        await server.start()
        sweeper = asyncio.ensure_future(self._sweep())
        self._started.set()
        try:
            await self._stop_requested.wait()
            deadline = time.monotonic() + self._stop_grace_s
            while any(r.state in ("alive", "suspect") for r in self._ranks) and time.monotonic() < deadline:
                await self._wait_changed(deadline - time.monotonic())
            self._stopping = True
            self._broadcast()
            await asyncio.sleep(0)  # let the heartbeat streams send their last reply
            await server.stop(0.5)
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)

    # ------------------------------------------------------------------ job file
    def _publish_job_file(self) -> None:
        """Write the job file ``portep status`` finds this server by; removed by :meth:`stop` or at exit."""
        name = job_name(self._job, self._bound_port)
        self.job_path = write_job_file(name, self.address, self.world_size, self._start_time)
        atexit.register(self._remove_job_file)

    def _remove_job_file(self) -> None:
        path, self.job_path = self.job_path, None
        if path is None:
            return
        atexit.unregister(self._remove_job_file)
        remove_job_file(path, self.address)

    # ------------------------------------------------------------------ state (loop thread only)
    def _notify(self) -> None:
        """Wake every server-side wait (rendezvous state, deaths or stopping changed)."""
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    def _broadcast(self) -> None:
        """Push the dead set (or ``stopping``) down every heartbeat stream now."""
        self._notify()
        for inbox in self._inboxes:
            inbox.put_nowait(_WAKE)

    async def _wait_changed(self, timeout_s: float) -> None:
        assert self._changed is not None
        if timeout_s > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass

    def _declare_dead(self, rank: int, how: str) -> None:
        entry = self._ranks[rank]
        if entry.state in ("dead", "left"):
            return
        entry.state = "dead"
        self._dead[rank] = how
        self._broadcast()

    def _seen(self, rank: int) -> None:
        entry = self._ranks[rank]
        if entry.state in ("unknown", "alive", "suspect"):
            entry.state, entry.last_seen = "alive", time.monotonic()

    def _connection_lost(self, rank: int) -> None:
        entry = self._ranks[rank]
        if entry.state == "alive":
            entry.state, entry.suspect_since = "suspect", time.monotonic()

    async def _sweep(self) -> None:
        period = min(0.1, self.heartbeat_timeout_s / 10)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for rank, entry in enumerate(self._ranks):
                if entry.state not in ("alive", "suspect"):
                    continue
                silence = now - entry.last_seen
                if silence > self.heartbeat_timeout_s:
                    self._declare_dead(rank, f"heartbeat: no heartbeat for {silence:.2f} s "
                                             f"(timeout {self.heartbeat_timeout_s:g} s)")
                elif entry.state == "suspect" and now - entry.suspect_since > CONNECTION_GRACE_S:
                    self._declare_dead(rank, "connection lost: its heartbeat stream broke without leave() and "
                                             f"did not come back within {CONNECTION_GRACE_S:g} s "
                                             "(process killed or crashed)")

    def _dead_wire(self) -> list[list[Any]]:
        return [[rank, how] for rank, how in sorted(self._dead.items())]

    def _stats_wire(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "world_size": self.world_size,
            "uptime_s": now - self._start_monotonic,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "ranks": [[rank, entry.state, now - entry.last_seen if entry.last_seen else None]
                      for rank, entry in enumerate(self._ranks)],
            "proxies": [[rank, proxy, now - t, stats] for (rank, proxy), (stats, t) in sorted(self._stats.items())],
            "dead": self._dead_wire(),
        }

    def _store_stats(self, rank: int, proxy: Any, stats: Any) -> None:
        if not isinstance(proxy, int) or not isinstance(stats, dict):
            raise _BadRequest("stats: proxy must be an int and stats a JSON object")
        self._stats[(rank, proxy)] = (stats, time.monotonic())

    # ------------------------------------------------------------------ local access (any thread)
    def _in_loop(self, fn: Callable[[], Any]) -> Any:
        loop = self._loop
        if loop is None or loop.is_closed() or not (self._thread and self._thread.is_alive()):
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:
            return fn()
        return future.result(timeout=10.0)

    def dead_ranks(self) -> dict[int, str]:
        """Dead ranks and how each was detected."""
        return self._in_loop(lambda: dict(self._dead))

    def get_stats(self) -> dict[str, Any]:
        """The same dict as :meth:`ControlClient.get_stats`, without an RPC."""
        return stats_from_wire(self._in_loop(self._stats_wire))

    # ------------------------------------------------------------------ handlers
    def _rank(self, header: Mapping[str, Any]) -> int:
        rank = header.get("rank")
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise _BadRequest(f"rank {rank!r} is not in [0, {self.world_size})")
        return rank

    def _check_sender(self, header: Mapping[str, Any]) -> None:
        if "world_size" in header and header["world_size"] != self.world_size:
            raise _BadRequest(f"the client's world size is {header['world_size']!r}, this job's is {self.world_size}")
        if "rank" in header:
            self._rank(header)

    @staticmethod
    def _key(header: Mapping[str, Any]) -> str:
        key = header.get("key")
        if not isinstance(key, str):
            raise _BadRequest(f"key must be a string, got {key!r}")
        return key

    @staticmethod
    def _wait_s(header: Mapping[str, Any]) -> float:
        wait_s = header.get("wait_s")
        if not isinstance(wait_s, (int, float)) or wait_s < 0:
            raise _BadRequest(f"wait_s must be a non-negative number, got {wait_s!r}")
        return float(wait_s)

    def _stopping_error(self) -> Message:
        return {"error": {"type": "stopping", "detail": "the control plane is shutting down"}}, []

    async def _put(self, header: dict[str, Any], blobs: list[bytes]) -> Message:
        if len(blobs) != 1:
            raise _BadRequest("put carries exactly one value")
        self._store[self._key(header)] = blobs[0]
        self._notify()
        return {}, []

    async def _get(self, header: dict[str, Any], blobs: list[bytes]) -> Message:
        key, wait_s = self._key(header), self._wait_s(header)
        source = header.get("from_rank")
        if source is not None:
            self._rank({"rank": source})
        deadline = time.monotonic() + wait_s
        while key not in self._store:
            if source in self._dead:
                return {"error": {"type": "peer_failure", "dead": [[source, self._dead[source]]],
                                  "detail": f"key {key!r} was not put"}}, []
            if self._stopping:
                return self._stopping_error()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {"error": {"type": "timeout", "timeout_s": wait_s, "ranks": [],
                                  "detail": f"key {key!r} was not put"}}, []
            await self._wait_changed(remaining)
        return {}, [self._store[key]]

    async def _allgather(self, header: dict[str, Any], blobs: list[bytes]) -> Message:
        key, rank, wait_s = self._key(header), self._rank(header), self._wait_s(header)
        if len(blobs) != 1:
            raise _BadRequest("allgather carries exactly one value")
        gather = self._gathers.setdefault(key, _Gather())
        gather.values[rank] = blobs[0]
        self._notify()
        deadline = time.monotonic() + wait_s
        while len(gather.values) < self.world_size:
            missing = [r for r in range(self.world_size) if r not in gather.values]
            dead = [r for r in missing if r in self._dead]
            if dead:
                return {"error": {"type": "peer_failure", "dead": [[r, self._dead[r]] for r in dead],
                                  "detail": ""}}, []
            if self._stopping:
                return self._stopping_error()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                left = [r for r in missing if self._ranks[r].state == "left"]
                detail = f"rank(s) {left} had already left" if left else ""
                return {"error": {"type": "timeout", "timeout_s": wait_s, "ranks": missing, "detail": detail}}, []
            await self._wait_changed(remaining)
        gather.answered.add(rank)
        if len(gather.answered) == self.world_size and self._gathers.get(key) is gather:
            del self._gathers[key]
        return {}, [gather.values[r] for r in range(self.world_size)]

    async def _leave(self, header: dict[str, Any], blobs: list[bytes]) -> Message:
        rank = self._rank(header)
        entry = self._ranks[rank]
        if entry.state != "dead":
            entry.state = "left"
            self._notify()
        return {"dead": self._dead_wire()}, []

    async def _fail(self, header: dict[str, Any], blobs: list[bytes]) -> Message:
        rank = self._rank(header)
        kind = header.get("kind", "reported failure")
        if kind not in ("reported failure", "exiting"):
            raise _BadRequest(f"unknown failure kind {kind!r}")
        self._declare_dead(rank, f"{kind}: {header.get('detail', '')}")
        return {}, []

    async def _report_stats(self, header: dict[str, Any], blobs: list[bytes]) -> Message:
        self._store_stats(self._rank(header), header.get("proxy"), header.get("stats"))
        return {}, []

    async def _get_stats(self, header: dict[str, Any], blobs: list[bytes]) -> Message:
        return self._stats_wire(), []

    def _unary(self, fn: Callable[[dict[str, Any], list[bytes]], Any]) -> grpc.RpcMethodHandler:
        async def handler(request: Message, context: grpc.aio.ServicerContext) -> Message:
            header, blobs = request
            if header.get("v") != PROTOCOL_VERSION:
                return {"error": {"type": "version", "detail": f"protocol version {header.get('v')!r}, this "
                                                               f"server speaks {PROTOCOL_VERSION}"}}, []
            try:
                self._check_sender(header)
                return await fn(header, blobs)
            except _BadRequest as exc:  # answered in band: no gRPC error status
                return {"error": {"type": "invalid", "detail": str(exc)}}, []
        return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=decode, response_serializer=encode)

    async def _heartbeat(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """One rank's heartbeat stream: a reply per heartbeat, plus a push whenever the dead set changes."""
        inbox: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for item in requests:
                    inbox.put_nowait(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # the stream broke: same as its end without "bye"
                pass
            inbox.put_nowait(_END)

        self._inboxes.add(inbox)
        pumping = asyncio.ensure_future(pump())
        rank: int | None = None
        clean = False
        try:
            while True:
                item = await inbox.get()
                if item is _END:
                    return
                if item is not _WAKE:
                    header, _ = item
                    if header.get("bye"):
                        clean = True
                        continue
                    if header.get("v") != PROTOCOL_VERSION:
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "protocol version mismatch")
                    try:
                        self._check_sender(header)
                        rank = self._rank(header)
                        self._seen(rank)
                        for proxy, stats in header.get("stats", ()):
                            self._store_stats(rank, proxy, stats)
                    except _BadRequest as exc:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                elif rank is None:
                    continue
                yield {"dead": self._dead_wire(), "stopping": self._stopping,
                       "heartbeat_timeout_s": self.heartbeat_timeout_s}, []
                if self._stopping:
                    return
        finally:
            self._inboxes.discard(inbox)
            pumping.cancel()
            if rank is not None and not clean and not self._stopping:
                self._connection_lost(rank)

    def _handlers(self) -> grpc.GenericRpcHandler:
        unary = {"Put": self._put, "Get": self._get, "Allgather": self._allgather, "Leave": self._leave,
                 "Fail": self._fail, "ReportStats": self._report_stats, "GetStats": self._get_stats}
        methods = {name: self._unary(fn) for name, fn in unary.items()}
        methods["Heartbeat"] = grpc.stream_stream_rpc_method_handler(
            self._heartbeat, request_deserializer=decode, response_serializer=encode)
        return grpc.method_handlers_generic_handler(SERVICE, methods)
