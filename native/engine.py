"""Python handle of the compiled engine (``native/engine/*.c``, built by ``pip install``).

The engine is a C library loaded with ctypes: this module declares its functions and wraps its
objects — shared-memory windows, descriptor rings, the proxy thread with its transport, and the
rank-side streams (:class:`Engine`, :class:`Exchange`) that move every byte of a dispatch or a
combine. Python keeps the control path (set-up, rendezvous, errors, stats); nothing here touches
payload bytes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import itertools
import os
import threading
import weakref
from collections.abc import Sequence
from ctypes import POINTER, c_char_p, c_double, c_int, c_int32, c_int64, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p
from typing import Any

import numpy as np

from portep.proxy.descriptor import DESCRIPTOR_DTYPE

ERR_LEN = 512
BLOB_MAX = 1024
SEGMENT_PREFIX = "portep"
_names = itertools.count()


class EngineError(RuntimeError):
    """An error reported by the compiled engine; ``kind`` and ``culprit`` (a rank or -1) say whose."""

    USAGE, PROTOCOL, PEER, PROXY = 1, 2, 3, 4

    def __init__(self, message: str, kind: int = USAGE, culprit: int = -1) -> None:
        super().__init__(message)
        self.kind, self.culprit = kind, culprit


class BuildMissingError(ImportError):
    """The compiled engine is not built (``pip install`` builds it)."""


def _library_path(module: str) -> str:
    try:
        return importlib.import_module(module).__file__  # type: ignore[return-value]
    except ImportError as exc:
        raise BuildMissingError(f"portep's compiled engine ({module}) is not built: run `pip install -e .` (it needs a "
                                f"C compiler) from the repository root ({exc})") from exc


def _declare(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)


@functools.cache
def lib() -> ctypes.CDLL:
    """The engine library, with every function declared."""
    so = ctypes.CDLL(_library_path("portep.native._engine"))
    u8p, i32p, i64p = POINTER(c_uint8), POINTER(c_int32), POINTER(c_int64)
    # shared memory, rings, windows
    _declare(so, "pe_ring_bytes", c_size_t, c_uint64)
    _declare(so, "pe_ring_format", c_int, c_void_p, c_void_p, c_uint64, c_char_p)
    _declare(so, "pe_ring_view", c_int, c_void_p, c_void_p, c_char_p)
    _declare(so, "pe_ring_push", c_uint64, c_void_p, c_void_p, c_uint64)
    _declare(so, "pe_ring_pop", c_uint64, c_void_p, c_void_p, c_uint64)
    _declare(so, "pe_ring_pending", c_uint64, c_void_p)
    _declare(so, "pe_ring_consume", c_uint64, c_void_p, c_uint64, c_double, POINTER(c_double))
    _declare(so, "pe_window_create", c_int, c_void_p, c_char_p, c_uint32, c_uint64, c_char_p)
    _declare(so, "pe_window_attach", c_int, c_void_p, c_char_p, c_uint32, c_uint64, c_char_p)
    _declare(so, "pe_window_close", None, c_void_p)
    _declare(so, "pe_window_signals_offset", c_uint64)
    _declare(so, "pe_window_data_offset", c_uint64, c_uint32)
    _declare(so, "pe_window_bytes", c_size_t, c_uint32, c_uint64)
    _declare(so, "pe_window_signal", None, c_void_p, c_uint32, c_int64)
    _declare(so, "pe_shm_create", c_int, c_void_p, c_char_p, c_size_t, c_char_p)
    _declare(so, "pe_shm_attach", c_int, c_void_p, c_char_p, c_char_p)
    _declare(so, "pe_shm_unlink", None, c_void_p)
    _declare(so, "pe_shm_close", None, c_void_p)
    # proxy
    _declare(so, "pe_proxy_create", c_void_p, c_void_p, c_char_p, c_uint64, c_char_p)
    _declare(so, "pe_proxy_transport_name", c_char_p, c_void_p)
    _declare(so, "pe_proxy_address", c_int, c_void_p, u8p, c_size_t, POINTER(c_size_t), c_char_p)
    _declare(so, "pe_proxy_connect", c_int, c_void_p, u8p, c_size_t, c_char_p)
    _declare(so, "pe_proxy_add_endpoint", c_int, c_void_p, c_void_p, c_void_p, c_int, u8p, c_size_t,
             POINTER(c_size_t), c_char_p)
    _declare(so, "pe_proxy_set_rank", c_int, c_void_p, c_int, c_int, c_int, u8p, c_size_t, c_char_p)
    _declare(so, "pe_proxy_remove_endpoint", c_int, c_void_p, c_int, c_double)
    _declare(so, "pe_proxy_wake", None, c_void_p)
    _declare(so, "pe_proxy_rank_status", c_int, c_void_p, c_int, c_int, c_char_p)
    _declare(so, "pe_proxy_status", c_int, c_void_p, c_char_p)
    _declare(so, "pe_proxy_stats", None, c_void_p, c_void_p)
    _declare(so, "pe_proxy_break_rank", None, c_void_p, c_int, c_int)
    _declare(so, "pe_proxy_destroy", None, c_void_p, c_double)
    # engine
    _declare(so, "pe_engine_num_signals", c_uint32, c_int)
    _declare(so, "pe_engine_data_bytes", c_uint64, c_int, c_int, c_uint64, c_uint64, c_int)
    _declare(so, "pe_engine_create", c_void_p, c_int, c_int, c_int, c_uint64, c_uint64, c_int, c_void_p, c_char_p)
    _declare(so, "pe_engine_set_direct", c_int, c_void_p, c_int, c_void_p, c_char_p)
    _declare(so, "pe_engine_set_proxied", c_int, c_void_p, c_int, c_void_p, c_int, c_void_p, c_char_p)
    _declare(so, "pe_exchange_start", c_void_p, c_void_p, c_char_p, c_int, i32p, c_void_p, c_int64, c_int32,
             c_void_p, c_int, c_char_p)
    _declare(so, "pe_exchange_headers", c_int, c_void_p, c_double, i64p, i32p, c_char_p)
    _declare(so, "pe_exchange_wait_headers", c_int, c_void_p, c_double, c_char_p)
    _declare(so, "pe_exchange_set_recv", c_int, c_void_p, c_void_p, c_char_p)
    _declare(so, "pe_exchange_push", c_int, c_void_p, c_char_p)
    _declare(so, "pe_exchange_wait", c_int, c_void_p, c_double, c_char_p)
    _declare(so, "pe_exchange_describe", None, c_void_p, i32p, c_char_p, c_size_t)
    _declare(so, "pe_exchange_dropped", None, c_void_p, i32p)
    _declare(so, "pe_exchange_free", None, c_void_p)
    _declare(so, "pe_engine_drop", None, c_void_p, c_int)
    _declare(so, "pe_engine_drain", c_int, c_void_p, i32p, c_double)
    _declare(so, "pe_engine_error", c_int, c_void_p, i32p)
    _declare(so, "pe_engine_stats", None, c_void_p, c_void_p)
    _declare(so, "pe_engine_destroy", None, c_void_p)
    _declare(so, "pe_cast_f32", None, c_void_p, c_int, c_void_p, c_int64)
    _declare(so, "pe_finish_rows", None, c_void_p, c_int, c_void_p, c_void_p, c_int64, c_int64)
    _declare(so, "pe_fp8_cast", None, c_void_p, c_int, c_int64, c_int64, c_int64, c_void_p, c_void_p, c_int)
    _declare(so, "pe_ll_route", c_int64, c_void_p, c_int64, c_int, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p)
    _declare(so, "pe_ll_place", None, c_void_p, c_int, c_int, c_int64, c_void_p, c_void_p, c_void_p)
    _declare(so, "pe_rows_by_column", c_int64, c_void_p, c_int64, c_int64, c_void_p, c_void_p)
    _declare(so, "pe_ht_positions", None, c_void_p, c_int, c_int, c_void_p)
    _declare(so, "pe_ht_local_routing", None, c_void_p, c_void_p, c_int64, c_int, c_int64, c_int, c_void_p, c_void_p,
             c_void_p)
    _declare(so, "pe_ll_dispatch", c_void_p, c_void_p, c_char_p, c_void_p, c_int64, c_int, c_int, c_void_p, c_void_p,
             c_void_p, c_int, c_int, c_char_p)
    _declare(so, "pe_ll_exchange", c_void_p, c_void_p)
    _declare(so, "pe_ll_send_counts", None, c_void_p, c_void_p)
    _declare(so, "pe_ll_wire_rows", None, c_void_p, c_void_p)
    _declare(so, "pe_ll_dispatch_recv", c_int, c_void_p, c_void_p, c_int, c_int64, c_void_p, c_void_p, c_void_p,
             i32p, c_char_p)
    _declare(so, "pe_ll_combine", c_void_p, c_void_p, c_void_p, c_char_p, c_void_p, c_int, c_void_p, c_void_p,
             c_void_p, c_int, c_void_p, c_void_p, c_void_p, c_int, c_char_p)
    _declare(so, "pe_ll_combine_weights", c_void_p, c_void_p, c_void_p, c_char_p, c_void_p, c_void_p, c_int,
             c_char_p)
    _declare(so, "pe_ll_combine_sums", c_void_p, c_void_p, c_void_p, c_char_p, c_void_p, c_int, c_void_p, c_int,
             c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_char_p)
    _declare(so, "pe_ll_free", None, c_void_p)
    _declare(so, "pe_ht_dispatch", c_void_p, c_void_p, c_char_p, c_int, c_void_p, c_int64, c_void_p, c_int, c_int,
             c_int, POINTER(c_void_p), c_char_p)
    _declare(so, "pe_ht_hop_receive", c_int, c_void_p, c_void_p, c_char_p)
    _declare(so, "pe_ht_cached", c_int, c_void_p, c_char_p, c_void_p, c_int, c_int, POINTER(c_void_p), c_char_p)
    _declare(so, "pe_ht_forward", c_void_p, c_void_p, c_char_p, c_void_p, c_int, c_int, c_char_p)
    _declare(so, "pe_ht_node_rows", c_int64, c_void_p, c_void_p, c_char_p)
    _declare(so, "pe_ht_node_receive", c_int, c_void_p, c_void_p, c_void_p, c_int, c_char_p)
    _declare(so, "pe_ht_combine_node", c_void_p, c_void_p, c_char_p, c_void_p, c_int, c_void_p, c_int, c_void_p,
             c_void_p, c_int, c_int, c_char_p)
    _declare(so, "pe_ht_combine_net", c_void_p, c_void_p, c_char_p, c_void_p, c_int, c_void_p, c_int, c_void_p,
             c_void_p, c_int, c_int, c_char_p)
    _declare(so, "pe_ht_sizes", None, c_void_p, c_void_p)
    _declare(so, "pe_ht_release_arena", c_int, c_void_p, c_char_p)
    _declare(so, "pe_ht_free", None, c_void_p)
    for name in ("shm", "fabric", "verbs", "efa"):
        if hasattr(so, f"pe_transport_{name}"):
            _declare(so, f"pe_transport_{name}", c_void_p)
    return so


_ERR_BUFFERS = threading.local()


def _err() -> ctypes.Array:
    """This thread's buffer for an engine call's error text, emptied (one per thread, reused)."""
    buf = getattr(_ERR_BUFFERS, "buf", None)
    if buf is None:
        buf = _ERR_BUFFERS.buf = ctypes.create_string_buffer(ERR_LEN)
    buf[0] = 0
    return buf


def _text(buf: ctypes.Array) -> str:
    return buf.value.decode(errors="replace")


# ------------------------------------------------------------------------------------- structs
class _Shm(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 96), ("base", c_void_p), ("len", c_size_t), ("owner", c_int)]


class _WindowStruct(ctypes.Structure):
    _fields_ = [("shm", _Shm), ("control", c_void_p), ("signals", c_void_p), ("data", c_void_p),
                ("num_signals", c_uint32), ("data_bytes", c_uint64)]


class _RingStruct(ctypes.Structure):
    _fields_ = [("head", c_void_p), ("tail", c_void_p), ("capacity", c_uint64), ("slots", c_void_p)]


_TRANSPORT_STATS = ["puts", "bytes", "signals", "signals_applied", "messages_in", "fragments", "stalls", "reordered",
                    "delayed", "dropped"]
_PROXY_STATS = ["steps", "descriptors", "posted", "coalesced", "max_queue_depth", "backlog", "idle_polls", "sleeps",
                "wakeups", "failed_peers", "helped_steps"]
_ENGINE_STATS = ["chunks_written", "chunks_read", "messages_sent", "messages_split", "bytes_direct", "bytes_staged",
                 "bytes_local", "descriptors", "credit_stalls", "sleeps", "arena_messages",
                 "bytes_pulled", "sums_at_end"]


def _stats_struct(names: Sequence[str]) -> type[ctypes.Structure]:
    return type("Stats", (ctypes.Structure,), {"_fields_": [(n, c_uint64) for n in names]})


_TransportStats = _stats_struct(_TRANSPORT_STATS)
_ProxyStats = type("ProxyStats", (ctypes.Structure,),
                   {"_fields_": [(n, c_uint64) for n in _PROXY_STATS] + [("transport", _TransportStats)]})
_EngineStats = _stats_struct(_ENGINE_STATS)


def segment_name(kind: str) -> str:
    """A fresh shared-memory segment name of this process."""
    return f"{SEGMENT_PREFIX}-{kind}-{os.getpid()}-{next(_names)}"


# ------------------------------------------------------------------------------------- windows
class Window:
    """One rank's window: signals and data in a shared-memory segment (see ``pe_window.h``)."""

    def __init__(self, struct: _WindowStruct) -> None:
        self._s = struct
        self.num_signals, self.data_bytes = struct.num_signals, struct.data_bytes

    @classmethod
    def create(cls, num_signals: int, data_bytes: int, name: str | None = None) -> Window:
        s, err = _WindowStruct(), _err()
        if lib().pe_window_create(ctypes.byref(s), (name or segment_name("win")).encode(), num_signals, data_bytes,
                                  err) != 0:
            raise EngineError(_text(err))
        return cls(s)

    @classmethod
    def attach(cls, name: str, num_signals: int, data_bytes: int) -> Window:
        s, err = _WindowStruct(), _err()
        if lib().pe_window_attach(ctypes.byref(s), name.encode(), num_signals, data_bytes, err) != 0:
            raise EngineError(_text(err))
        return cls(s)

    @property
    def ptr(self) -> int:
        return ctypes.addressof(self._s)

    @property
    def name(self) -> str:
        return self._s.shm.name.decode()

    @property
    def signals(self) -> np.ndarray:
        """The int64 counters (a view; read them for tests and diagnostics only)."""
        return np.ctypeslib.as_array((ctypes.c_int64 * self.num_signals).from_address(self._s.signals))

    @property
    def data(self) -> np.ndarray:
        """The data area as uint8 (a view)."""
        return np.ctypeslib.as_array((ctypes.c_uint8 * self.data_bytes).from_address(self._s.data))

    def signal(self, slot: int, value: int) -> None:
        """Raise counter ``slot`` by ``value`` (release), waking a sleeping rank."""
        lib().pe_window_signal(self.ptr, slot, value)

    def unlink(self) -> None:
        """Remove the segment's name (mappings stay): once every peer has mapped it."""
        lib().pe_shm_unlink(ctypes.byref(self._s.shm))

    def close(self) -> None:
        if self._s.shm.base:
            lib().pe_window_close(self.ptr)


