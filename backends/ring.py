"""The ring backend: portep's own data path (DESIGN: the control/data-plane split), driven by the
compiled engine (:mod:`portep.native.engine`).

Each rank of a Buffer owns a shared-memory window and a descriptor ring; the engine moves rows as
credit-based streams between windows (see ``native/engine/pe_engine.h``):

* to a rank on the same node, the rank's engine gathers the rows straight into the peer's window
  (what NVLink / xGMI stores do on a GPU), and the peer scatters or reduces them straight out of it;
* to a rank on another node, it gathers them into its own staging slots and writes one PUT_SIGNAL
  descriptor per chunk into its ring; the process's proxy thread posts it on the transport, and
  the signal is applied on the far side only once every byte it guards has landed.

This module is the Python side of that: rendezvous on the control plane, plans turned into the
engine's specs, the waits (with the deadline and the liveness checks that name a dead rank), stats
and teardown. With ``PORTEP_FAULTS`` set, every peer goes through the proxy and the software fabric,
so that the faults touch every byte (a one-node job included).
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from portep.deadlines import number_from_env
from portep.errors import CommTimeoutError, PeerFailureError, PortepError, TransportError
from portep.memory import POOL
from portep.native import engine as native
from portep.proxy import service
from portep.proxy.session import session_for
from portep.topology import Topology

from .base import CommBackend, PendingRows
from .plan import Gather, Plan, Receive, RowLayout, WireColumn, apply_rows, pack_rows

CHUNK_ENV = "PORTEP_CHUNK_BYTES"
SLOTS_ENV = "PORTEP_CHUNK_SLOTS"
DEFAULT_CHUNK_BYTES = 256 << 10
DEFAULT_SLOTS = 8
ARENA_ENV = "PORTEP_ARENA_BYTES"
# Per other node: where an HT dispatch's network-hop rows from it land, for this node's ranks to copy
# theirs out (sparse shared memory, resident only where written). A larger message goes through the
# slots instead.
DEFAULT_ARENA_BYTES = 64 << 20
MAX_ARENA_BYTES = 1 << 36  # the engine's bound
EXPERT_SUMS_ENV = "PORTEP_LL_EXPERT_SUMS"  # 0: an LL combine returns one row per selection
RING_CAPACITY = 4096
WAIT_SLICE_S = 0.05  # how long one engine wait runs before the liveness checks look again
FAILURE_POLL_S = 0.25  # how often a waiting rank asks the control plane whether a peer gave up
CLOSE_DRAIN_S = 10.0  # the longest close() waits for peers to consume this rank's last messages

T = TypeVar("T")

_TYPES = {torch.uint8: native.U8, torch.int8: native.U8, torch.bool: native.U8, torch.float8_e4m3fn: native.U8,
          torch.int32: native.I32, torch.int64: native.I64, torch.bfloat16: native.BF16, torch.float16: native.F16,
          torch.float32: native.F32}


def stream_layout_from_env() -> tuple[int, int]:
    """(chunk bytes, slots per pair of ranks) of the streams: ``PORTEP_CHUNK_BYTES``, ``PORTEP_CHUNK_SLOTS``."""
    chunk = int(number_from_env(CHUNK_ENV, DEFAULT_CHUNK_BYTES, kind=int, minimum=4096, unit="bytes"))
    slots = int(number_from_env(SLOTS_ENV, DEFAULT_SLOTS, kind=int, minimum=1, unit="slots"))
    if chunk % 64:
        raise ValueError(f"{CHUNK_ENV}={chunk} must be a multiple of 64")
    if slots > 13:
        raise ValueError(f"{SLOTS_ENV}={slots}: at most 13 slots per pair of ranks")
    return chunk, slots


def arena_bytes_from_env() -> int:
    """Bytes of the arena each other node's network-hop rows land in: ``PORTEP_ARENA_BYTES`` (0: none)."""
    arena = int(number_from_env(ARENA_ENV, DEFAULT_ARENA_BYTES, kind=int, minimum=0, unit="bytes"))
    if arena > MAX_ARENA_BYTES:
        raise ValueError(f"{ARENA_ENV}={arena}: at most {MAX_ARENA_BYTES} bytes per node")
    return -(-arena // 64) * 64


# ----------------------------------------------------------------------------- plans -> engine specs
def _skip(nbytes: int) -> tuple:
    return (0, 0, 1, 0, 0, nbytes, native.U8, native.U8, native.SKIP, 0)


def _field(column: torch.Tensor, wire: WireColumn, kind: int) -> tuple:
    size = column.element_size()
    mem, wire_type = _TYPES[column.dtype], _TYPES[wire.dtype]
    if column.dim() == 3:
        block_rows, block_stride = column.size(1), column.stride(0) * size
        row_stride, elem_stride = column.stride(1) * size, column.stride(2) * size
    else:
        block_rows = block_stride = 0
        row_stride = column.stride(0) * size
        elem_stride = column.stride(1) * size if column.dim() == 2 else size
    flags = native.FIELD_STREAM if kind == native.SCATTER else 0  # what is scattered here are the caller's outputs
    return (column.data_ptr(), row_stride, elem_stride, block_rows, block_stride, wire.width, mem, wire_type, kind,
            flags)


def _fields(layout: RowLayout, columns: Sequence[torch.Tensor | None], kind: int) -> np.ndarray:
    rows, at = [], 0
    for column, wire, offset in zip(columns, layout.columns, layout.offsets, strict=True):
        if offset > at:
            rows.append(_skip(offset - at))
        rows.append(_skip(wire.nbytes) if column is None else _field(column, wire, kind))
        at = offset + wire.nbytes
    if layout.row_bytes > at:
        rows.append(_skip(layout.row_bytes - at))
    return np.array(rows, dtype=native.FIELD_DTYPE)


def _index(index: torch.Tensor | None, keep: list[Any]) -> int:
    if index is None:
        return 0
    index = index.to(torch.int64).contiguous()
    keep.append(index)
    return index.data_ptr()


_FIELD_ARRAYS: dict[tuple, np.ndarray] = {}  # field arrays by what they describe (addresses, no tensor)


def cached_fields(layout: RowLayout, columns: Sequence[torch.Tensor | None], kind: int) -> np.ndarray:
    """:func:`_fields`, kept by the columns' addresses, types, shapes and strides: the tensors of
    an exchange mostly come from the pool or the caller's steady buffers and sit where the last
    call's did. Treat the array as read-only."""
    key = (kind, layout.columns, tuple(None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride())
                                       for t in columns))
    fields = _FIELD_ARRAYS.get(key)
    if fields is None:
        if len(_FIELD_ARRAYS) > 256:
            _FIELD_ARRAYS.clear()
        fields = _FIELD_ARRAYS[key] = _fields(layout, columns, kind)
    return fields


