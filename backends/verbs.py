"""RDMA transports over libibverbs (pyverbs): RC queue pairs for InfiniBand / RoCE, SRD for AWS EFA.

:class:`VerbsTransport` (IB, RoCE; reliable connected QPs, one per peer, one shared receive queue):

* ``register`` registers the region as a memory region (local write, remote write).
* ``address()`` packs :class:`VerbsAddress`: LID, GID, MTU, the region's address / size / rkey, the
  start PSN, and the QP number this rank dedicates to each destination rank (so the transport
  needs ``world_size``). ``connect(peer, address)`` moves the QP for ``peer`` to RTS.
* ``put`` = RDMA writes (chunks of at most ``max_write_bytes``). ``put_with_signal`` = RDMA writes
  with immediate data, the immediate encoding the signal slot (:func:`encode_imm`), followed by
  a SEND of a :mod:`~portep.backends.wire` SIGNAL message (value, cumulative tagged bytes).
* The receiver polls its CQ: each write-with-immediate completion credits ``byte_len`` landed
  bytes to ``(peer, slot)`` and each signal message is offered to the
  :class:`~portep.proxy.signals.SignalTable`, which applies it once all the bytes it guards have
  landed. RC happens to deliver in order, but nothing relies on it (several QPs per peer or
  adaptive routing would stay correct).

:class:`EfaTransport` (AWS EFA; one SRD QP per endpoint, address handles per peer): SRD is reliable
but unordered, and RDMA write is missing on older EFA devices (only newer ones report
``EFADV_DEVICE_ATTR_CAPS_RDMA_WRITE``; RDMA read arrived with EFA gen 2). This transport therefore
uses two-sided SEND/RECV of wire-format messages (a :class:`MessageTransport`), which works on every
EFA generation: puts are chunked to the port's maximum message size (about one 8 KiB MTU), copied
once into registered staging buffers, and applied by the receiver; signals are order-independent
through the SignalTable. An RDMA-write data path for devices that report it is left for later.

Both import pyverbs lazily (:func:`load_pyverbs`), also from Debian's ``python3-pyverbs`` when the
interpreter is not the system one, and raise :class:`~portep.errors.TransportError` when pyverbs
or an RDMA device is missing. Devices and ports: ``PORTEP_IB_DEVICE`` (default: the first device,
EFA devices for ``efa``), ``PORTEP_IB_PORT`` (1), ``PORTEP_IB_GID_INDEX`` (default: the first
RoCE v2 IPv4 GID on Ethernet ports, 0 otherwise).

Flow control and errors as in the UCX transport: bounded operations and bytes in flight per peer
(and the send queue depth); a send beyond them polls (applying arrivals) until room or raises
:class:`~portep.errors.CommTimeoutError` naming the peer; failed work completions raise
:class:`~portep.errors.TransportError` naming the peer. One thread drives a transport.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from types import SimpleNamespace
from typing import Any

import numpy as np

from portep.deadlines import default_timeout_s
from portep.errors import CommTimeoutError, TransportError

from . import wire
from .transport import DEFAULT_CHUNK_BYTES, Kind, Message, MessageTransport, Transport

DEVICE_ENV, PORT_ENV, GID_INDEX_ENV = "PORTEP_IB_DEVICE", "PORTEP_IB_PORT", "PORTEP_IB_GID_INDEX"
PYVERBS_PATH_ENV = "PORTEP_PYVERBS_PATH"
SYSTEM_PYVERBS_DIRS = ("/usr/lib/python3/dist-packages", "/usr/local/lib/python3/dist-packages")
AMAZON_VENDOR_ID = 0x1D0F
SRD_QKEY = 0x11111111
SIGNAL_SLOT_BYTES = 64  # a wire SIGNAL message (40 bytes) rounded up
DEFAULT_MAX_WRITE_BYTES = 1 << 20
DEFAULT_WINDOW_OPS = 64
DEFAULT_WINDOW_BYTES = 16 << 20
SEND_WR_BASE = 1 << 32  # work request ids of sends; receives use their buffer index (below)


# ---------------------------------------------------------------- immediate data
class ImmKind(IntEnum):
    TAGGED_DATA = 1  # the write's bytes count towards signal slot ``slot`` of the writer


IMM_KIND_SHIFT = 30
IMM_SLOT_MASK = (1 << IMM_KIND_SHIFT) - 1
MAX_IMM_SLOT = IMM_SLOT_MASK


def encode_imm(slot: int, kind: ImmKind = ImmKind.TAGGED_DATA) -> int:
    """32-bit immediate (host order) of a write: ``kind`` in bits 31..30, ``slot`` in bits 29..0.
    The source rank is the QP the write arrives on and the byte count the completion's ``byte_len``."""
    if not 0 <= slot <= MAX_IMM_SLOT:
        raise ValueError(f"verbs: signal slot {slot} does not fit the immediate (0..{MAX_IMM_SLOT})")
    return (int(kind) << IMM_KIND_SHIFT) | slot