# --------------------------------------------------------------------------------------- rings
class Ring:
    """A single-producer / single-consumer descriptor ring over a shared-memory segment."""

    def __init__(self, shm: _Shm, struct: _RingStruct) -> None:
        self._shm, self._s = shm, struct

    @classmethod
    def create(cls, capacity: int, name: str | None = None) -> Ring:
        shm, s, err = _Shm(), _RingStruct(), _err()
        so = lib()
        if so.pe_shm_create(ctypes.byref(shm), (name or segment_name("ring")).encode(), so.pe_ring_bytes(capacity),
                            err) != 0:
            raise EngineError(_text(err))
        if so.pe_ring_format(ctypes.byref(s), shm.base, capacity, err) != 0:
            so.pe_shm_close(ctypes.byref(shm))  # unlinks the segment it just made
            raise EngineError(_text(err))
        return cls(shm, s)

    @classmethod
    def attach(cls, name: str) -> Ring:
        shm, s, err = _Shm(), _RingStruct(), _err()
        so = lib()
        if so.pe_shm_attach(ctypes.byref(shm), name.encode(), err) != 0 or so.pe_ring_view(ctypes.byref(s), shm.base,
                                                                                             err) != 0:
            raise EngineError(_text(err))
        return cls(shm, s)

    @property
    def ptr(self) -> int:
        return ctypes.addressof(self._s)

    @property
    def name(self) -> str:
        return self._shm.name.decode()

    @property
    def capacity(self) -> int:
        return self._s.capacity

    def push(self, records: np.ndarray) -> int:
        """Append what fits of ``records`` (descriptor dtype); returns how many."""
        records = np.ascontiguousarray(records, dtype=DESCRIPTOR_DTYPE)
        return lib().pe_ring_push(self.ptr, records.ctypes.data, records.size)

    def pop(self, max_records: int) -> np.ndarray:
        out = np.empty(max_records, dtype=DESCRIPTOR_DTYPE)
        return out[: lib().pe_ring_pop(self.ptr, out.ctypes.data, max_records)]

    def pending(self) -> int:
        return lib().pe_ring_pending(self.ptr)

    def consume(self, count: int, timeout_s: float) -> tuple[int, float]:
        """Pop ``count`` descriptors in a compiled loop (benchmarks): how many, and the seconds from
        the first batch to the last."""
        seconds = c_double()
        taken = lib().pe_ring_consume(self.ptr, count, timeout_s, ctypes.byref(seconds))
        return taken, seconds.value

    @property
    def address(self) -> int:
        """Address of the ring's memory (head, tail, capacity, slots), e.g. to map it into a GPU."""
        return self._shm.base

    @property
    def nbytes(self) -> int:
        return self._shm.len

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unlink(self) -> None:
        lib().pe_shm_unlink(ctypes.byref(self._shm))

    def close(self) -> None:
        if self._shm.base:
            lib().pe_shm_close(ctypes.byref(self._shm))


