"""The control-plane client: one rank's connection, plus a one-shot stats query.

Every RPC has a deadline: calls that do not wait for peers get ``rpc_timeout_s``; waiting calls get
their timeout (``portep.deadlines.default_timeout_s()`` by default) plus ``rpc_timeout_s``; the
heartbeat stream gets ``STREAM_LIFETIME_S`` and is renewed halfway through. gRPC failures surface as
:class:`~portep.errors.CommTimeoutError` (deadline passed) or :class:`~portep.errors.TransportError`.
A client that hears nothing from the server for ``heartbeat_timeout_s`` (after first contact)
declares the control plane's host rank dead.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import grpc

from portep.deadlines import default_timeout_s
from portep.errors import CommTimeoutError, PeerFailureError, PortepError, TransportError

from .codec import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVICE,
    Message,
    decode,
    default_heartbeat_timeout_s,
    encode,
    jsonable_stats,
    stats_from_wire,
)

DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
RPC_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
STREAM_LIFETIME_S = 120.0

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),  # one connection per client: a killed process drops only its own
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _raise_rpc_error(exc: grpc.RpcError, op: str, address: str, timeout_s: float) -> NoReturn:
    """Raise the typed error for a failed gRPC call."""
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
        self._rpc("ReportStats", "control.report_stats", {"proxy": int(proxy_id), "stats": jsonable_stats(stats)})

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
                stats.append([proxy, jsonable_stats(source())])
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