def decode_imm(imm: int) -> tuple[ImmKind, int]:
    """``(kind, slot)`` of an immediate made by :func:`encode_imm`."""
    kind = imm >> IMM_KIND_SHIFT
    if kind not in ImmKind._value2member_map_:
        raise ValueError(f"verbs: immediate 0x{imm:08x} has unknown kind {kind}")
    return ImmKind(kind), imm & IMM_SLOT_MASK


def imm_to_wire(imm: int) -> int:
    """Immediate data travel in network byte order (``imm_data`` fields are big-endian)."""
    return socket.htonl(imm)


def imm_from_wire(raw: int) -> int:
    return socket.ntohl(raw)


# ---------------------------------------------------------------- addresses
class QpKind(IntEnum):
    RC = 1
    SRD = 2


_ADDRESS = struct.Struct("<4sBBHIIQQII16s")
_ADDRESS_MAGIC = b"PVRB"
_ADDRESS_VERSION = 1


@dataclass(frozen=True)
class VerbsAddress:
    """What a peer needs to reach this endpoint; packed by :meth:`pack` for the control plane."""

    kind: QpKind
    lid: int
    gid: bytes  # 16 raw bytes
    mtu: int  # RC: ibv_mtu enum of the port; SRD: bytes of the receive buffers
    psn: int
    region_addr: int = 0
    region_size: int = 0
    rkey: int = 0
    qpns: tuple[int, ...] = ()  # RC: the QP dedicated to each destination rank; SRD: the one QP

    def pack(self) -> bytes:
        if len(self.gid) != 16:
            raise ValueError("verbs: a GID has 16 bytes")
        head = _ADDRESS.pack(_ADDRESS_MAGIC, _ADDRESS_VERSION, int(self.kind), self.lid, self.mtu, self.psn,
                             self.region_addr, self.region_size, self.rkey, len(self.qpns), self.gid)
        return head + struct.pack(f"<{len(self.qpns)}I", *self.qpns)

    @classmethod
    def unpack(cls, data: bytes) -> VerbsAddress:
        if len(data) < _ADDRESS.size or data[:4] != _ADDRESS_MAGIC:
            raise ValueError("verbs: not a verbs transport address")
        magic, version, kind, lid, mtu, psn, addr, size, rkey, count, gid = _ADDRESS.unpack_from(data)
        if version != _ADDRESS_VERSION:
            raise ValueError(f"verbs: address version {version}, this build speaks {_ADDRESS_VERSION}")
        if len(data) != _ADDRESS.size + 4 * count:
            raise ValueError(f"verbs: address of {len(data)} bytes announces {count} QPs")
        qpns = struct.unpack_from(f"<{count}I", data, _ADDRESS.size)
        return cls(QpKind(kind), lid, gid, mtu, psn, addr, size, rkey, tuple(qpns))


def gid_to_str(gid: bytes) -> str:
    """16 raw bytes as pyverbs writes a GID (``fe80:0000:...``)."""
    return ":".join(gid[i : i + 2].hex() for i in range(0, 16, 2))