class _FieldCache:
    """Field arrays by the identity of their column sequence: the segments of one exchange usually
    share their columns (every peer's rows come from the same tensors), so each is looked up once.
    Returns (address, number of fields)."""

    def __init__(self, layout: RowLayout, kind: int, keep: list[Any]) -> None:
        self.layout, self.kind, self.keep = layout, kind, keep
        self.arrays: dict[int, tuple[int, int]] = {}

    def __call__(self, columns: Sequence[torch.Tensor | None]) -> tuple[int, int]:
        key = id(columns)
        found = self.arrays.get(key)
        if found is None:
            fields = cached_fields(self.layout, columns, self.kind)
            found = self.arrays[key] = (fields.ctypes.data, fields.size)
            self.keep.extend((columns, fields))  # the id stays unique while both live
        return found


def _sends(plan: Plan, scope_indices: list[int], keep: list[Any]) -> np.ndarray:
    sends = np.zeros(len(scope_indices), dtype=native.SEND_DTYPE)
    counts_at = counts_row = 0
    if plan.counts is not None:
        counts = plan.counts.to(torch.int32).contiguous()
        keep.append(counts)
        counts_at, counts_row = counts.data_ptr(), counts.stride(0) * 4
    fields_of = _FieldCache(plan.layout, native.GATHER, keep)
    per_peer = [[g for g in plan.sends[p] if g.rows] for p in scope_indices]
    rows = []
    for gathers in per_peer:
        for gather in gathers:
            fields, nfields = fields_of(gather.columns)
            rows.append((fields, _index(gather.index, keep), gather.first, gather.rows, nfields, 0, 0, 0))
    segments = np.array(rows, dtype=native.SEGMENT_DTYPE) if rows else np.zeros(1, dtype=native.SEGMENT_DTYPE)
    keep.append(segments)
    at, size = segments.ctypes.data, native.SEGMENT_DTYPE.itemsize
    entries = []
    for p, gathers in zip(scope_indices, per_peer, strict=True):
        entries.append((at if gathers else 0, counts_at + p * counts_row if counts_at else 0, len(gathers), 0))
        at += len(gathers) * size
    sends[:] = entries
    return sends


def _recvs(layout: RowLayout, receives: Sequence[Receive | None], scope_indices: list[int], known: list[int] | None,
           keep: list[Any]) -> np.ndarray:
    """The engine's receive specs. Every spec that writes rows has an exact row count (the index's
    length, or the header's), so a peer that sends more than expected fails instead of writing past
    the destination."""
    fields_of = {kind: _FieldCache(layout, kind, keep) for kind in (native.SCATTER, native.REDUCE)}
    skip = [None] * len(layout.columns)
    entries = []
    for p in scope_indices:
        receive = receives[p] or Receive(skip)
        rows = receive.rows if receive.rows is not None else receive.index.numel() if receive.index is not None \
            else known[p] if known is not None else None
        if rows is None and any(c is not None for c in receive.columns):
            raise ValueError("a receive without an index needs its row count (or the headers first)")
        fields, nfields = fields_of[native.REDUCE if receive.reduce else native.SCATTER](receive.columns)
        weights = touched = 0
        if receive.weights is not None:
            w = receive.weights.to(torch.float32).contiguous()
            keep.append(w)
            weights = w.data_ptr()
        if receive.touched is not None:
            if receive.touched.dtype != torch.uint8 or not receive.touched.is_contiguous():
                raise ValueError("Receive.touched must be a contiguous uint8 tensor")
            keep.append(receive.touched)
            touched = receive.touched.data_ptr()
        entries.append((fields, _index(receive.index, keep), weights, touched, receive.first,
                        -1 if rows is None else rows, 0, nfields, 0, 0))
    return np.array(entries, dtype=native.RECV_DTYPE)