# ----------------------------------------------------------------------------------- transports
def _load_ucx() -> ctypes.CDLL:
    try:
        import libucx

        libucx.load_library()  # libucp & co. from the wheel, so that the transport's library finds them
    except ImportError:
        pass
    so = ctypes.CDLL(_library_path("portep.native._ucx"))
    _declare(so, "pe_transport_ucx", c_void_p)
    return so


def transport_ops(name: str) -> int:
    """Address of the operations table of transport ``name`` (``shm``, ``fabric``, ``verbs``, ``efa``, ``ucx``)."""
    if name == "ucx":
        return _load_ucx().pe_transport_ucx()
    fn = getattr(lib(), f"pe_transport_{name}", None)
    if fn is None:
        raise EngineError(f"the compiled engine has no {name!r} transport")
    return fn()


def verbs_probe(efa: bool) -> str | None:
    """None when an RDMA device of that kind (EFA, or InfiniBand / RoCE) is usable, else why not."""
    so = lib()
    if not hasattr(so, "pe_verbs_probe"):
        return "the engine was built without the verbs transports"
    so.pe_verbs_probe.restype, so.pe_verbs_probe.argtypes = c_int, [c_int, c_char_p]
    err = _err()
    return None if so.pe_verbs_probe(int(efa), err) == 1 else _text(err)