def gid_from_str(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 16:
        raise ValueError(f"verbs: {text!r} is not a GID")
    return raw


def pick_gid_index(gids: list[tuple[int, bytes, bool]], ethernet: bool) -> int:
    """The GID index to use: on Ethernet (RoCE) the first RoCE v2 GID with an IPv4-mapped address,
    else the first RoCE v2 one, else the first non-zero one; on InfiniBand / EFA index 0.
    ``gids``: ``(index, raw gid, is_roce_v2)``."""
    if not ethernet:
        return 0
    valid = [(i, g, v2) for i, g, v2 in gids if any(g)]
    for predicate in (lambda g, v2: v2 and g[:12] == b"\0" * 10 + b"\xff\xff", lambda g, v2: v2, lambda g, v2: True):
        for index, gid, v2 in valid:
            if predicate(gid, v2):
                return index
    raise TransportError("verbs", "no usable GID on this RoCE port (is an IP address configured?)")


# ---------------------------------------------------------------- pyverbs loading and devices
def _load_from(directory: str) -> None:
    package_dir = os.path.join(directory, "pyverbs")
    spec = importlib.util.spec_from_file_location("pyverbs", os.path.join(package_dir, "__init__.py"),
                                                  submodule_search_locations=[package_dir])
    if spec is None or spec.loader is None:
        raise ImportError(f"no pyverbs package in {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyverbs"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["pyverbs"]
        raise


def load_pyverbs() -> SimpleNamespace:
    """pyverbs' modules as one namespace (``device, pd, mr, cq, qp, srq, wr, addr, enums`` and, when
    built with EFA, ``efadv, efa_enums``). Falls back to the system's ``python3-pyverbs``."""
    try:
        import pyverbs  # noqa: F401
    except ImportError as first:
        extra = os.environ.get(PYVERBS_PATH_ENV)
        for directory in ([extra] if extra else []) + list(SYSTEM_PYVERBS_DIRS):
            if os.path.isfile(os.path.join(directory, "pyverbs", "__init__.py")):
                try:
                    _load_from(directory)
                    break
                except Exception:  # noqa: BLE001, S112 - try the next location
                    continue
        else:
            raise TransportError("verbs", "pyverbs is not importable (apt-get install python3-pyverbs, or pip "
                                          f"install pyverbs with rdma-core's libraries): {first}") from first
    names = {"device": "device", "pd": "pd", "mr": "mr", "cq": "cq", "qp": "qp", "srq": "srq", "wr": "wr",
             "addr": "addr", "enums": "enums"}
    try:
        modules = {key: importlib.import_module(f"pyverbs.{name}") for key, name in names.items()}
    except Exception as exc:  # noqa: BLE001 - a missing libibverbs shows up here
        raise TransportError("verbs", f"pyverbs does not load: {exc}") from exc
    for key, name in (("efadv", "pyverbs.providers.efa.efadv"), ("efa_enums", "pyverbs.providers.efa.efa_enums")):
        try:
            modules[key] = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - pyverbs built without the EFA provider
            modules[key] = None
    return SimpleNamespace(**modules)


def rdma_devices(verbs: SimpleNamespace | None = None) -> list[str]:
    """Names of this machine's RDMA devices ([] when pyverbs or the kernel support is missing)."""
    try:
        verbs = verbs or load_pyverbs()
        return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in verbs.device.get_device_list()]
    except Exception:  # noqa: BLE001 - no RDMA here
        return []


def efa_devices(verbs: SimpleNamespace | None = None) -> list[str]:
    """The RDMA devices that are AWS EFA adapters."""
    found = []
    try:
        verbs = verbs or load_pyverbs()
        for name in rdma_devices(verbs):
            context = verbs.device.Context(name=name)
            try:
                if context.query_device().vendor_id == AMAZON_VENDOR_ID:
                    found.append(name)
            finally:
                context.close()
    except Exception:  # noqa: BLE001
        return found
    return found


class _Port:
    """An opened device: context, PD, CQ and the port's addressing attributes."""

    def __init__(self, verbs: SimpleNamespace, rank: int, device: str | None, port: int | None,
                 gid_index: int | None, cq_depth: int, efa: bool) -> None:
        self.verbs = verbs
        names = efa_devices(verbs) if efa else rdma_devices(verbs)
        wanted = device or os.environ.get(DEVICE_ENV)
        if not names:
            raise TransportError(f"verbs rank {rank}", "no EFA device" if efa else "no RDMA device on this machine")
        if wanted and wanted not in names:
            raise TransportError(f"verbs rank {rank}", f"RDMA device {wanted!r} not found; devices: {names}")
        self.device = wanted or names[0]
        self.port = port or int(os.environ.get(PORT_ENV, "1"))
        e = verbs.enums
        try:
            if efa:
                self.context = verbs.efadv.EfaContext(name=self.device)
            else:
                self.context = verbs.device.Context(name=self.device)
            self.port_attr = self.context.query_port(self.port)
            self.ethernet = self.port_attr.link_layer == e.IBV_LINK_LAYER_ETHERNET
            if gid_index is None and os.environ.get(GID_INDEX_ENV):
                gid_index = int(os.environ[GID_INDEX_ENV])
            if gid_index is None:
                gid_index = pick_gid_index(self._gids(), self.ethernet)
            self.gid_index = gid_index
            self.gid = gid_from_str(self.context.query_gid(self.port, gid_index).gid)
            self.lid = int(self.port_attr.lid)
            self.mtu = int(self.port_attr.active_mtu)
            self.max_msg_bytes = int(self.port_attr.max_msg_sz)
            self.pd = verbs.pd.PD(self.context)
            self.device_attr = self.context.query_device()
            self.cq = verbs.cq.CQ(self.context, min(cq_depth, int(self.device_attr.max_cqe)), None, None, 0)
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"verbs rank {rank}: open {self.device} port {self.port}", str(exc)) from exc

    def _gids(self) -> list[tuple[int, bytes, bool]]:
        e, out = self.verbs.enums, []
        for index in range(int(self.port_attr.gid_tbl_len)):
            try:
                gid = gid_from_str(self.context.query_gid(self.port, index).gid)
                v2 = self.context.query_gid_type(self.port, index) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
            except Exception:  # noqa: BLE001, S112 - unpopulated entries
                continue
            out.append((index, gid, v2))
        return out

    def register(self, array: np.ndarray, access: int) -> Any:
        return self.verbs.mr.MR(self.pd, array.nbytes, access, address=array.ctypes.data)

    def global_route_ah(self, gid: bytes, lid: int) -> Any:
        a = self.verbs.addr
        route = a.GlobalRoute(dgid=a.GID(gid_to_str(gid)), sgid_index=self.gid_index)
        return a.AHAttr(port_num=self.port, is_global=1 if any(gid) else 0, gr=route, dlid=lid)

    def close(self) -> None:
        try:
            self.context.close()  # closes the PD, CQ, MRs, QPs opened on it
        except Exception:  # noqa: BLE001, S110 - teardown
            pass