def _on_device(plan: Plan) -> torch.device | None:
    """The device of the plan's tensors when it is not the CPU (the engine reads host memory)."""
    for gathers in plan.sends:
        for gather in gathers:
            for column in gather.columns:
                if column.device.type != "cpu":
                    return column.device
    return None


# ----------------------------------------------------------------------------- pending exchanges
class _RingPending(PendingRows):
    """A plan in the engine. ``scope_indices``: the scope positions of the exchange's peers."""

    def __init__(self, backend: RingBackend, plan: Plan, exchange: native.Exchange, scope_indices: list[int],
                 scope_ranks: list[int]) -> None:
        self.backend, self.plan, self.exchange = backend, plan, exchange
        self.scope_indices, self.scope_ranks = scope_indices, scope_ranks
        self._headers: tuple[list[int], torch.Tensor] | None = None
        self._dropped: frozenset[int] = frozenset()
        self.done = False

    def headers(self) -> tuple[list[int], torch.Tensor]:
        if self._headers is None:
            got = self.backend.wait(self.plan.op, self, lambda s: self.exchange.headers(s))
            rows, counts = got
            scope = len(self.scope_ranks)
            all_rows = [0] * scope
            all_counts = torch.zeros(scope, self.plan.num_counts, dtype=torch.int32)
            for i, p in enumerate(self.scope_indices):
                all_rows[p] = int(rows[i])
            all_counts[self.scope_indices] = torch.from_numpy(counts.copy())
            self._headers = (all_rows, all_counts)
        return self._headers

    def receive(self, receives: list[Receive | None]) -> None:
        keep: list[Any] = []
        known = self._headers[0] if self._headers is not None else None
        recvs = _recvs(self.plan.layout, receives, self.scope_indices, known, keep)
        self.backend.guarded(self.plan.op, lambda: self.exchange.set_recv(recvs, keep))

    def wait(self) -> None:
        if not self.done:
            self.backend.wait(self.plan.op, self, lambda s: True if self.exchange.wait(s) else None)
            self._dropped = self.dropped
            self.done = True
            self.exchange.free()

    @property
    def dropped(self) -> frozenset[int]:
        if self.done or not self.plan.drop_dead:  # only shrink-mode exchanges drop peers
            return self._dropped
        flags = self.exchange.dropped()
        return frozenset(self.scope_ranks[p] for i, p in enumerate(self.scope_indices) if flags[i])

    def pending_ranks(self) -> tuple[set[int], str]:
        state, text = self.exchange.describe()
        return {self.scope_ranks[p] for i, p in enumerate(self.scope_indices) if state[i]}, text

    def excluded(self) -> frozenset[int]:
        return self.plan.exclude


class _EnginePending(_RingPending):
    """An exchange the engine started and places itself: an LL dispatch or combine, a hop of an
    HT one (see :meth:`RingBackend.ll_dispatch`, :meth:`RingBackend.ht_dispatch`)."""

    def headers(self) -> tuple[list[int], torch.Tensor]:
        raise NotImplementedError("the engine reads this exchange's headers itself")

    def wait_headers(self) -> None:
        self.backend.wait(self.plan.op, self, lambda s: True if self.exchange.headers_arrived(s) else None)

    def receive(self, receives: list[Receive | None]) -> None:
        raise NotImplementedError("the engine places this exchange's rows itself")


class _SteppedPending(PendingRows):
    """Two engine exchanges, one after the other: ``then`` starts the second once the first
    completed, given the ranks dropped from it."""

    def __init__(self, first: _EnginePending, then: Callable[[frozenset[int]], _EnginePending]) -> None:
        self.first: _EnginePending | None = first
        self.second: _EnginePending | None = None
        self.then = then

    def headers(self) -> tuple[list[int], torch.Tensor]:
        raise NotImplementedError("the engine reads this exchange's headers itself")

    def receive(self, receives: list[Receive | None]) -> None:
        raise NotImplementedError("the engine places this exchange's rows itself")

    def wait(self) -> None:
        if self.second is None:
            self.first.wait()
            self.second = self.then(self.first.dropped)
        self.second.wait()

    @property
    def dropped(self) -> frozenset[int]:
        return self.first.dropped | (self.second.dropped if self.second is not None else frozenset())