class Proxy:
    """The compiled proxy thread and its transport (one per process, shared by every Buffer).

    ``stay_awake_us``: how long the idle thread keeps polling before it sleeps until woken. Ranks
    wake it after they push (a short time spares their cores); producers that cannot — a GPU
    kernel, another process — want a long one.
    """

    def __init__(self, transport: str, options: str = "", stay_awake_us: float = 50.0) -> None:
        err = _err()
        self.transport_name = transport
        self._lock = threading.Lock()  # stats are read from other threads (heartbeats): not during destroy
        self._p = lib().pe_proxy_create(transport_ops(transport), options.encode(), int(stay_awake_us * 1000), err)
        if not self._p:
            text = _text(err)
            raise EngineError(text if text.startswith(transport) else f"{transport} transport: {text}")

    @property
    def ptr(self) -> int:
        return self._p

    def address(self) -> bytes:
        buf, size, err = (c_uint8 * BLOB_MAX)(), c_size_t(), _err()
        if lib().pe_proxy_address(self._p, buf, BLOB_MAX, ctypes.byref(size), err) != 0:
            raise EngineError(_text(err))
        return bytes(buf[: size.value])

    def connect(self, address: bytes) -> int:
        """The peer id of the proxy at ``address`` (connected on first use)."""
        err = _err()
        peer = lib().pe_proxy_connect(self._p, (c_uint8 * len(address)).from_buffer_copy(address), len(address), err)
        if peer < 0:
            raise EngineError(_text(err))
        return peer

    def add_endpoint(self, ring: Ring, window: Window, world: int) -> tuple[int, bytes]:
        """Serve ``ring`` and register ``window``; returns the endpoint id and the window's key blob."""
        key, size, err = (c_uint8 * BLOB_MAX)(), c_size_t(), _err()
        ep = lib().pe_proxy_add_endpoint(self._p, ring.ptr, window.ptr, world, key, BLOB_MAX, ctypes.byref(size), err)
        if ep < 0:
            raise EngineError(_text(err))
        return ep, bytes(key[: size.value])

    def set_rank(self, endpoint: int, rank: int, peer: int, key: bytes) -> None:
        err = _err()
        if lib().pe_proxy_set_rank(self._p, endpoint, rank, peer, (c_uint8 * len(key)).from_buffer_copy(key),
                                   len(key), err) != 0:
            raise EngineError(_text(err))

    def remove_endpoint(self, endpoint: int, timeout_s: float) -> bool:
        """Drain and forget ``endpoint``; False if its deadline passed first."""
        return not self._p or lib().pe_proxy_remove_endpoint(self._p, endpoint, timeout_s) == 0

    def wake(self) -> None:
        if self._p:
            lib().pe_proxy_wake(self._p)

    def rank_failure(self, endpoint: int, rank: int) -> str | None:
        """Why group rank ``rank`` of ``endpoint`` is unreachable, or None."""
        err = _err()
        if not self._p:
            return "the proxy was stopped"
        return _text(err) if lib().pe_proxy_rank_status(self._p, endpoint, rank, err) != 0 else None

    def failure(self) -> str | None:
        err = _err()
        if not self._p:
            return "the proxy was stopped"
        return _text(err) if lib().pe_proxy_status(self._p, err) != 0 else None

    def break_rank(self, endpoint: int, rank: int) -> None:
        """Test hook: every later post toward ``rank`` fails as a broken link would."""
        lib().pe_proxy_break_rank(self._p, endpoint, rank)

    def stats(self) -> dict[str, int]:
        """The proxy's and its transport's counters (none once destroyed)."""
        s = _ProxyStats()
        with self._lock:
            if not self._p:
                return {}
            lib().pe_proxy_stats(self._p, ctypes.byref(s))
        out = {name: getattr(s, name) for name in _PROXY_STATS}
        out.update({f"transport_{name}": getattr(s.transport, name) for name in _TRANSPORT_STATS})
        return out

    def destroy(self, timeout_s: float = 2.0) -> None:
        with self._lock:
            if self._p:
                lib().pe_proxy_destroy(self._p, timeout_s)
                self._p = None


# ------------------------------------------------------------------------------ streams (engine)
#: pe_field_t, pe_segment_t, pe_send_t and pe_recv_t of ``pe_engine.h``
FIELD_DTYPE = np.dtype([("base", "<u8"), ("row_stride", "<i8"), ("elem_stride", "<i8"), ("block_rows", "<i8"),
                        ("block_stride", "<i8"), ("count", "<i4"), ("mem_type", "u1"), ("wire_type", "u1"),
                        ("kind", "u1"), ("flags", "u1")])