class _SendWindow:
    """Per-peer bounded operations/bytes in flight, keyed by work request id."""

    def __init__(self, ops: int, nbytes: int) -> None:
        self.ops, self.nbytes = ops, nbytes
        self.count: dict[int, int] = {}
        self.bytes: dict[int, int] = {}
        self.requests: dict[int, tuple[int, int, int]] = {}  # wr_id -> (peer, bytes, staging index or -1)
        self._next = SEND_WR_BASE

    def has_room(self, peer: int, size: int) -> bool:
        return self.count.get(peer, 0) < self.ops and (self.bytes.get(peer, 0) + size <= self.nbytes
                                                       or not self.count.get(peer, 0))

    def open(self, peer: int, size: int, staging: int = -1) -> int:
        wr_id, self._next = self._next, self._next + 1
        self.requests[wr_id] = (peer, size, staging)
        self.count[peer] = self.count.get(peer, 0) + 1
        self.bytes[peer] = self.bytes.get(peer, 0) + size
        return wr_id

    def close(self, wr_id: int) -> tuple[int, int, int]:
        peer, size, staging = self.requests.pop(wr_id)
        self.count[peer] -= 1
        self.bytes[peer] -= size
        return peer, size, staging

    def busy_peers(self) -> list[int]:
        return sorted(p for p, n in self.count.items() if n)


def _drain_until_done(transport: Any, drain: Callable[[], int], what: str, items: str,
                      timeout_s: float | None) -> int:
    """Drain ``transport``'s completion queue until its request window is empty; returns the
    messages handled on the way. Raises :class:`CommTimeoutError` naming the peers still owed."""
    timeout = transport.timeout_s if timeout_s is None else timeout_s
    deadline, spins, handled = time.monotonic() + timeout, 0, 0
    while transport.window.requests:
        handled += drain()
        if not transport.window.requests:
            break
        try:
            _wait(deadline, spins)
        except TimeoutError:
            raise CommTimeoutError(f"{what} rank {transport.rank}", timeout, ranks=transport.window.busy_peers(),
                                   detail=f"{len(transport.window.requests)} {items} not completed") from None
        spins += 1
    return handled


def _wait(deadline: float, spins: int) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError
    if spins > 64:
        time.sleep(0 if spins < 1024 else 1e-5)