class _StagedPending(PendingRows):
    """A plan on device tensors: rows packed on the device, moved through host memory as byte rows by
    the engine, applied on the device."""

    def __init__(self, backend: RingBackend, plan: Plan, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self.bytes_layout = RowLayout([WireColumn(torch.uint8, plan.layout.row_bytes)] if plan.layout.row_bytes else [])
        packed = [pack_rows(g, plan.layout, device).cpu() for g in plan.sends]
        sends = [[Gather([rows] if plan.layout.row_bytes else [], count=rows.size(0))] if rows.size(0) else []
                 for rows in packed]
        self.inner = backend.start_host(Plan(plan.op, plan.scope, self.bytes_layout, sends, counts=plan.counts,
                                             exclude=plan.exclude, drop_dead=plan.drop_dead))
        self.staged: list[torch.Tensor] = []
        self.receives: list[Receive | None] | None = None
        if plan.receives is not None:
            self.receive(plan.receives)

    def headers(self) -> tuple[list[int], torch.Tensor]:
        return self.inner.headers()

    def receive(self, receives: list[Receive | None]) -> None:
        rows, _ = self.inner.headers()
        self.receives = receives
        self.staged = [torch.empty(n, self.plan.layout.row_bytes, dtype=torch.uint8) for n in rows]
        self.inner.receive([Receive([t] if self.plan.layout.row_bytes else [], rows=r.rows if r else None)
                            for t, r in zip(self.staged, receives, strict=True)])

    def wait(self) -> None:
        self.inner.wait()
        for rows, receive in zip(self.staged, self.receives or [], strict=False):
            if receive is not None:
                apply_rows(rows.to(self.device), receive, self.plan.layout)

    @property
    def dropped(self) -> frozenset[int]:
        return self.inner.dropped


def _release(engine: native.Engine, proxy: native.Proxy | None, endpoint: int, windows: list[native.Window],
             ring: native.Ring) -> None:
    engine.destroy()
    if proxy is not None and endpoint >= 0 and proxy.ptr:
        proxy.remove_endpoint(endpoint, service.STOP_DRAIN_S)
    for window in windows:
        window.close()
    ring.close()


class RingBackend(CommBackend):
    """Rows move through windows, the compiled engine and the process's proxy; see the module docstring."""

    name = "ring"

    def __init__(self, group: dist.ProcessGroup, topology: Topology, timeout_s: float) -> None:
        super().__init__(topology)
        self.group, self.timeout_s = group, timeout_s
        self.failed: str | None = None
        self._ll_scopes: dict[tuple[bool, ...], tuple[torch.Tensor, int, list[int], frozenset[int]]] = {}
        self._ll_plans: dict[tuple[str, frozenset[int], bool], Plan] = {}
        self._world_ranks = list(range(topology.num_ranks))
        self.session = session_for(group)
        self.prefix = self.session.new_prefix()
        self._last_failure_poll = 0.0
        self._gone: frozenset[int] = frozenset()
        rank, world = topology.rank, topology.num_ranks
        chunk, slots = stream_layout_from_env()
        # An LL combine sums on the expert side (fewer bytes back, partial sums rounded to the
        # wire type) unless PORTEP_LL_EXPERT_SUMS=0; every rank must use the same setting.
        self.ll_expert_sums = number_from_env(EXPERT_SUMS_ENV, 1, kind=int, unit="(0 or 1)") != 0
        arena = arena_bytes_from_env() if topology.num_nodes > 1 else 0  # only the network hop lands there
        per_node = topology.ranks_per_node
        num_signals, data_bytes = native.Engine.window_size(world, slots, chunk, arena, per_node)
        self.window = native.Window.create(num_signals, data_bytes)
        self.ring = native.Ring.create(RING_CAPACITY)
        self.ring.unlink()  # private to this process: the proxy is a thread of it
        windows = [self.window]  # this rank's, then the same-node peers' it maps
        self.engine = native.Engine(rank, world, slots, chunk, self.window, arena, per_node)
        self.proxy: native.Proxy | None = None
        self.endpoint = -1
        self._finalizer = weakref.finalize(self, _release, self.engine, None, -1, windows, self.ring)
        client = self.session.client

        # Which peers go through the proxy: those on other nodes; with faults, every peer.
        hosts = client.allgather(f"{self.prefix}/hosts", service.host_name().encode(), timeout_s)
        remote = [p for p in range(world) if p != rank and (service.faults() or topology.node_of(p) != topology.node)]
        key = b""
        if remote:
            transport = service.choose_transport([h.decode() for h in hosts])
            self.proxy = service.proxy_for(transport, dist.get_rank(), dist.get_world_size())
            self.endpoint, key = self.proxy.add_endpoint(self.ring, self.window, world)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _release, self.engine, self.proxy, self.endpoint, windows,
                                               self.ring)
        layout = [chunk, slots, arena]
        mine = {"window": self.window.name, "proxy": self.proxy.address().hex() if self.proxy else "",
                "key": key.hex(), "layout": layout}
        infos = [json.loads(blob) for blob in client.allgather(f"{self.prefix}/endpoints", json.dumps(mine).encode(),
                                                               timeout_s)]
        others = {peer: info["layout"] for peer, info in enumerate(infos) if info["layout"] != layout}
        if others:  # the windows would not match: refused before any rank writes into another's
            theirs = "; ".join(f"rank {peer}: {value}" for peer, value in others.items())
            raise ValueError(f"Buffer: ranks disagree on the streams' layout ({CHUNK_ENV}, {SLOTS_ENV}, {ARENA_ENV}): "
                             f"rank {rank} has {layout}, {theirs}; set them the same on every rank")
        try:
            for peer in range(world):
                if peer == rank:
                    continue
                if peer in remote:
                    peer_id = self.proxy.connect(bytes.fromhex(infos[peer]["proxy"]))
                    self.proxy.set_rank(self.endpoint, peer, peer_id, bytes.fromhex(infos[peer]["key"]))
                    self.engine.set_proxied(peer, self.proxy, self.endpoint, self.ring)
                else:
                    peer_window = native.Window.attach(infos[peer]["window"], num_signals, data_bytes)
                    windows.append(peer_window)
                    self.engine.set_direct(peer, peer_window)
        except native.EngineError as exc:
            raise TransportError("Buffer", f"rank {rank} cannot reach its peers: {exc}") from exc
        if self.proxy is not None:
            this = weakref.ref(self)  # the stats source must not keep the backend alive
            client.watch_stats(self.session.new_proxy_id(), lambda: this()._status() if this() else {})
        client.barrier(f"{self.prefix}/ready", timeout_s)  # every peer has mapped the windows it needs
        self.window.unlink()  # nothing is left behind in /dev/shm, whatever happens to this process

    # ------------------------------------------------------------------ moving rows
    def _start(self, plan: Plan) -> PendingRows:
        device = _on_device(plan)
        if device is not None:
            return _StagedPending(self, plan, device)
        return self.start_host(plan)

    def start_host(self, plan: Plan) -> _RingPending:
        """Start a plan whose tensors are in host memory."""
        scope_ranks = self.scope_ranks(plan.scope)
        me = self.topology.rank
        scope_indices = [i for i, r in enumerate(scope_ranks) if r not in plan.exclude or r == me]
        for i, r in enumerate(scope_ranks):
            if i not in scope_indices and any(g.rows for g in plan.sends[i]):
                raise ValueError(f"{plan.op}: rows addressed to excluded rank {r}")
        keep: list[Any] = []
        sends = _sends(plan, scope_indices, keep)
        recvs = None if plan.receives is None else _recvs(plan.layout, plan.receives, scope_indices, None, keep)
        peers = np.array([scope_ranks[i] for i in scope_indices], dtype=np.int32)
        exchange = self.guarded(plan.op, lambda: self.engine.start(
            plan.op, peers, sends, plan.layout.row_bytes, plan.num_counts, recvs, plan.drop_dead, keep))
        self.guarded(plan.op, exchange.push)  # the send phase leaves with its rows in flight
        return _RingPending(self, plan, exchange, scope_indices, scope_ranks)

    # ------------------------------------------------------------------ LL, run by the engine
    def native_ll(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def _ll_scope(self, masked: torch.Tensor) -> tuple[torch.Tensor, int, list[int], frozenset[int]]:
        """For a mask of ranks (bool per rank): the uint8 mask, the exchange's size, its ranks (the
        unmasked ones and this one) and the masked ranks; kept, as masks rarely change."""
        key = tuple(masked.tolist())
        scope = self._ll_scopes.get(key)
        if scope is None:
            me = self.topology.rank
            ranks = [r for r, m in enumerate(key) if not m or r == me]
            masked_ranks = frozenset(r for r, m in enumerate(key) if m)
            scope = (torch.tensor(key, dtype=torch.uint8), len(ranks), ranks, masked_ranks)
            self._ll_scopes[key] = scope
        return scope

    def _ll_pending(self, op: str, masked: torch.Tensor, drop_dead: bool, exchange: native.Exchange) -> _EnginePending:
        _, _, ranks, exclude = self._ll_scope(masked)
        key = (op, exclude, drop_dead)
        plan = self._ll_plans.get(key)  # the same few every call: kept
        if plan is None:
            plan = self._ll_plans[key] = Plan(op, "world", RowLayout([]), [], exclude=exclude, drop_dead=drop_dead)
        return _EnginePending(self, plan, exchange, ranks, self._world_ranks)

    def ll_dispatch(self, op: str, topk_idx: torch.Tensor, num_experts: int, masked: torch.Tensor,
                    shape: Sequence[int], columns: Sequence[torch.Tensor], layout: RowLayout,
                    drop_dead: bool) -> tuple[native.LLRoute, _EnginePending]:
        """Start an LL dispatch in the engine: every token of ``topk_idx`` (int64 ``[tokens, topk]``)
        goes once to each rank owning experts it selected, as row ``token`` of ``columns``, the token
        index (int32, the layout's last column) and the list of that rank's experts; ranks ``masked``
        (bool per rank) are left out. Returns the route (for :meth:`ll_receive` and
        :meth:`ll_combine`) and the exchange in flight."""
        keep: list[Any] = []
        if layout.columns[-1] != WireColumn(torch.int32, 1) or layout.offsets[-1] + 4 != layout.row_bytes:
            raise ValueError(f"{op}: an LL row ends with its int32 source token")
        fields = cached_fields(layout, [*columns, None], native.GATHER)
        fields = fields.copy()
        fields[-1] = (0, 0, 0, 0, 0, 1, native.I32, native.I32, native.ROW_INDEX, 0)  # the source token
        mask, npeers, _, _ = self._ll_scope(masked)
        topk_idx = topk_idx.contiguous()
        keep += [mask, topk_idx, *columns]
        route, exchange = self.guarded(op, lambda: native.LLRoute.dispatch(
            self.engine, op, npeers, topk_idx, num_experts, mask, np.asarray(shape, dtype=np.int32), fields,
            drop_dead, keep))
        pending = self._ll_pending(op, masked, drop_dead, exchange)
        wire = route.wire_rows()  # each row followed by its list of experts (int32 per top-k slot)
        self.stats.record("world", int(wire.sum() - wire[self.topology.rank]), layout.row_bytes + 4 * topk_idx.size(1))
        return route, pending

    def ll_receive(self, route: native.LLRoute, pending: _EnginePending, layout: RowLayout,
                   columns: Sequence[torch.Tensor], slots: int, layout_range: torch.Tensor,
                   expert_count: torch.Tensor) -> frozenset[int]:
        """Complete an LL dispatch: once the headers arrived, scatter every row expert-major into
        ``columns`` (``[local, slots, width]`` views) and write ``layout_range`` and
        ``expert_count``. Returns the ranks dropped as dead meanwhile."""
        op = pending.plan.op
        pending.wait_headers()
        ignore = np.zeros(self.topology.num_ranks, dtype=np.uint8)
        dropped = pending.dropped
        ignore[sorted(pending.plan.exclude | dropped)] = 1
        fields = cached_fields(layout, columns, native.SCATTER)
        try:
            self.guarded(op, lambda: route.receive(pending.exchange, fields, slots, ignore, layout_range,
                                                   expert_count, list(columns)))
        except ValueError as exc:
            self.abandon(op, f"{op}: {exc}")
            raise ValueError(f"{op}: {exc}") from None
        pending.wait()
        return pending.dropped

    def ll_combine(self, op: str, route: native.LLRoute, expert_out: torch.Tensor, topk_weights: torch.Tensor,
                   acc: torch.Tensor, touched: torch.Tensor, masked: torch.Tensor, drop_dead: bool,
                   out: torch.Tensor | None = None, one_step: bool = False) -> PendingRows:
        """Start the combine of an LL dispatch received with ``route``: rows of ``expert_out``
        (``[local, slots, hidden]``) go back to their sources, which reduce them, weighted by
        ``topk_weights``, into float32 ``acc`` (``touched`` as in :class:`Receive`); with ``out``
        (``[tokens, hidden]`` in expert_out's dtype), a token's last row writes its sum there
        (``touched`` 2).

        By default the sums are made on the expert side, in two exchanges (the weights out, then
        one partial sum per token and rank back). ``one_step`` (a combine received from a hook,
        which other calls may overtake: their messages would queue behind its second step) and
        ``PORTEP_LL_EXPERT_SUMS=0`` send one row per selection instead, in one exchange."""
        layout = RowLayout([WireColumn(expert_out.dtype, expert_out.size(2))])
        send_fields = cached_fields(layout, [expert_out], native.GATHER)
        acc_fields = cached_fields(layout, [acc], native.REDUCE)
        final_fields = None if out is None else cached_fields(layout, [out], native.SCATTER)
        topk_weights = topk_weights.to(torch.float32).contiguous()
        mask, npeers, _, _ = self._ll_scope(masked)
        keep = [expert_out, acc, mask, out]
        if one_step or not self.ll_expert_sums:
            weights = torch.empty(topk_weights.numel(), dtype=torch.float32)
            exchange = self.guarded(op, lambda: route.combine(op, npeers, send_fields, topk_weights, weights,
                                                              acc_fields, touched, mask, drop_dead, keep,
                                                              final_fields))
            return self._ll_pending(op, masked, drop_dead, exchange)
        # Summed on the expert side: the weights go out first, then one row per (token, rank) returns.
        weights_op = f"{op} (weights)"
        exchange = self.guarded(weights_op, lambda: route.combine_weights(weights_op, npeers, topk_weights, mask,
                                                                          drop_dead))
        first = self._ll_pending(weights_op, masked, drop_dead, exchange)

        def sums(dropped: frozenset[int]) -> _EnginePending:
            ignore = np.zeros(self.topology.num_ranks, dtype=np.uint8)
            ignore[sorted(dropped)] = 1
            sums_exchange = self.guarded(op, lambda: route.combine_sums(op, npeers, send_fields, acc_fields, touched,
                                                                        mask, ignore, drop_dead, keep, final_fields))
            return self._ll_pending(op, masked, drop_dead, sums_exchange)

        return _SteppedPending(first, sums)

    # ------------------------------------------------------------------ HT, run by the engine
    def native_ht(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def _ht_wait(self, op: str, scope: str, exchange: native.Exchange | None,
                 headers_then: Callable[[], T] | None = None) -> T | None:
        """Wait for one hop's exchange (if any): for its headers first and run ``headers_then``
        when given, then for its rows; free it."""
        if exchange is None:
            return None
        ranks = self.scope_ranks(scope)
        pending = _EnginePending(self, Plan(op, scope, RowLayout([]), []), exchange, list(range(len(ranks))), ranks)
        result = None
        if headers_then is not None:
            pending.wait_headers()
            result = self.guarded(op, headers_then)
        pending.wait()  # frees the exchange
        return result

    def ht_dispatch(self, op: str, columns: Sequence[torch.Tensor], is_token_in_rank: torch.Tensor | None,
                    route: native.HTRoute | None) -> tuple[list[torch.Tensor], native.HTRoute]:
        """Run an HT dispatch in the engine: each row of ``columns`` to every rank of its row of
        ``is_token_in_rank`` (bool ``[tokens, ranks]``), network hop then node hop (see
        :mod:`portep.ht`); with ``route`` (a cached dispatch), along that route instead. Returns
        the received columns (grouped by source rank, source order kept) and the route."""
        wire = [WireColumn(t.dtype, t.size(1)) for t in columns]
        layout = RowLayout(wire)
        fields = cached_fields(layout, columns, native.GATHER)
        keep: list[Any] = list(columns)
        net = layout  # a cached dispatch's network rows: the columns alone
        if route is None:
            per_node = self.topology.ranks_per_node
            net = RowLayout([*wire, WireColumn(torch.bool, per_node)])  # the routing inside the node travels along
            net_fields = cached_fields(net, [*columns, None], native.GATHER)
            mask_field = net_fields.size - (2 if net.row_bytes > net.offsets[-1] + per_node else 1)
            in_rank = is_token_in_rank.contiguous().view(torch.uint8)
            route, exchange = self.guarded(op, lambda: native.HTRoute.dispatch(
                self.engine, op, per_node, in_rank, net_fields, mask_field, keep))
        else:
            exchange = self.guarded(op, lambda: route.cached(op, fields, keep))
        self._ht_wait(op, "peers", exchange, lambda: route.hop_receive(exchange))
        exchange = self.guarded(op, lambda: route.forward(op, fields, keep))
        out: list[torch.Tensor] = []

        def receive() -> None:
            num_recv = route.node_rows(exchange)
            out.extend(POOL.empty((num_recv, t.size(1)), t.dtype, t.device) for t in columns)
            route.node_receive(exchange, cached_fields(layout, out, native.SCATTER), out)

        self._ht_wait(op, "node", exchange, receive)
        self.guarded(op, route.release_arena)  # the node's ranks are done with (or will tell) the arenas
        sizes = route.sizes()
        self.stats.record("peers", int(sizes[route.NET_SENT]), net.row_bytes)
        self.stats.record("node", int(sizes[route.NODE_SENT]), layout.row_bytes)
        return out, route

    def ht_combine(self, op: str, route: native.HTRoute, columns: Sequence[torch.Tensor],
                   acc: Sequence[torch.Tensor], touched: torch.Tensor,
                   final: Sequence[torch.Tensor] | None = None) -> None:
        """Run the combine of an HT dispatch in the engine: the rows of ``columns`` (the dispatch's
        output order) go back along the route and are summed, float32, into ``acc`` (rows: the
        forwarded rows' partial sums, then this rank's tokens; ``touched`` as in :class:`Receive`).
        With ``final`` (tensors like ``acc`` in the columns' dtypes), a row's last copy writes its
        sum there instead (``touched`` 2): the partial sums leave from there, and this rank's rows
        need no cast afterwards."""
        layout = RowLayout([WireColumn(t.dtype, t.size(1)) for t in columns])
        keep = [*columns, *acc, *(final or [])]
        acc_fields = cached_fields(layout, acc, native.REDUCE).copy()
        if self.topology.num_nodes > 1:  # a sum's next copy comes from the network hop, later: not read first
            acc_fields["flags"] |= native.FIELD_STREAM
        send = cached_fields(layout, columns, native.GATHER)
        final_fields = None if final is None else cached_fields(layout, final, native.SCATTER)
        self._ht_wait(op, "node", self.guarded(op, lambda: route.combine_node(op, send, acc_fields, touched,
                                                                             final_fields, keep)))
        # the partial sums leave in the input's dtype: final already, or cast from the accumulator
        partial = cached_fields(layout, final if final is not None else acc, native.GATHER)
        self._ht_wait(op, "peers", self.guarded(op, lambda: route.combine_net(op, partial, acc_fields, touched,
                                                                             final_fields, keep)))
        sizes = route.sizes()
        self.stats.record("node", int(sizes[route.NODE_RECEIVED]), layout.row_bytes)
        self.stats.record("peers", int(sizes[route.HOP_ROWS]), layout.row_bytes)

    def wait(self, op: str, pending: _RingPending, step: Callable[[float], T | None]) -> T:
        """Run ``step`` (one bounded engine wait) until it returns a result; between steps, fail on
        a dead peer (or drop it, in shrink mode) and at the deadline, naming the ranks at fault."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            result = self.guarded(op, lambda: step(WAIT_SLICE_S))
            if result is not None:
                return result
            self.guarded(op, lambda: self._check_alive(op, pending))
            if time.monotonic() > deadline:
                self.guarded(op, lambda: self._timeout(op, pending))

    def _timeout(self, op: str, pending: _RingPending) -> None:
        ranks, text = pending.pending_ranks()
        raise CommTimeoutError(op, self.timeout_s, ranks=ranks, detail=self._diagnose(text))

    def guarded(self, op: str, step: Callable[[], T]) -> T:
        """Run one step of ``op``; a failure breaks this Buffer (its streams are mid-message) and,
        when it started here, is published so that peers fail at once naming this rank."""
        if self.failed is not None:
            raise PortepError(f"{op}: this Buffer failed earlier ({self.failed}); create a new Buffer")
        try:
            return step()
        except native.EngineError as exc:
            error = self._engine_error(op, exc)
        except PortepError as exc:
            error = exc
        self.failed = str(error)
        # A dead rank is named by the control plane to everyone; anything else is published so that
        # peers fail at once: a link that failed names the rank at its far end, other causes (other
        # shapes, a deadline) name this rank.
        if not isinstance(error, PeerFailureError) or getattr(error, "link", False):
            culprits = error.ranks if isinstance(error, PeerFailureError) else ()
            try:
                self.session.publish_failure(self.prefix, op, str(error), culprits)
            except PortepError:
                pass  # the control plane is gone too: peers will name this rank by its deadline
        raise error

    def abandon(self, op: str, reason: str) -> None:
        """Give up on this Buffer after an error found above the engine (e.g. ranks that disagree
        on a call's shape): its streams are mid-message; peers are told at once."""
        if self.failed is None:
            self.failed = reason
            try:
                self.session.publish_failure(self.prefix, op, reason)
            except PortepError:
                pass

    def _engine_error(self, op: str, exc: native.EngineError) -> PortepError:
        text = str(exc)
        if exc.kind == native.EngineError.PEER and exc.culprit >= 0:
            dead = self.dead_ranks()
            error = PeerFailureError(op, [exc.culprit], causes={exc.culprit: dead.get(exc.culprit, text)})
            error.link = exc.culprit not in dead  # its link failed, the control plane still sees it alive
            return error
        if exc.kind == native.EngineError.PROXY:
            return TransportError(op, text)
        return PortepError(text)

    # ------------------------------------------------------------------ health, stats, teardown
    def _check_alive(self, op: str, pending: _RingPending) -> None:
        """Fail if another rank of the exchange is gone (the op as a whole cannot finish), naming
        it. Ranks masked out of the exchange do not count; an exchange started with ``drop_dead``
        drops the dead peers it waits on and goes on without them."""
        me, ignored = self.topology.rank, pending.excluded() | self._gone
        dead = {r: how for r, how in self.dead_ranks().items() if r != me and r not in ignored}
        if dead and pending.plan.drop_dead:
            for rank in dead:
                self.engine.drop(rank)
            self._gone |= frozenset(dead)
        elif dead:
            raise PeerFailureError(op, dead, causes=dead)
        now = time.monotonic()
        if now - self._last_failure_poll > FAILURE_POLL_S:
            self._last_failure_poll = now
            self.session.check_failure_notice(self.prefix, op, ignored | {me})

    def dead_ranks(self) -> dict[int, str]:
        return self.session.client.dead_ranks()

    def _diagnose(self, text: str) -> str:
        if self.proxy is None:
            return text
        s = self.proxy.stats()
        return (f"{text}; this rank's proxy ({self.proxy.transport_name}): {s['descriptors']} descriptors, "
                f"{s['posted']} posted, backlog {s['backlog']}")

    def _status(self) -> dict[str, object]:
        """What ``portep status`` shows for this Buffer's proxy (called from the heartbeat thread)."""
        if not self._finalizer.alive:
            return {}
        stats = self.proxy.stats() if self.proxy is not None else {}
        return {"buffer": self.prefix, "transport": self.proxy.transport_name if self.proxy else "", **stats,
                "queue_depth": self.ring.pending(), **self.engine.stats()}

    def data_path_stats(self) -> dict[str, int]:
        """The engine's counters (chunks, bytes direct / staged / local, descriptors) and, when this
        Buffer uses one, its proxy's (``proxy_*``; none on a single node without faults)."""
        out = dict(self.engine.stats())
        if self.proxy is not None:
            out.update({f"proxy_{name}": value for name, value in self.proxy.stats().items()})
        return out

    def close(self) -> None:
        """Wait (briefly) until live peers have consumed everything this rank sent — so a rank
        that leaves first does not cut off its last message — then release the windows."""
        if self.failed is None and self._finalizer.alive:
            self.engine.drain(list(self.dead_ranks()), min(self.timeout_s, CLOSE_DRAIN_S))
        self._finalizer()