SEGMENT_DTYPE = np.dtype([("fields", "<u8"), ("index", "<u8"), ("first", "<i8"), ("nrows", "<i8"),
                          ("nfields", "<i4"), ("pad", "<i4"), ("group_end", "<u8"), ("weights", "<u8")])
SEND_DTYPE = np.dtype([("segments", "<u8"), ("counts", "<u8"), ("nsegments", "<i4"), ("pad", "<i4")])
RECV_DTYPE = np.dtype([("fields", "<u8"), ("index", "<u8"), ("weights", "<u8"), ("touched", "<u8"), ("first", "<i8"),
                       ("expect_rows", "<i8"), ("fanout", "<u8"), ("nfields", "<i4"), ("pad", "<i4"),
                       ("final", "<u8")])
FANOUT_DTYPE = np.dtype([("list_offset", "<i4"), ("list_count", "<i4"), ("nkeys", "<i4"), ("pad", "<i4"),
                         ("cursor", "<u8"), ("end", "<u8"), ("record", "<u8"), ("recorded", "<i8")])
FINAL_DTYPE = np.dtype([("remaining", "<u8"), ("fields", "<u8"), ("nfields", "<i4"), ("pad", "<i4")])
assert (FIELD_DTYPE.itemsize, SEGMENT_DTYPE.itemsize, SEND_DTYPE.itemsize, RECV_DTYPE.itemsize,
        FANOUT_DTYPE.itemsize, FINAL_DTYPE.itemsize) == (48, 56, 24, 72, 48, 24)

# enum pe_type / pe_kind
U8, I32, I64, BF16, F16, F32 = range(6)
GATHER, ROW_INDEX, SCATTER, REDUCE, SKIP = range(5)
FIELD_STREAM = 1  # pe_field_flag: non-temporal stores (a scatter into a caller's output, a first sum)
DROP_DEAD = 1


def _check(so_call_result: int, err: ctypes.Array, engine: Any) -> int:
    if so_call_result < 0:
        culprit = c_int32(-1)
        kind = lib().pe_engine_error(engine, ctypes.byref(culprit))
        raise EngineError(_text(err), kind or EngineError.USAGE, culprit.value)
    return so_call_result