# ---------------------------------------------------------------- RC (InfiniBand / RoCE)
class VerbsTransport(Transport):
    """RC queue pairs with RDMA write / write-with-immediate; see the module docstring."""

    name = "verbs"

    def __init__(self, rank: int, world_size: int, *, device: str | None = None, port: int | None = None,
                 gid_index: int | None = None, max_write_bytes: int = DEFAULT_MAX_WRITE_BYTES,
                 window_ops: int = DEFAULT_WINDOW_OPS, window_bytes: int = DEFAULT_WINDOW_BYTES,
                 recv_depth: int = 1024, timeout_s: float | None = None, verbs: SimpleNamespace | None = None) -> None:
        super().__init__(rank)
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"verbs: rank {rank} is not in a world of {world_size}")
        self.world_size = world_size
        self.max_write_bytes, self.timeout_s = max_write_bytes, default_timeout_s() if timeout_s is None else timeout_s
        self.window = _SendWindow(window_ops, window_bytes)
        self.verbs = verbs or load_pyverbs()
        v, e = self.verbs, self.verbs.enums
        self.dev = _Port(v, rank, device, port, gid_index, world_size * (window_ops + 1) + recv_depth, efa=False)
        self.psn = int.from_bytes(os.urandom(3), "little")
        self._tagged_sent: dict[tuple[int, int], int] = {}
        self._mr = None
        self._remote: dict[int, VerbsAddress] = {}
        staging = world_size * window_ops
        self._control = np.zeros((recv_depth + staging, SIGNAL_SLOT_BYTES), dtype=np.uint8)
        self._free_staging = list(range(recv_depth, recv_depth + staging))
        self.recv_depth = recv_depth
        try:
            self._control_mr = self.dev.register(self._control, e.IBV_ACCESS_LOCAL_WRITE)
            self.srq = v.srq.SRQ(self.dev.pd, v.srq.SrqInitAttr(v.srq.SrqAttr(max_wr=recv_depth, max_sge=1)))
            cap = v.qp.QPCap(max_send_wr=window_ops + 1, max_recv_wr=0, max_send_sge=1, max_recv_sge=1)
            init = v.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.dev.cq, rcq=self.dev.cq, srq=self.srq, cap=cap)
            attr = v.qp.QPAttr(port_num=self.dev.port)
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
            self.qps = [v.qp.QP(self.dev.pd, init, attr) for _ in range(world_size)]  # INIT state
            for index in range(recv_depth):
                self._post_recv(index)
        except Exception as exc:  # noqa: BLE001
            self.dev.close()
            raise TransportError(f"verbs rank {rank}: create queue pairs on {self.dev.device}", str(exc)) from exc
        self._qpn_to_peer = {qp.qp_num: peer for peer, qp in enumerate(self.qps)}
        self._handled_outside_poll = 0

    # ------------------------------------------------------------ setup
    def register(self, region: np.ndarray, num_signal_slots: int) -> None:
        super().register(region, num_signal_slots)
        e = self.verbs.enums
        try:
            self._mr = self.dev.register(region, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"verbs rank {self.rank}: register {region.nbytes} bytes", str(exc)) from exc

    def address(self) -> bytes:
        if self._mr is None:
            raise RuntimeError("verbs: register memory before taking the address")
        return VerbsAddress(QpKind.RC, self.dev.lid, self.dev.gid, self.dev.mtu, self.psn,
                            self.region.ctypes.data, self.region.nbytes, int(self._mr.rkey),
                            tuple(qp.qp_num for qp in self.qps)).pack()

    def connect(self, peer: int, address: bytes) -> None:
        remote = VerbsAddress.unpack(address)
        if remote.kind != QpKind.RC or len(remote.qpns) != self.world_size:
            raise ValueError(f"verbs: rank {peer}'s address is not an RC address for a world of {self.world_size}")
        v, e = self.verbs, self.verbs.enums
        attr = v.qp.QPAttr(port_num=self.dev.port)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        attr.path_mtu = min(self.dev.mtu, remote.mtu)
        attr.dest_qp_num = remote.qpns[self.rank]
        attr.rq_psn, attr.sq_psn = remote.psn, self.psn
        attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
        attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry = 12, 14, 7, 7
        attr.ah_attr = self.dev.global_route_ah(remote.gid, remote.lid)
        try:
            self.qps[peer].to_rts(attr)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"verbs connect rank {self.rank} -> rank {peer}", str(exc)) from exc
        self._remote[peer] = remote

    # ------------------------------------------------------------ posting
    def _check(self, peer: int, src_offset: int, dst_offset: int, length: int) -> VerbsAddress:
        if self.region is None or self._mr is None:
            raise RuntimeError("verbs: register memory before putting")
        remote = self._remote.get(peer)
        if remote is None:
            raise ValueError(f"verbs: rank {self.rank} is not connected to rank {peer}")
        if src_offset < 0 or length < 0 or src_offset + length > self.region.size:
            raise ValueError(f"verbs: source bytes [{src_offset}, {src_offset + length}) are outside the "
                             f"{self.region.size}-byte region")
        if dst_offset < 0 or dst_offset + length > remote.region_size:
            raise ValueError(f"verbs: destination bytes [{dst_offset}, {dst_offset + length}) are outside rank "
                             f"{peer}'s {remote.region_size}-byte region")
        return remote

    def _room(self, peer: int, size: int) -> None:
        if self.window.has_room(peer, size):
            return
        deadline, spins = time.monotonic() + self.timeout_s, 0
        while not self.window.has_room(peer, size):
            self._handled_outside_poll += self._drain_cq(None)
            try:
                _wait(deadline, spins)
            except TimeoutError:
                raise CommTimeoutError(f"verbs send rank {self.rank} -> rank {peer}", self.timeout_s, ranks=[peer],
                                       detail=f"{self.window.count[peer]} work requests "
                                              f"({self.window.bytes[peer]} bytes) not completed") from None
            spins += 1

    def _post(self, peer: int, wr: Any) -> None:
        try:
            self.qps[peer].post_send(wr, None)
        except Exception as exc:  # noqa: BLE001
            self.window.close(wr.wr_id)
            raise TransportError(f"verbs send rank {self.rank} -> rank {peer}", str(exc)) from exc

    def _write(self, peer: int, remote: VerbsAddress, src_offset: int, dst_offset: int, length: int,
               slot: int) -> None:
        v, e = self.verbs, self.verbs.enums
        for start in range(0, length, self.max_write_bytes):
            size = min(self.max_write_bytes, length - start)
            self._room(peer, size)
            wr_id = self.window.open(peer, size)
            sge = v.wr.SGE(self.region.ctypes.data + src_offset + start, size, self._mr.lkey)
            if slot >= 0:
                wr = v.wr.SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1, sg=[sge],
                                 send_flags=e.IBV_SEND_SIGNALED, imm_data=imm_to_wire(encode_imm(slot)))
            else:
                wr = v.wr.SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge],
                                 send_flags=e.IBV_SEND_SIGNALED)
            wr.set_wr_rdma(remote.rkey, remote.region_addr + dst_offset + start)
            self._post(peer, wr)

    def _send_signal(self, peer: int, slot: int, value: int, cumulative: int) -> None:
        v, e = self.verbs, self.verbs.enums
        self._room(peer, 0)  # staging buffers are as many as window slots, so one is free now
        index = self._free_staging.pop()
        size = wire.encode_into(self._control[index], Message(Kind.SIGNAL, self.rank, slot=slot, value=value,
                                                              cumulative_bytes=cumulative))
        wr_id = self.window.open(peer, 0, staging=index)
        sge = v.wr.SGE(self._control.ctypes.data + index * SIGNAL_SLOT_BYTES, size, self._control_mr.lkey)
        wr = v.wr.SendWR(wr_id=wr_id, opcode=e.IBV_WR_SEND, num_sge=1, sg=[sge], send_flags=e.IBV_SEND_SIGNALED)
        self._post(peer, wr)

    def put(self, peer: int, src_offset: int, dst_offset: int, length: int) -> None:
        remote = self._check(peer, src_offset, dst_offset, length)
        self._write(peer, remote, src_offset, dst_offset, length, slot=-1)

    def put_with_signal(self, peer: int, src_offset: int, dst_offset: int, length: int, slot: int,
                        value: int) -> None:
        remote = self._check(peer, src_offset, dst_offset, length)
        if not 0 <= slot <= MAX_IMM_SLOT:
            raise ValueError(f"verbs: signal slot {slot} out of range")
        self._write(peer, remote, src_offset, dst_offset, length, slot)
        key = (peer, slot)
        self._tagged_sent[key] = self._tagged_sent.get(key, 0) + length
        self._send_signal(peer, slot, value, self._tagged_sent[key])

    # ------------------------------------------------------------ completions
    def _post_recv(self, index: int) -> None:
        v = self.verbs
        sge = v.wr.SGE(self._control.ctypes.data + index * SIGNAL_SLOT_BYTES, SIGNAL_SLOT_BYTES,
                       self._control_mr.lkey)
        self.srq.post_recv(v.wr.RecvWR(wr_id=index, num_sge=1, sg=[sge]), None)

    def _drain_cq(self, max_messages: int | None) -> int:
        handled = 0
        while max_messages is None or handled < max_messages:
            try:
                count, completions = self.dev.cq.poll(32)
            except Exception as exc:  # noqa: BLE001
                raise TransportError(f"verbs rank {self.rank}: poll completion queue", str(exc)) from exc
            if not count:
                break
            for wc in completions[:count]:
                if wc.wr_id < SEND_WR_BASE:  # (the opcode of a failed completion is undefined)
                    handled += self._on_receive(wc)
                else:
                    self._on_send_completion(wc)
        return handled

    def _on_send_completion(self, wc: Any) -> None:
        peer, _, staging = self.window.close(wc.wr_id)
        if staging >= 0:
            self._free_staging.append(staging)
        if wc.status != self.verbs.enums.IBV_WC_SUCCESS:
            raise TransportError(f"verbs send rank {self.rank} -> rank {peer}",
                                 f"work completion status {wc.status} (vendor error {wc.vendor_err})")

    def _on_receive(self, wc: Any) -> int:
        e = self.verbs.enums
        peer = self._qpn_to_peer.get(wc.qp_num, -1)
        if wc.status != e.IBV_WC_SUCCESS:
            raise TransportError(f"verbs receive at rank {self.rank} from rank {peer}",
                                 f"work completion status {wc.status} (vendor error {wc.vendor_err})")
        index = wc.wr_id
        if wc.opcode == e.IBV_WC_RECV_RDMA_WITH_IMM:
            _, slot = decode_imm(imm_from_wire(wc.imm_data))
            self.signals.on_data(peer, slot, wc.byte_len)
        else:
            message = wire.decode(self._control[index])
            if message.kind != Kind.SIGNAL:
                raise TransportError(f"verbs receive at rank {self.rank} from rank {peer}",
                                     f"unexpected {message.kind.name} message")
            self.signals.on_signal(message.source, message.slot, message.value, message.cumulative_bytes)
        self._post_recv(index)
        return 1

    def poll(self, max_messages: int | None = None) -> int:
        handled = self._drain_cq(max_messages) + self._handled_outside_poll
        self._handled_outside_poll = 0
        return handled

    def flush(self, timeout_s: float | None = None) -> None:
        """Poll until every posted write and signal has completed locally (RC: acknowledged by the peer)."""
        self._handled_outside_poll += _drain_until_done(self, lambda: self._drain_cq(None), "verbs flush",
                                                        "work requests", timeout_s)

    def close(self) -> None:
        self.dev.close()


