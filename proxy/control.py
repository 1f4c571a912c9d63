"""The control plane: rendezvous, heartbeats and live stats over gRPC.

One :class:`ControlServer` per job runs in a background thread of rank 0's process (or standalone:
``portep control-server --world-size N``); every rank talks to it through a :class:`ControlClient`.

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
  changes, so :meth:`ControlClient.check` is a local lookup. A client that hears nothing from the
  server for ``heartbeat_timeout_s`` (after first contact) declares the control plane's host rank dead.
* **Stats** — ranks report a JSON-able dict per proxy (explicitly or piggybacked on heartbeats);
  ``get_stats`` returns them with their age. ``portep status`` finds running servers through job
  files (:func:`list_jobs`) and prints them.

Wire format: gRPC *generic method handlers* with explicit serializers, not a ``.proto`` with generated
code. Every message is ``<u32 little-endian header length><JSON header><raw blobs>``, the header
listing the blob sizes, so rendezvous values travel as raw bytes (no base64) and the header stays
readable. The reasons: the messages are a handful of small, Python-only control messages; there is no
codegen step nor generated files to keep in sync, and no coupling between protobuf's generated code
and runtime versions (protobuf 7 gencode refuses other runtime majors), so the only dependency is
``grpcio``. The header carries ``v`` (:data:`PROTOCOL_VERSION`); a mismatch is refused, not
misread. The service name is versioned too (``portep.control.v1.Control``).

Every RPC has a deadline: calls that do not wait for peers get ``rpc_timeout_s``; waiting calls get
their timeout (``portep.deadlines.default_timeout_s()`` by default) plus ``rpc_timeout_s``; the
heartbeat stream gets ``STREAM_LIFETIME_S`` and is renewed halfway through. gRPC failures surface as
:class:`~portep.errors.CommTimeoutError` (deadline passed) or :class:`~portep.errors.TransportError`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import getpass
import json
import os
import re
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from portep.deadlines import default_timeout_s, number_from_env
from portep.errors import CommTimeoutError, PeerFailureError, PortepError, TransportError

PROTOCOL_VERSION = 1
SERVICE = "portep.control.v1.Control"
HEARTBEAT_TIMEOUT_ENV = "PORTEP_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
RPC_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
CONNECTION_GRACE_S = 0.25
STREAM_LIFETIME_S = 120.0
MAX_MESSAGE_BYTES = 64 << 20
RUN_DIR_ENV = "PORTEP_RUN_DIR"
JOB_ENV = "PORTEP_JOB"

Message = tuple[dict[str, Any], list[bytes]]

_HEADER_LEN = struct.Struct("<I")
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),  # one connection per client: a killed process drops only its own
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


# ---------------------------------------------------------------------------------------------- settings
def default_heartbeat_timeout_s() -> float:
    """Seconds of heartbeat silence before a rank is declared dead: ``PORTEP_HEARTBEAT_TIMEOUT_S`` or 5 s."""
    return number_from_env(HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT_S)


def run_dir() -> Path:
    """Where running servers leave their job files: ``$PORTEP_RUN_DIR`` or ``<tmp>/portep-<user>/jobs``."""
    value = os.environ.get(RUN_DIR_ENV)
    if value:
        return Path(value)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"portep-{user}" / "jobs"


# ---------------------------------------------------------------------------------------------- wire format
def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def encode(message: Message) -> bytes:
    """``(header, blobs)`` -> ``<u32 header length><JSON header><blobs>``."""
    header, blobs = message
    head = json.dumps({**header, "blobs": [len(blob) for blob in blobs]}, separators=(",", ":"),
                      default=_json_default).encode()
    return b"".join((_HEADER_LEN.pack(len(head)), head, *blobs))


def decode(data: bytes) -> Message:
    """Inverse of :func:`encode`."""
    (length,) = _HEADER_LEN.unpack_from(data)
    end = _HEADER_LEN.size + length
    header = json.loads(data[_HEADER_LEN.size:end])
    blobs = []
    for size in header.pop("blobs", ()):
        blobs.append(bytes(data[end:end + size]))
        end += size
    if end != len(data):
        raise ValueError(f"control message: {len(data) - end} trailing bytes")
    return header, blobs


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _jsonable_stats(stats: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        stats = dataclasses.asdict(stats)
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping or a dataclass instance, got {type(stats).__name__}")
    return json.loads(json.dumps(dict(stats), default=_json_default))


def stats_from_wire(header: Mapping[str, Any]) -> dict[str, Any]:
    """The ``get_stats`` dict from a GetStats reply header (JSON keys turned back into ints)."""
    proxies: dict[int, dict[int, dict[str, Any]]] = {}
    for rank, proxy, age, stats in header["proxies"]:
        proxies.setdefault(rank, {})[proxy] = {"age_s": age, "stats": stats}
    return {
        "world_size": header["world_size"],
        "uptime_s": header["uptime_s"],
        "heartbeat_timeout_s": header["heartbeat_timeout_s"],
        "ranks": {rank: {"state": state, "heartbeat_age_s": age} for rank, state, age in header["ranks"]},
        "proxies": proxies,
        "dead": {rank: how for rank, how in header["dead"]},
    }


# ---------------------------------------------------------------------------------------------- server
@dataclasses.dataclass
class _Rank:
    state: str = "unknown"  # unknown -> alive <-> suspect -> left | dead (left and dead are final)
    last_seen: float = 0.0
    suspect_since: float = 0.0


@dataclasses.dataclass
class _Gather:
    values: dict[int, bytes] = dataclasses.field(default_factory=dict)
    answered: set[int] = dataclasses.field(default_factory=set)


class _BadRequest(ValueError):
    pass


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
        return _format_address(host, self._bound_port)

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
                                 f"cannot serve on {_format_address(self.host, self._port)}: {self._start_error}")
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
        self._bound_port = server.add_insecure_port(_format_address(self.host, self._port))
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
        name = self._job or os.environ.get(JOB_ENV) or f"{socket.gethostname()}-{os.getpid()}-{self._bound_port}"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        directory = run_dir()
        directory.mkdir(parents=True, exist_ok=True)
        info = {"job": name, "pid": os.getpid(), "host": socket.gethostname(), "address": self.address,
                "world_size": self.world_size, "start_time": self._start_time}
        path = directory / f"{name}.json"
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
        self.job_path = path
        atexit.register(self._remove_job_file)

    def _remove_job_file(self) -> None:
        path, self.job_path = self.job_path, None
        if path is None:
            return
        atexit.unregister(self._remove_job_file)
        try:
            if json.loads(path.read_text()).get("address") == self.address:  # not another job's of the same name
                path.unlink()
        except (OSError, ValueError):
            pass

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


# ---------------------------------------------------------------------------------------------- client
def _raise_rpc_error(exc: grpc.RpcError, op: str, address: str, timeout_s: float) -> None:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise CommTimeoutError(op, timeout_s, detail=f"the control plane at {address} did not answer") from None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise ValueError(f"{op}: {details}") from None
    name = code.name if code is not None else "error"
    raise TransportError(op, f"control plane at {address}: {name}: {details}") from None


def _call(method: Any, op: str, address: str, request: Message, timeout_s: float,
          wait_for_ready: bool = True) -> Message:
    """One unary RPC with a deadline; typed errors for gRPC failures and server-side errors."""
    try:
        header, blobs = method(request, timeout=timeout_s, wait_for_ready=wait_for_ready)
    except grpc.RpcError as exc:
        _raise_rpc_error(exc, op, address, timeout_s)
        raise  # not reached
    error = header.get("error")
    if error:
        kind = error.get("type")
        if kind == "timeout":
            raise CommTimeoutError(op, error["timeout_s"], error.get("ranks", ()), error.get("detail", ""))
        if kind == "invalid":
            raise ValueError(f"{op}: {error.get('detail', '')}")
        if kind == "peer_failure":
            causes = {rank: how for rank, how in error["dead"]}
            detail = "; ".join([*(f"rank {r}: {how}" for r, how in sorted(causes.items())), error.get("detail", "")])
            raise PeerFailureError(op, causes, detail.strip("; "), causes=causes)
        raise TransportError(op, f"control plane at {address}: {error.get('detail', kind)}")
    return header, blobs


def fetch_stats(address: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """``get_stats`` of the server at ``address`` without joining the job (what ``portep status`` uses)."""
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        method = channel.unary_unary(f"/{SERVICE}/GetStats", request_serializer=encode, response_deserializer=decode)
        header, _ = _call(method, "control.get_stats", address, ({"v": PROTOCOL_VERSION}, []), timeout_s,
                          wait_for_ready=False)
    return stats_from_wire(header)


class ControlClient:
    """One rank's connection to the control plane.

    Arguments:
        address: the server's ``host:port``.
        rank, world_size: this rank and the job's size.
        heartbeat_interval_s: time between heartbeats (default 0.5 s).
        heartbeat_timeout_s: silence from the server after which its host rank counts as dead
            (default: the server's own timeout, learnt from its first reply).
        rpc_timeout_s: deadline of calls that do not wait for peers.
        host_rank: the rank whose process runs the server (named when the server goes away).
    """

    def __init__(self, address: str, rank: int, world_size: int, *,
                 heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
                 heartbeat_timeout_s: float | None = None, rpc_timeout_s: float = RPC_TIMEOUT_S,
                 host_rank: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ControlClient: rank {rank} is not in [0, {world_size})")
        if heartbeat_interval_s <= 0 or rpc_timeout_s <= 0:
            raise ValueError("ControlClient: heartbeat_interval_s and rpc_timeout_s must be positive")
        self.address, self.rank, self.world_size, self.host_rank = address, rank, world_size, host_rank
        self.heartbeat_interval_s, self.rpc_timeout_s = heartbeat_interval_s, rpc_timeout_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._methods = {
            name: self._channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=encode,
                                            response_deserializer=decode)
            for name in ("Put", "Get", "Allgather", "Leave", "Fail", "ReportStats", "GetStats")
        }
        self._heartbeat_method = self._channel.stream_stream(f"/{SERVICE}/Heartbeat", request_serializer=encode,
                                                             response_deserializer=decode)
        self._lock = threading.Lock()
        self._dead: dict[int, str] = {}
        self._sources: dict[int, Callable[[], Any]] = {}
        self._state = "active"  # active | left | failed | closed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._last_reply: float | None = None
        self._seq = 0
        self.heartbeat_error: BaseException | None = None

    # ------------------------------------------------------------------ rendezvous
    def _rpc(self, name: str, op: str, header: dict[str, Any], blobs: list[bytes] | None = None,
             wait_s: float = 0.0, rpc_timeout_s: float | None = None, wait_for_ready: bool = True) -> Message:
        request = ({"v": PROTOCOL_VERSION, "rank": self.rank, "world_size": self.world_size, **header}, blobs or [])
        try:
            return _call(self._methods[name], op, self.address, request,
                         wait_s + (self.rpc_timeout_s if rpc_timeout_s is None else rpc_timeout_s), wait_for_ready)
        except PeerFailureError as exc:
            with self._lock:
                for rank, how in exc.causes.items():
                    self._dead.setdefault(rank, how)
            raise

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (overwrites)."""
        self._rpc("Put", f"control.put({key!r})", {"key": key}, [bytes(value)])

    def get(self, key: str, timeout_s: float | None = None, from_rank: int | None = None) -> bytes:
        """The value under ``key``, waiting up to ``timeout_s`` (default ``PORTEP_TIMEOUT_S``) for a ``put``.

        With ``from_rank`` (the rank expected to put it), the wait ends at once with
        :class:`PeerFailureError` if that rank dies first.
        """
        timeout = default_timeout_s() if timeout_s is None else timeout_s
        header = {"key": key, "wait_s": timeout, "from_rank": from_rank}
        _, blobs = self._rpc("Get", f"control.get({key!r})", header, wait_s=timeout)
        return blobs[0]

    def try_get(self, key: str, rpc_timeout_s: float = 1.0) -> bytes | None:
        """The value under ``key`` if it has been put, else None. Does not wait for the key, nor
        for an unreachable server (that raises :class:`TransportError` or a timeout at once)."""
        header = {"key": key, "wait_s": 0.0, "from_rank": None}
        try:
            _, blobs = self._rpc("Get", f"control.get({key!r})", header, rpc_timeout_s=rpc_timeout_s,
                                 wait_for_ready=False)
        except CommTimeoutError:
            return None
        return blobs[0]

    def allgather(self, key: str, value: bytes, timeout_s: float | None = None) -> list[bytes]:
        """Every rank's ``value`` for ``key``, in rank order, once all ranks have called this.

        Raises:
            CommTimeoutError: naming the ranks that had not arrived after ``timeout_s``.
            PeerFailureError: naming the dead ranks among those that had not arrived.
        """
        timeout = default_timeout_s() if timeout_s is None else timeout_s
        _, blobs = self._rpc("Allgather", f"control.allgather({key!r})", {"key": key, "wait_s": timeout},
                             [bytes(value)], wait_s=timeout)
        return blobs

    def barrier(self, key: str, timeout_s: float | None = None) -> None:
        """Wait until every rank has called ``barrier(key)`` (an allgather of nothing)."""
        self.allgather(key, b"", timeout_s)

    # ------------------------------------------------------------------ stats
    def report_stats(self, proxy_id: int, stats: Mapping[str, Any] | Any) -> None:
        """Report one proxy's stats (a JSON-able mapping, or a dataclass such as ``ProxyStats``)."""
        self._rpc("ReportStats", "control.report_stats", {"proxy": int(proxy_id), "stats": _jsonable_stats(stats)})

    def watch_stats(self, proxy_id: int, source: Callable[[], Mapping[str, Any] | Any]) -> None:
        """Send ``source()`` as ``proxy_id``'s stats with every heartbeat (no extra RPC)."""
        with self._lock:
            self._sources[int(proxy_id)] = source

    def get_stats(self) -> dict[str, Any]:
        """Stats of every rank and proxy with their age, rank states and dead ranks.

        Returns:
            ``{"world_size", "uptime_s", "heartbeat_timeout_s", "ranks": {rank: {"state", "heartbeat_age_s"}},
            "proxies": {rank: {proxy_id: {"age_s", "stats"}}}, "dead": {rank: how}}``.
        """
        header, _ = self._rpc("GetStats", "control.get_stats", {})
        return stats_from_wire(header)

    # ------------------------------------------------------------------ health
    def start_heartbeats(self) -> None:
        """Start the heartbeat thread (idempotent)."""
        if self._thread is not None or self._state != "active":
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"portep-heartbeat-r{self.rank}",
                                        daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    def _heartbeat_message(self) -> Message:
        with self._lock:
            sources = list(self._sources.items())
            self._seq += 1
            seq = self._seq
        stats = []
        for proxy, source in sources:
            try:
                stats.append([proxy, _jsonable_stats(source())])
            except Exception as exc:  # a broken stats source must not stop the heartbeats
                stats.append([proxy, {"error": repr(exc)}])
        return {"v": PROTOCOL_VERSION, "rank": self.rank, "world_size": self.world_size, "seq": seq,
                "stats": stats}, []

    def _requests(self) -> Iterator[Message]:
        opened = time.monotonic()
        while True:
            yield self._heartbeat_message()
            if self._stop.wait(self.heartbeat_interval_s) or time.monotonic() - opened > STREAM_LIFETIME_S / 2:
                # say goodbye, then half-close: a stream that ends without "bye" counts as a lost connection
                yield {"v": PROTOCOL_VERSION, "rank": self.rank, "world_size": self.world_size, "bye": True}, []
                return

    def _on_reply(self, header: Mapping[str, Any]) -> None:
        with self._lock:
            self._last_reply = time.monotonic()
            if self._heartbeat_timeout_s is None:
                self._heartbeat_timeout_s = float(header.get("heartbeat_timeout_s", default_heartbeat_timeout_s()))
            for rank, how in header.get("dead", ()):
                self._dead.setdefault(rank, how)
            if header.get("stopping") and self._state == "active":
                self._dead.setdefault(self.host_rank, "control plane: stopped by its host while this rank was "
                                                      "still in the job")

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                stream = self._heartbeat_method(self._requests(), timeout=STREAM_LIFETIME_S, wait_for_ready=True)
                with self._lock:
                    self._stream = stream
                if self._stop.is_set():
                    stream.cancel()
                for header, _ in stream:
                    self._on_reply(header)
                    if header.get("stopping"):
                        return
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self.heartbeat_error = exc
                self._stop.wait(min(self.heartbeat_interval_s, 0.1))
            except Exception as exc:  # keep beating; keep the cause for debugging
                self.heartbeat_error = exc
                self._stop.wait(self.heartbeat_interval_s)

    def _stop_heartbeats(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(0.0 if self._server_gone() else 0.5)  # a clean end takes milliseconds
        if thread.is_alive():
            with self._lock:
                stream = self._stream
            if stream is not None:
                stream.cancel()
            thread.join(5.0)
        self._thread = None

    def dead_ranks(self) -> dict[int, str]:
        """Dead ranks and how each was detected, as last heard from the server (no RPC)."""
        with self._lock:
            if self._thread is not None and self._state == "active" and self._last_reply is not None:
                silence = time.monotonic() - self._last_reply
                timeout = self._heartbeat_timeout_s or default_heartbeat_timeout_s()
                if silence > timeout and self.host_rank not in self._dead:
                    self._dead[self.host_rank] = (f"control plane: no heartbeat reply from {self.address} for "
                                                  f"{silence:.2f} s (timeout {timeout:g} s)")
            return dict(self._dead)

    def check(self, op: str) -> None:
        """Raise :class:`PeerFailureError` naming the dead ranks, ``op`` and how each death was detected."""
        dead = self.dead_ranks()
        if dead:
            raise PeerFailureError(op, dead, causes=dead)

    # ------------------------------------------------------------------ leaving
    def leave(self) -> None:
        """Leave the job cleanly (not a death), then stop the heartbeats."""
        if self._state != "active":
            return
        self._rpc("Leave", "control.leave", {})
        self._state = "left"
        self._stop_heartbeats()

    def fail(self, reason: str, kind: str = "reported failure") -> None:
        """Tell every rank this rank failed (``kind``: ``"reported failure"`` or ``"exiting"``)."""
        self._fail(reason, kind, self.rpc_timeout_s, wait_for_ready=True)

    def _fail(self, reason: str, kind: str, timeout_s: float, wait_for_ready: bool) -> None:
        if self._state != "active":
            return
        with self._lock:
            self._dead.setdefault(self.rank, f"{kind}: {reason}")
        self._state = "failed"
        try:
            self._rpc("Fail", "control.fail", {"kind": kind, "detail": reason}, rpc_timeout_s=timeout_s,
                      wait_for_ready=wait_for_ready)
        finally:
            self._stop_heartbeats()

    def _server_gone(self) -> bool:
        with self._lock:
            return self._dead.get(self.host_rank, "").startswith("control plane")

    def _depart(self, failure: str | None, kind: str = "reported failure") -> None:
        """Best-effort, bounded leave (or failure report) on the way out: never raises, never waits long."""
        if self._state != "active" or self._server_gone():
            return
        timeout = min(self.rpc_timeout_s, CLOSE_TIMEOUT_S)
        try:
            if failure is None:
                self._rpc("Leave", "control.leave", {}, rpc_timeout_s=timeout, wait_for_ready=False)
                self._state = "left"
            else:
                self._fail(failure, kind, timeout, wait_for_ready=False)
        except (PortepError, ValueError):
            pass

    def close(self) -> None:
        """Leave (if still in the job), stop the heartbeats and close the channel. Never raises."""
        if self._state == "closed":
            return
        self._depart(None)
        self._stop_heartbeats()
        self._state = "closed"
        self._channel.close()
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self._depart("the process exited without close()", kind="exiting")
        self.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self._depart(f"{exc_type.__name__ if exc_type else 'error'}: {exc}")
        self.close()


# ---------------------------------------------------------------------------------------------- discovery
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_jobs(directory: Path | None = None, clean: bool = True) -> list[dict[str, Any]]:
    """Job files of running servers, oldest first; files whose server process is gone are removed (``clean``)."""
    directory = run_dir() if directory is None else directory
    jobs = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            info = json.loads(path.read_text())
            pid, host = int(info["pid"]), info.get("host")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(info.get("address"), str):
            continue
        if host == socket.gethostname() and not _pid_alive(pid):
            if clean:
                path.unlink(missing_ok=True)
            continue
        info["path"] = str(path)
        jobs.append(info)
    return sorted(jobs, key=lambda info: info.get("start_time", 0))


def _human_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _first(stats: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in stats:
            return stats[name]
    return None


def format_stats(stats: Mapping[str, Any]) -> str:
    """A ``portep status`` table: one row per proxy, then rank states and dead ranks.

    Columns come from the reported dicts: ``descriptors``; ``bytes`` (or ``bytes_posted``);
    ``queue_depth`` (or ``max_queue_depth``); ``stalls``. Missing values print as ``-``.
    """
    columns = ("rank", "proxy", "descriptors", "bytes", "queue depth", "stalls", "age (s)")
    rows = []
    for rank, proxies in sorted(stats["proxies"].items()):
        for proxy, entry in sorted(proxies.items()):
            values = entry["stats"]
            cells = [_first(values, "descriptors"), _human_bytes(_first(values, "bytes", "bytes_posted")),
                     _first(values, "queue_depth", "max_queue_depth"), _first(values, "stalls")]
            rows.append([str(rank), str(proxy), *("-" if v is None else str(v) for v in cells),
                         f"{entry['age_s']:.1f}"])
    lines = []
    if rows:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows)
    else:
        lines.append("no proxy stats reported yet")
    by_state: dict[str, list[int]] = {}
    for rank, entry in sorted(stats["ranks"].items()):
        by_state.setdefault(entry["state"], []).append(rank)
    lines.append("ranks: " + ", ".join(f"{state} {ranks}" for state, ranks in sorted(by_state.items())))
    if stats["dead"]:
        lines.append("dead ranks:")
        lines.extend(f"  rank {rank}: {how}" for rank, how in sorted(stats["dead"].items()))
    else:
        lines.append("dead ranks: none")
    return "\n".join(lines)