class Exchange:
    """One exchange in flight (``pe_exchange_t``); keeps alive what its specs point to."""

    def __init__(self, engine: Engine, handle: int, npeers: int, ncounts: int, keep: list[Any]) -> None:
        self.engine, self._x, self.npeers, self.ncounts, self._keep = engine, handle, npeers, ncounts, keep

    def headers(self, wait_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Rows and int32 ``[npeers, ncounts]`` counts every peer sends, once all headers arrived
        (None if ``wait_s`` passed first)."""
        rows = np.zeros(self.npeers, dtype=np.int64)
        counts = np.zeros((self.npeers, max(self.ncounts, 1)), dtype=np.int32)
        err = _err()
        rc = _check(lib().pe_exchange_headers(self._x, wait_s, rows.ctypes.data_as(POINTER(c_int64)),
                                              counts.ctypes.data_as(POINTER(c_int32)), err), err, self.engine.ptr)
        return None if rc else (rows, counts[:, : self.ncounts])

    def headers_arrived(self, wait_s: float) -> bool:
        """True once every peer's header arrived; False if ``wait_s`` passed first."""
        err = _err()
        return _check(lib().pe_exchange_wait_headers(self._x, wait_s, err), err, self.engine.ptr) == 0

    def push(self) -> None:
        """One pass of progress without waiting: the rows leave as far as credits allow."""
        err = _err()
        _check(lib().pe_exchange_push(self._x, err), err, self.engine.ptr)

    def set_recv(self, recvs: np.ndarray, keep: list[Any]) -> None:
        err = _err()
        self._keep.extend(keep)
        _check(lib().pe_exchange_set_recv(self._x, recvs.ctypes.data, err), err, self.engine.ptr)
        self._keep.append(recvs)

    def wait(self, wait_s: float) -> bool:
        """True once the exchange completed; False if ``wait_s`` passed first."""
        err = _err()
        return _check(lib().pe_exchange_wait(self._x, wait_s, err), err, self.engine.ptr) == 0

    def describe(self) -> tuple[np.ndarray, str]:
        """Per peer: 1 still to send to, 2 still to receive from; and what is missing, in words."""
        state, text = np.zeros(self.npeers, dtype=np.int32), ctypes.create_string_buffer(4096)
        lib().pe_exchange_describe(self._x, state.ctypes.data_as(POINTER(c_int32)), text, 4096)
        return state, _text(text)

    def dropped(self) -> np.ndarray:
        out = np.zeros(self.npeers, dtype=np.int32)
        lib().pe_exchange_dropped(self._x, out.ctypes.data_as(POINTER(c_int32)))
        return out

    def free(self) -> None:
        if self._x:
            lib().pe_exchange_free(self._x)
            self._x = None
            self._keep = []


class Engine:
    """A rank's streams for one Buffer (``pe_engine_t``)."""

    def __init__(self, rank: int, world: int, slots: int, chunk_bytes: int, window: Window,
                 arena_bytes: int = 0, ranks_per_node: int = 1) -> None:
        err = _err()
        self.rank, self.world, self.window = rank, world, window
        self._e = lib().pe_engine_create(rank, world, slots, chunk_bytes, arena_bytes, ranks_per_node, window.ptr, err)
        if not self._e:
            raise EngineError(_text(err))
        self._peers: dict[int, Any] = {}  # what the engine points to, kept alive
        self._lock = threading.Lock()  # stats are read from other threads (heartbeats): not during destroy

    @staticmethod
    def window_size(world: int, slots: int, chunk_bytes: int, arena_bytes: int = 0,
                    ranks_per_node: int = 1) -> tuple[int, int]:
        """(signals, data bytes) of the window an engine of this layout needs (``arena_bytes``: where
        the network-hop rows from each other node land, see ``PE_ARENA``)."""
        so = lib()
        return so.pe_engine_num_signals(world), so.pe_engine_data_bytes(world, slots, chunk_bytes, arena_bytes,
                                                                         ranks_per_node)

    @property
    def ptr(self) -> int:
        return self._e

    def set_direct(self, peer: int, window: Window) -> None:
        err = _err()
        _check(lib().pe_engine_set_direct(self._e, peer, window.ptr, err), err, self._e)
        self._peers[peer] = window

    def set_proxied(self, peer: int, proxy: Proxy, endpoint: int, ring: Ring) -> None:
        err = _err()
        _check(lib().pe_engine_set_proxied(self._e, peer, proxy.ptr, endpoint, ring.ptr, err), err, self._e)
        self._peers[peer] = (proxy, ring)

    def start(self, op: str, peers: np.ndarray, sends: np.ndarray, row_bytes: int, ncounts: int,
              recvs: np.ndarray | None, drop_dead: bool, keep: list[Any]) -> Exchange:
        """Start an exchange (see ``pe_exchange_start``); ``keep`` holds what the specs point to."""
        err = _err()
        peers = np.ascontiguousarray(peers, dtype=np.int32)
        handle = lib().pe_exchange_start(self._e, op.encode(), peers.size, peers.ctypes.data_as(POINTER(c_int32)),
                                         sends.ctypes.data, row_bytes, ncounts,
                                         recvs.ctypes.data if recvs is not None else None,
                                         DROP_DEAD if drop_dead else 0, err)
        if not handle:
            _check(-1, err, self._e)
        return Exchange(self, handle, peers.size, ncounts, [*keep, sends, recvs])

    def drop(self, peer: int) -> None:
        """Give up on a dead peer (see ``pe_engine_drop``)."""
        lib().pe_engine_drop(self._e, peer)

    def drain(self, skip: Sequence[int], timeout_s: float) -> int:
        """Wait until peers (but ``skip``) consumed everything sent to them; returns how many still owe."""
        mask = np.zeros(self.world, dtype=np.int32)
        mask[list(skip)] = 1
        return lib().pe_engine_drain(self._e, mask.ctypes.data_as(POINTER(c_int32)), timeout_s)

    def stats(self) -> dict[str, int]:
        """The engine's counters (none once destroyed)."""
        s = _EngineStats()
        with self._lock:
            if not self._e:
                return {}
            lib().pe_engine_stats(self._e, ctypes.byref(s))
        return {name: getattr(s, name) for name in _ENGINE_STATS}

    def destroy(self) -> None:
        with self._lock:
            if self._e:
                lib().pe_engine_destroy(self._e)
                self._e = None
                self._peers.clear()


class LLRoute:
    """An LL dispatch run by the engine (``pe_ll_t``): the routing and the placement of its rows,
    which its combine reuses. Made by :meth:`dispatch`."""

    def __init__(self, engine: Engine, ptr: int) -> None:
        self.engine, self._ll = engine, ptr
        self.tokens = 0  # the dispatch's tokens
        self._free = weakref.finalize(self, lib().pe_ll_free, ptr)
        self._send_counts: np.ndarray | None = None

    @classmethod
    def dispatch(cls, engine: Engine, op: str, npeers: int, topk_idx: Any, num_experts: int, masked: Any,
                 shape: np.ndarray, fields: np.ndarray, drop_dead: bool, keep: list[Any]) -> tuple[LLRoute, Exchange]:
        """Route ``topk_idx`` (int64 CPU tensor ``[tokens, topk]``) and send every token once to each
        of the ``npeers`` ranks not ``masked`` (uint8 tensor per rank, or None) that own experts it
        selected (``fields``: gather fields, source row = token; the engine appends the list of those
        experts); returns the route and the dispatch's exchange."""
        err = _err()
        tokens, topk = topk_idx.shape
        ptr = lib().pe_ll_dispatch(engine.ptr, op.encode(), topk_idx.data_ptr(), tokens, topk, num_experts,
                                   masked.data_ptr() if masked is not None else None, shape.ctypes.data,
                                   fields.ctypes.data, fields.size, DROP_DEAD if drop_dead else 0, err)
        if not ptr:
            _check(-1, err, engine.ptr)
        route = cls(engine, ptr)
        route.tokens = tokens
        return route, Exchange(engine, lib().pe_ll_exchange(ptr), npeers, 0, [*keep, fields, shape, route])

    def send_counts(self) -> np.ndarray:
        """Selections sent to each rank (int64 ``[world]``; do not modify)."""
        if self._send_counts is None:
            self._send_counts = np.zeros(self.engine.world, dtype=np.int64)
            lib().pe_ll_send_counts(self._ll, self._send_counts.ctypes.data)
        return self._send_counts

    def wire_rows(self) -> np.ndarray:
        """Rows on the wire to each rank (int64 ``[world]``): a token once per rank it selected."""
        out = np.zeros(self.engine.world, dtype=np.int64)
        lib().pe_ll_wire_rows(self._ll, out.ctypes.data)
        return out

    def receive(self, exchange: Exchange, fields: np.ndarray, slots: int, ignore: np.ndarray, layout_range: Any,
                expert_count: Any, keep: list[Any]) -> None:
        """Once every header arrived: lay the rows out (``fields``: scatter fields over the
        ``[local * slots]`` output rows) and write ``layout_range`` / ``expert_count``. A peer that
        called with another shape raises ValueError naming it."""
        err, bad = _err(), c_int32(-1)
        rc = lib().pe_ll_dispatch_recv(self._ll, fields.ctypes.data, fields.size, slots, ignore.ctypes.data,
                                       layout_range.data_ptr(), expert_count.data_ptr(), ctypes.byref(bad), err)
        if rc == -2:
            raise ValueError(_text(err))
        _check(rc, err, self.engine.ptr)
        exchange._keep.extend([*keep, fields])

    def combine(self, op: str, npeers: int, send_fields: np.ndarray, topk_weights: Any, weights: Any,
                acc_fields: np.ndarray, touched: Any, masked: Any, drop_dead: bool, keep: list[Any],
                final_fields: np.ndarray | None = None) -> Exchange:
        """Start the combine of this (received) dispatch (see ``pe_ll_combine``); with
        ``final_fields`` (scatter fields over the result rows), each token's last row writes its
        sum there."""
        err = _err()
        final, kept = self._final(final_fields)
        handle = lib().pe_ll_combine(self.engine.ptr, self._ll, op.encode(), send_fields.ctypes.data,
                                     send_fields.size, topk_weights.data_ptr(), weights.data_ptr(),
                                     acc_fields.ctypes.data, acc_fields.size, touched.data_ptr(),
                                     masked.data_ptr() if masked is not None else None,
                                     final.ctypes.data if final is not None else None, DROP_DEAD if drop_dead else 0,
                                     err)
        if not handle:
            _check(-1, err, self.engine.ptr)
        return Exchange(self.engine, handle, npeers, 0, [*keep, *kept, send_fields, acc_fields, topk_weights, weights,
                                                    touched, self])

    def combine_weights(self, op: str, npeers: int, topk_weights: Any, masked: Any, drop_dead: bool) -> Exchange:
        """First step of a combine summed on the expert side (see ``pe_ll_combine_weights``): the
        weights of this rank's selections (float32 ``[tokens, topk]``) go to their experts' ranks."""
        err = _err()
        handle = lib().pe_ll_combine_weights(self.engine.ptr, self._ll, op.encode(), topk_weights.data_ptr(),
                                             masked.data_ptr() if masked is not None else None,
                                             DROP_DEAD if drop_dead else 0, err)
        if not handle:
            _check(-1, err, self.engine.ptr)
        return Exchange(self.engine, handle, npeers, 0, [topk_weights, masked, self])

    def combine_sums(self, op: str, npeers: int, send_fields: np.ndarray, acc_fields: np.ndarray, touched: Any,
                     masked: Any, ignore: np.ndarray, drop_dead: bool, keep: list[Any],
                     final_fields: np.ndarray | None = None) -> Exchange:
        """Second step, once the weights arrived (see ``pe_ll_combine_sums``): each source gets one
        weighted sum per token back, reduced here into ``acc_fields`` (``final_fields`` as in
        :meth:`combine`); sources in ``ignore`` (uint8 per rank) are sent nothing."""
        err = _err()
        final, kept = self._final(final_fields)
        handle = lib().pe_ll_combine_sums(self.engine.ptr, self._ll, op.encode(), send_fields.ctypes.data,
                                          send_fields.size, acc_fields.ctypes.data, acc_fields.size,
                                          touched.data_ptr(), masked.data_ptr() if masked is not None else None,
                                          ignore.ctypes.data, final.ctypes.data if final is not None else None,
                                          DROP_DEAD if drop_dead else 0, err)
        if not handle:
            _check(-1, err, self.engine.ptr)
        return Exchange(self.engine, handle, npeers, 0, [*keep, *kept, send_fields, acc_fields, touched, ignore,
                                                    self])

    def _final(self, final_fields: np.ndarray | None) -> tuple[np.ndarray | None, list[Any]]:
        """A ``pe_final_t`` over ``final_fields`` (its countdowns written by the engine), and what it
        points to, to keep alive with the exchange."""
        if final_fields is None:
            return None, []
        remaining = np.empty(max(self.tokens, 1), dtype=np.int32)
        final = np.zeros(1, dtype=FINAL_DTYPE)
        final[0] = (remaining.ctypes.data, final_fields.ctypes.data, final_fields.size, 0)
        return final, [remaining, final, final_fields]


def _optional_fields(fields: np.ndarray | None) -> tuple[int | None, int]:
    return (None, 0) if fields is None else (fields.ctypes.data, fields.size)


class HTRoute:
    """An HT dispatch run by the engine (``pe_ht_t``): its network hop, then its node hop, with the
    index maps built by the engine and kept for cached dispatches and combines. Made by :meth:`dispatch`;
    each step returns the exchange it started (None where there is none: no network hop on one node)."""

    NET_SENT, HOP_ROWS, NODE_SENT, NODE_RECEIVED = range(4)

    def __init__(self, engine: Engine, ptr: int, per_node: int) -> None:
        self.engine, self._ht, self.per_node = engine, ptr, per_node
        self.nodes = engine.world // per_node
        self._free = weakref.finalize(self, lib().pe_ht_free, ptr)
        self.num_recv = -1

    def _exchange(self, handle: int | None, npeers: int, ncounts: int, keep: list[Any]) -> Exchange | None:
        return Exchange(self.engine, handle, npeers, ncounts, [*keep, self]) if handle else None

    @classmethod
    def dispatch(cls, engine: Engine, op: str, per_node: int, in_rank: Any, fields: np.ndarray, mask_field: int,
                 keep: list[Any]) -> tuple[HTRoute, Exchange | None]:
        """Route ``in_rank`` (uint8 CPU tensor ``[tokens, world]``) and start the network hop of
        ``fields`` (gather fields, source row = token; field ``mask_field`` carries the routing)."""
        err, x = _err(), c_void_p()
        ptr = lib().pe_ht_dispatch(engine.ptr, op.encode(), per_node, in_rank.data_ptr(), in_rank.size(0),
                                   fields.ctypes.data, fields.size, mask_field, 0, ctypes.byref(x), err)
        if not ptr:
            _check(-1, err, engine.ptr)
        route = cls(engine, ptr, per_node)
        return route, route._exchange(x.value, route.nodes, 0, [*keep, fields, in_rank])

    def hop_receive(self, exchange: Exchange) -> None:
        """Once the network hop's headers arrived: land its rows in the route's own buffer."""
        err = _err()
        _check(lib().pe_ht_hop_receive(self._ht, exchange._x, err), err, self.engine.ptr)

    def cached(self, op: str, fields: np.ndarray, keep: list[Any]) -> Exchange | None:
        """Start the network hop of a cached dispatch of ``fields`` along this route."""
        err, x = _err(), c_void_p()
        _check(lib().pe_ht_cached(self._ht, op.encode(), fields.ctypes.data, fields.size, 0, ctypes.byref(x), err),
               err, self.engine.ptr)
        return self._exchange(x.value, self.nodes, 0, [*keep, fields])

    def forward(self, op: str, fields: np.ndarray, keep: list[Any]) -> Exchange:
        """Start the node hop (``fields``: gather fields over the caller's tensors)."""
        err = _err()
        handle = lib().pe_ht_forward(self._ht, op.encode(), fields.ctypes.data, fields.size, 0, err)
        if not handle:
            _check(-1, err, self.engine.ptr)
        return self._exchange(handle, self.per_node, 3 * self.nodes, [*keep, fields])

    def release_arena(self) -> None:
        """Once the node hop completed: hand the arenas its rows were read from back to their senders."""
        err = _err()
        _check(lib().pe_ht_release_arena(self._ht, err), err, self.engine.ptr)

    def node_rows(self, exchange: Exchange) -> int:
        """Once the node hop's headers arrived: the rows this rank receives."""
        err = _err()
        self.num_recv = _check(lib().pe_ht_node_rows(self._ht, exchange._x, err), err, self.engine.ptr)
        return self.num_recv

    def node_receive(self, exchange: Exchange, fields: np.ndarray, keep: list[Any]) -> None:
        """Then: scatter them (``fields``) into the output rows, grouped by source rank."""
        err = _err()
        exchange._keep.extend([*keep, fields])
        _check(lib().pe_ht_node_receive(self._ht, exchange._x, fields.ctypes.data, fields.size, err), err,
               self.engine.ptr)

    def combine_node(self, op: str, send_fields: np.ndarray, acc_fields: np.ndarray, touched: Any,
                     final_fields: np.ndarray | None, keep: list[Any]) -> Exchange:
        """Start a combine's node hop (see ``pe_ht_combine_node``)."""
        err = _err()
        handle = lib().pe_ht_combine_node(self._ht, op.encode(), send_fields.ctypes.data, send_fields.size,
                                          acc_fields.ctypes.data, acc_fields.size, touched.data_ptr(),
                                          *_optional_fields(final_fields), 0, err)
        if not handle:
            _check(-1, err, self.engine.ptr)
        return self._exchange(handle, self.per_node, 0, [*keep, send_fields, acc_fields, touched, final_fields])

    def combine_net(self, op: str, send_fields: np.ndarray, acc_fields: np.ndarray, touched: Any,
                    final_fields: np.ndarray | None, keep: list[Any]) -> Exchange | None:
        """Start a combine's network hop (None on one node; see ``pe_ht_combine_net``)."""
        err = _err()
        handle = lib().pe_ht_combine_net(self._ht, op.encode(), send_fields.ctypes.data, send_fields.size,
                                         acc_fields.ctypes.data, acc_fields.size, touched.data_ptr(),
                                         *_optional_fields(final_fields), 0, err)
        if not handle and err.value:
            _check(-1, err, self.engine.ptr)
        return self._exchange(handle, self.nodes, 0, [*keep, send_fields, acc_fields, touched, final_fields])

    def sizes(self) -> np.ndarray:
        """int64 ``[4]``: rows sent over the network, landed from it, sent to the node's other ranks
        and received from them (indices ``NET_SENT`` ...)."""
        out = np.zeros(4, dtype=np.int64)
        lib().pe_ht_sizes(self._ht, out.ctypes.data)
        return out


def cast_f32(dst_ptr: int, dst_type: int, src_ptr: int, count: int) -> None:
    """``count`` float32 values at ``src_ptr`` to ``dst_type`` at ``dst_ptr`` (the end of a combine)."""
    lib().pe_cast_f32(dst_ptr, dst_type, src_ptr, count)


def finish_rows(dst_ptr: int, dst_type: int, acc_ptr: int, touched_ptr: int, rows: int, width: int) -> None:
    """float32 sums to ``dst_type``, zeros for the rows not touched (see ``pe_finish_rows``)."""
    lib().pe_finish_rows(dst_ptr, dst_type, acc_ptr, touched_ptr, rows, width)


def fp8_cast(x_ptr: int, x_type: int, rows: int, hidden: int, row_stride: int, out_ptr: int, scales_ptr: int,
             round_scale: bool) -> None:
    """Per-token, per-128-channel e4m3 cast (see ``pe_fp8_cast``): one pass, no temporaries."""
    lib().pe_fp8_cast(x_ptr, x_type, rows, hidden, row_stride, out_ptr, scales_ptr, int(round_scale))


def rows_by_column(mask_ptr: int, rows: int, cols: int, index_ptr: int, counts_ptr: int) -> int:
    """Row indices of a byte mask's set entries by (column, row) (see ``pe_rows_by_column``)."""
    return lib().pe_rows_by_column(mask_ptr, rows, cols, index_ptr, counts_ptr)


def ht_positions(counts_ptr: int, per_node: int, nodes: int, positions_ptr: int) -> None:
    """Where an HT node hop's rows land (see ``pe_ht_positions``)."""
    lib().pe_ht_positions(counts_ptr, per_node, nodes, positions_ptr)


def ht_local_routing(topk_idx_ptr: int, weights_ptr: int, rows: int, topk: int, first_expert: int, local: int,
                     local_idx_ptr: int, local_weights_ptr: int, per_expert_ptr: int) -> None:
    """A dispatch's routing as local expert ids (see ``pe_ht_local_routing``)."""
    lib().pe_ht_local_routing(topk_idx_ptr, weights_ptr or None, rows, topk, first_expert, local, local_idx_ptr,
                              local_weights_ptr or None, per_expert_ptr)


def ll_route(topk_idx_ptr: int, tokens: int, topk: int, num_experts: int, num_ranks: int, masked_ptr: int,
             token_ptr: int, k_ptr: int, counts_ptr: int) -> int:
    """The selections an LL dispatch sends, by (rank, local expert, token) (see ``pe_ll_route``)."""
    return lib().pe_ll_route(topk_idx_ptr, tokens, topk, num_experts, num_ranks, masked_ptr or None, token_ptr,
                             k_ptr, counts_ptr)


def ll_place(counts_ptr: int, num_ranks: int, local: int, slots: int, positions_ptr: int, layout_range_ptr: int,
             expert_count_ptr: int) -> None:
    """Where an LL dispatch's received rows land (see ``pe_ll_place``)."""
    lib().pe_ll_place(counts_ptr, num_ranks, local, slots, positions_ptr, layout_range_ptr, expert_count_ptr)