# ---------------------------------------------------------------- SRD (AWS EFA)
class EfaTransport(MessageTransport):
    """One SRD QP; puts as SEND/RECV wire messages; see the module docstring."""

    name = "efa"

    def __init__(self, rank: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, device: str | None = None,
                 port: int | None = None, gid_index: int | None = 0, window_ops: int = DEFAULT_WINDOW_OPS,
                 window_bytes: int = DEFAULT_WINDOW_BYTES, send_depth: int = 256, recv_depth: int = 1024,
                 timeout_s: float | None = None, verbs: SimpleNamespace | None = None) -> None:
        self.verbs = verbs or load_pyverbs()
        v, e = self.verbs, self.verbs.enums
        if v.efadv is None:
            raise TransportError("efa", "this pyverbs has no EFA provider (pyverbs.providers.efa)")
        self.dev = _Port(v, rank, device, port, gid_index, send_depth + recv_depth, efa=True)
        try:
            efa_attr = self.dev.context.query_efa_device()
            send_depth = min(send_depth, int(efa_attr.max_sq_wr))
            recv_depth = min(recv_depth, int(efa_attr.max_rq_wr))
            self.device_caps = int(efa_attr.device_caps)
        except Exception as exc:  # noqa: BLE001
            self.dev.close()
            raise TransportError(f"efa rank {rank}: query {self.dev.device}", str(exc)) from exc
        super().__init__(rank, min(chunk_bytes, self.dev.max_msg_bytes - wire.HEADER_BYTES))
        self.slot_bytes = wire.message_bytes(self.chunk_bytes)
        self.timeout_s = default_timeout_s() if timeout_s is None else timeout_s
        self.window = _SendWindow(window_ops, window_bytes)
        self.send_depth, self.recv_depth = send_depth, recv_depth
        self.psn = int.from_bytes(os.urandom(3), "little")
        self._buffers = np.zeros((recv_depth + send_depth, self.slot_bytes), dtype=np.uint8)
        self._free_staging = list(range(recv_depth, recv_depth + send_depth))
        self._peers: dict[int, tuple[Any, int]] = {}  # peer -> (address handle, remote QPN)
        self._handled_outside_poll = 0
        try:
            self._buffers_mr = self.dev.register(self._buffers, e.IBV_ACCESS_LOCAL_WRITE)
            cap = v.qp.QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1, max_recv_sge=1)
            init = v.qp.QPInitAttrEx(cap=cap, qp_type=e.IBV_QPT_DRIVER, scq=self.dev.cq, rcq=self.dev.cq,
                                     pd=self.dev.pd, comp_mask=e.IBV_QP_INIT_ATTR_PD)
            efa_init = v.efadv.EfaQPInitAttr()
            efa_init.driver_qp_type = v.efa_enums.EFADV_QP_DRIVER_TYPE_SRD
            self.qp = v.efadv.SRDQPEx(self.dev.context, init, efa_init)
            self._to_rts()
            for index in range(recv_depth):
                self._post_recv(index)
        except Exception as exc:  # noqa: BLE001
            self.dev.close()
            raise TransportError(f"efa rank {rank}: create SRD queue pair on {self.dev.device}", str(exc)) from exc

    def _to_rts(self) -> None:
        v, e = self.verbs, self.verbs.enums
        attr = v.qp.QPAttr(port_num=self.dev.port)
        attr.qkey, attr.pkey_index, attr.sq_psn = SRD_QKEY, 0, self.psn
        attr.qp_state = e.IBV_QPS_INIT
        self.qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_QKEY)
        attr.qp_state = e.IBV_QPS_RTR
        self.qp.modify(attr, e.IBV_QP_STATE)
        attr.qp_state = e.IBV_QPS_RTS
        mask = e.IBV_QP_STATE | e.IBV_QP_SQ_PSN
        rnr_cap = getattr(v.efa_enums, "EFADV_DEVICE_ATTR_CAPS_RNR_RETRY", 0)
        if rnr_cap and self.device_caps & rnr_cap:  # the device retries when the receiver has no buffer posted
            attr.rnr_retry = 7
            mask |= e.IBV_QP_RNR_RETRY
        self.qp.modify(attr, mask)

    def address(self) -> bytes:
        return VerbsAddress(QpKind.SRD, 0, self.dev.gid, self.slot_bytes, self.psn, qpns=(self.qp.qp_num,)).pack()

    def connect(self, peer: int, address: bytes) -> None:
        remote = VerbsAddress.unpack(address)
        if remote.kind != QpKind.SRD or len(remote.qpns) != 1:
            raise ValueError(f"efa: rank {peer}'s address is not an SRD address")
        if remote.mtu != self.slot_bytes:
            raise ValueError(f"efa: rank {peer} receives {remote.mtu}-byte messages, rank {self.rank} sends "
                             f"{self.slot_bytes}: every rank must use the same chunk_bytes and MTU")
        try:
            ah = self.verbs.addr.AH(self.dev.pd, attr=self.dev.global_route_ah(remote.gid, 0))
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"efa connect rank {self.rank} -> rank {peer}", str(exc)) from exc
        self._peers[peer] = (ah, remote.qpns[0])

    # ------------------------------------------------------------ sending
    def _send_data(self, peer: int, src_offset: int, dst_offset: int, length: int, slot: int) -> None:
        region = self._source(src_offset, length)
        header = wire.HEADER_BYTES
        for start in range(0, length, self.chunk_bytes):
            size = min(self.chunk_bytes, length - start)
            index = self._staging(peer, header + size)
            buffer = self._buffers[index]
            wire.encode_header_into(buffer, Kind.DATA, self.rank, size, dst_offset + start, slot)
            buffer[header : header + size] = region[src_offset + start : src_offset + start + size]
            self._post_send(peer, index, header + size)

    def send(self, peer: int, message: Message) -> None:
        size = wire.message_bytes(memoryview(message.payload).nbytes)
        if size > self.slot_bytes:
            raise ValueError(f"efa: a {size}-byte message exceeds the {self.slot_bytes}-byte receive buffers")
        index = self._staging(peer, size)
        wire.encode_into(self._buffers[index], message)
        self._post_send(peer, index, size)

    def _staging(self, peer: int, size: int) -> int:
        if peer not in self._peers:
            raise ValueError(f"efa: rank {self.rank} is not connected to rank {peer}")
        if not (self.window.has_room(peer, size) and self._free_staging):
            deadline, spins = time.monotonic() + self.timeout_s, 0
            while not (self.window.has_room(peer, size) and self._free_staging):
                self._handled_outside_poll += self._drain_cq(None, apply=True)
                try:
                    _wait(deadline, spins)
                except TimeoutError:
                    raise CommTimeoutError(f"efa send rank {self.rank} -> rank {peer}", self.timeout_s,
                                           ranks=[peer], detail=f"{self.window.count.get(peer, 0)} sends not "
                                                                f"completed") from None
                spins += 1
        return self._free_staging.pop()

    def _post_send(self, peer: int, index: int, size: int) -> None:
        v, e = self.verbs, self.verbs.enums
        ah, qpn = self._peers[peer]
        wr_id = self.window.open(peer, size, staging=index)
        sge = v.wr.SGE(self._buffers.ctypes.data + index * self.slot_bytes, size, self._buffers_mr.lkey)
        wr = v.wr.SendWR(wr_id=wr_id, opcode=e.IBV_WR_SEND, num_sge=1, sg=[sge], send_flags=e.IBV_SEND_SIGNALED)
        wr.set_wr_ud(ah, qpn, SRD_QKEY)
        try:
            self.qp.post_send(wr, None)
        except Exception as exc:  # noqa: BLE001
            self.window.close(wr_id)
            self._free_staging.append(index)
            raise TransportError(f"efa send rank {self.rank} -> rank {peer}", str(exc)) from exc

    # ------------------------------------------------------------ receiving
    def _post_recv(self, index: int) -> None:
        v = self.verbs
        sge = v.wr.SGE(self._buffers.ctypes.data + index * self.slot_bytes, self.slot_bytes, self._buffers_mr.lkey)
        self.qp.post_recv(v.wr.RecvWR(wr_id=index, num_sge=1, sg=[sge]), None)

    def _drain_cq(self, max_messages: int | None, apply: bool, out: list[Message] | None = None) -> int:
        e, handled = self.verbs.enums, 0
        while max_messages is None or handled < max_messages:
            try:
                count, completions = self.dev.cq.poll(32)
            except Exception as exc:  # noqa: BLE001
                raise TransportError(f"efa rank {self.rank}: poll completion queue", str(exc)) from exc
            if not count:
                break
            for wc in completions[:count]:
                if wc.wr_id < SEND_WR_BASE:
                    if wc.status != e.IBV_WC_SUCCESS:
                        raise TransportError(f"efa receive at rank {self.rank}",
                                             f"work completion status {wc.status} (vendor error {wc.vendor_err})")
                    slot = self._buffers[wc.wr_id]
                    if apply:
                        self._apply(wire.decode(slot))
                    else:
                        out.append(wire.decode(slot, copy=True))  # type: ignore[union-attr]
                    self._post_recv(wc.wr_id)
                    handled += 1
                else:
                    peer, _, staging = self.window.close(wc.wr_id)
                    self._free_staging.append(staging)
                    if wc.status != e.IBV_WC_SUCCESS:
                        raise TransportError(f"efa send rank {self.rank} -> rank {peer}",
                                             f"work completion status {wc.status} (vendor error {wc.vendor_err})")
        return handled

    def receive(self, max_messages: int | None) -> list[Message]:
        messages: list[Message] = []
        self._drain_cq(max_messages, apply=False, out=messages)
        return messages

    def poll(self, max_messages: int | None = None) -> int:
        handled = self._drain_cq(max_messages, apply=True) + self._handled_outside_poll
        self._handled_outside_poll = 0
        return handled

    def flush(self, timeout_s: float | None = None) -> None:
        """Poll until every send has completed (SRD: acknowledged by the peer's device)."""
        self._handled_outside_poll += _drain_until_done(self, lambda: self._drain_cq(None, apply=True), "efa flush",
                                                        "sends", timeout_s)

    def close(self) -> None:
        self.dev.close()
