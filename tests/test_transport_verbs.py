"""RDMA transports. Here: the pure parts (immediates, addresses, GID choice) and the RC / SRD protocols
over an in-memory fake of the pyverbs API that delivers work requests in random order. On a machine
with an RDMA device: the same exchanges between processes on the real device."""

from __future__ import annotations

import ctypes
import random
from collections import deque
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from portep.backends import verbs as vb
from portep.errors import CommTimeoutError, TransportError
from tests.rankpool import RankPool
from tests.test_transport_ucx import HALF, Put, make_plan, make_region, register_and_connect, run_plan, source_bytes


# ---------------------------------------------------------------- pure parts
def test_immediate_round_trip() -> None:
    for slot in (0, 1, 12345, vb.MAX_IMM_SLOT):
        imm = vb.encode_imm(slot)
        assert 0 <= imm < 2**32
        assert vb.decode_imm(imm) == (vb.ImmKind.TAGGED_DATA, slot)
        assert vb.imm_from_wire(vb.imm_to_wire(imm)) == imm
    assert vb.imm_to_wire(vb.encode_imm(1)).to_bytes(4, "little") == vb.encode_imm(1).to_bytes(4, "big")
    with pytest.raises(ValueError, match="does not fit"):
        vb.encode_imm(vb.MAX_IMM_SLOT + 1)
    with pytest.raises(ValueError, match="unknown kind"):
        vb.decode_imm(3 << 30)


def test_address_round_trip_and_errors() -> None:
    gid = bytes(range(16))
    address = vb.VerbsAddress(vb.QpKind.RC, lid=7, gid=gid, mtu=5, psn=0xABCDE, region_addr=0x7F00_0000_1000,
                              region_size=1 << 30, rkey=0xDEADBEEF, qpns=(11, 12, 13))
    packed = address.pack()
    assert vb.VerbsAddress.unpack(packed) == address
    assert vb.VerbsAddress.unpack(vb.VerbsAddress(vb.QpKind.SRD, 0, gid, 8968, 1, qpns=(5,)).pack()).qpns == (5,)
    with pytest.raises(ValueError, match="not a verbs"):
        vb.VerbsAddress.unpack(b"nope")
    with pytest.raises(ValueError, match="announces 3 QPs"):
        vb.VerbsAddress.unpack(packed[:-1])
    with pytest.raises(ValueError, match="version"):
        vb.VerbsAddress.unpack(packed[:4] + b"\x09" + packed[5:])


def test_gid_text_and_choice() -> None:
    raw = bytes.fromhex("fe800000000000000202c9fffe000001")
    assert vb.gid_to_str(raw) == "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
    assert vb.gid_from_str(vb.gid_to_str(raw)) == raw
    ipv4 = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    table = [(0, raw, False), (1, raw, True), (2, ipv4, False), (3, ipv4, True), (4, bytes(16), True)]
    assert vb.pick_gid_index(table, ethernet=True) == 3
    assert vb.pick_gid_index(table[:3], ethernet=True) == 1
    assert vb.pick_gid_index(table, ethernet=False) == 0
    with pytest.raises(TransportError, match="no usable GID"):
        vb.pick_gid_index([(0, bytes(16), True)], ethernet=True)


def test_missing_pyverbs_or_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeVerbs(devices=0)
    with pytest.raises(TransportError, match="no RDMA device"):
        vb.VerbsTransport(0, 2, verbs=fake.module)
    with pytest.raises(TransportError, match="no EFA device"):
        vb.EfaTransport(0, verbs=FakeVerbs(efa=False).module)
    assert vb.rdma_devices(fake.module) == []
    assert vb.efa_devices(FakeVerbs(efa=True).module) == ["fake0"]
    monkeypatch.setenv(vb.DEVICE_ENV, "mlx5_9")
    with pytest.raises(TransportError, match="'mlx5_9' not found"):
        vb.VerbsTransport(0, 2, verbs=FakeVerbs().module)


# ---------------------------------------------------------------- an in-memory pyverbs
ENUMS = SimpleNamespace(
    IBV_ACCESS_LOCAL_WRITE=1, IBV_ACCESS_REMOTE_WRITE=2, IBV_QPT_RC=2, IBV_QPT_DRIVER=255, IBV_WR_RDMA_WRITE=0,
    IBV_WR_RDMA_WRITE_WITH_IMM=1, IBV_WR_SEND=2, IBV_SEND_SIGNALED=2, IBV_WC_SUCCESS=0, IBV_WC_REM_ACCESS_ERR=10,
    IBV_WC_SEND=0, IBV_WC_RDMA_WRITE=1, IBV_WC_RECV=128, IBV_WC_RECV_RDMA_WITH_IMM=129, IBV_LINK_LAYER_INFINIBAND=1,
    IBV_LINK_LAYER_ETHERNET=2, IBV_GID_TYPE_SYSFS_ROCE_V2=1, IBV_QPS_INIT=1, IBV_QPS_RTR=2, IBV_QPS_RTS=3,
    IBV_QP_STATE=1, IBV_QP_PKEY_INDEX=16, IBV_QP_PORT=32, IBV_QP_QKEY=64, IBV_QP_SQ_PSN=65536,
    IBV_QP_RNR_RETRY=8192, IBV_QP_INIT_ATTR_PD=1)


class FakeVerbs:
    """Devices, memory regions, queue pairs and CQs of one process, joined by a fabric that executes
    posted work requests later and in random order (like SRD; harsher than RC)."""

    def __init__(self, devices: int = 1, efa: bool = False, seed: int = 0, max_msg_sz: int = 1 << 31) -> None:
        self.rng = random.Random(seed)
        self.pending: list[tuple[Any, Any]] = []  # (qp, send work request)
        self.mrs: dict[int, tuple[int, int]] = {}
        self.qps: dict[int, Any] = {}
        self.keys = iter(range(100, 10**9))
        fabric = self

        class Obj:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.args = args
                self.__dict__.update(kwargs)

        class Context(Obj):
            def __init__(self, name: str = "") -> None:
                self.name = name

            def query_port(self, port: int) -> Any:
                return SimpleNamespace(link_layer=ENUMS.IBV_LINK_LAYER_INFINIBAND, lid=3, active_mtu=5,
                                       max_msg_sz=max_msg_sz, gid_tbl_len=1)

            def query_gid(self, port: int, index: int) -> Any:
                return SimpleNamespace(gid="fe80:0000:0000:0000:0000:0000:0000:0001")

            def query_device(self) -> Any:
                return SimpleNamespace(vendor_id=vb.AMAZON_VENDOR_ID if efa else 0x02C9, max_cqe=1 << 20)

            def query_efa_device(self) -> Any:
                return SimpleNamespace(max_sq_wr=512, max_rq_wr=4096, device_caps=2)

            def close(self) -> None:
                pass

        class MR:
            def __init__(self, pd: Any, length: int, access: int, address: int) -> None:
                self.lkey = self.rkey = next(fabric.keys)
                fabric.mrs[self.rkey] = (address, length)

        class CQ:
            def __init__(self, *args: Any) -> None:
                self.entries: deque = deque()

            def poll(self, n: int) -> tuple[int, list]:
                out = [self.entries.popleft() for _ in range(min(n, len(self.entries)))]
                fabric.progress()  # after taking entries: what they announce may overtake what is still queued
                return len(out), out

        class SRQ:
            def __init__(self, *args: Any) -> None:
                self.recvs: deque = deque()

            def post_recv(self, wr: Any, bad: Any) -> None:
                self.recvs.append(wr)

        class QP:
            def __init__(self, pd: Any, init: Any, attr: Any = None) -> None:
                self.qp_num = next(fabric.keys)
                self.cq = init.scq
                self.srq = getattr(init, "srq", None) or SRQ()
                self.dest = None
                fabric.qps[self.qp_num] = self

            def to_rts(self, attr: Any) -> None:
                self.dest = attr.dest_qp_num

            def modify(self, attr: Any, mask: int) -> None:
                pass

            def post_send(self, wr: Any, bad: Any) -> None:
                fabric.pending.append((self, wr))

            def post_recv(self, wr: Any, bad: Any) -> None:
                self.srq.post_recv(wr, bad)

        class SRDQPEx(QP):
            def __init__(self, context: Any, init: Any, efa_init: Any) -> None:
                super().__init__(init.pd, init)

        class SendWR(Obj):
            def set_wr_rdma(self, rkey: int, addr: int) -> None:
                self.rkey, self.remote_addr = rkey, addr

            def set_wr_ud(self, ah: Any, qpn: int, qkey: int) -> None:
                self.ud_qpn = qpn

        self.module = SimpleNamespace(
            enums=ENUMS,
            device=SimpleNamespace(Context=Context, get_device_list=lambda: [SimpleNamespace(name=b"fake0")] * devices),
            pd=SimpleNamespace(PD=Obj), mr=SimpleNamespace(MR=MR), cq=SimpleNamespace(CQ=CQ),
            srq=SimpleNamespace(SRQ=SRQ, SrqInitAttr=Obj, SrqAttr=Obj),
            qp=SimpleNamespace(QP=QP, QPCap=Obj, QPInitAttr=Obj, QPInitAttrEx=Obj, QPAttr=Obj),
            wr=SimpleNamespace(SGE=lambda addr, length, lkey: SimpleNamespace(addr=addr, length=length, lkey=lkey),
                               SendWR=SendWR, RecvWR=Obj),
            addr=SimpleNamespace(GID=Obj, GlobalRoute=Obj, AHAttr=Obj, AH=Obj),
            efadv=SimpleNamespace(EfaContext=Context, EfaQPInitAttr=Obj, SRDQPEx=SRDQPEx),
            efa_enums=SimpleNamespace(EFADV_QP_DRIVER_TYPE_SRD=0, EFADV_DEVICE_ATTR_CAPS_RNR_RETRY=2),
        )
        self.frozen: set[int] = set()  # QPs whose work requests are not executed (a dead peer)

    def _check(self, addr: int, length: int, key: int) -> bool:
        base, size = self.mrs.get(key, (0, -1))
        return base <= addr and addr + length <= base + size

    def progress(self) -> None:
        """Execute a random subset of the posted work requests, in random order (sends, which carry
        signals, more eagerly than writes, so that signals overtake the bytes they guard)."""
        ready = [item for item in self.pending if item[0].qp_num not in self.frozen
                 and self.rng.random() < (0.5 if item[1].opcode == ENUMS.IBV_WR_SEND else 0.15)]
        self.rng.shuffle(ready)
        for item in ready:
            qp, wr = item
            dest = self.qps[wr.ud_qpn if hasattr(wr, "ud_qpn") else qp.dest]
            if wr.opcode != ENUMS.IBV_WR_RDMA_WRITE and not dest.srq.recvs:
                continue  # receiver not ready: the device retries later
            self.pending.remove(item)
            sge, status = wr.sg[0], ENUMS.IBV_WC_SUCCESS
            assert self._check(sge.addr, sge.length, sge.lkey), "local buffer outside its memory region"
            if wr.opcode in (ENUMS.IBV_WR_RDMA_WRITE, ENUMS.IBV_WR_RDMA_WRITE_WITH_IMM):
                if self._check(wr.remote_addr, sge.length, wr.rkey):
                    ctypes.memmove(wr.remote_addr, sge.addr, sge.length)
                else:
                    status = ENUMS.IBV_WC_REM_ACCESS_ERR
            if status == ENUMS.IBV_WC_SUCCESS and wr.opcode != ENUMS.IBV_WR_RDMA_WRITE:
                recv = dest.srq.recvs.popleft()
                if wr.opcode == ENUMS.IBV_WR_SEND:
                    assert sge.length <= recv.sg[0].length, "message longer than the receive buffer"
                    ctypes.memmove(recv.sg[0].addr, sge.addr, sge.length)
                    opcode, imm = ENUMS.IBV_WC_RECV, 0
                else:
                    opcode, imm = ENUMS.IBV_WC_RECV_RDMA_WITH_IMM, wr.imm_data
                dest.cq.entries.append(SimpleNamespace(wr_id=recv.wr_id, status=0, opcode=opcode, byte_len=sge.length,
                                                       imm_data=imm, qp_num=dest.qp_num, vendor_err=0))
            qp.cq.entries.append(SimpleNamespace(wr_id=wr.wr_id, status=status, opcode=0, byte_len=0, imm_data=0,
                                                 qp_num=qp.qp_num, vendor_err=0))


def _connect_all(ends: list[Any], seed: int, num_slots: int) -> None:
    for end in ends:
        end.register(make_region(seed, end.rank), num_signal_slots=num_slots)
    addresses = [end.address() for end in ends]
    for end in ends:
        for peer, address in enumerate(addresses):
            end.connect(peer, address)


def _drive(ends: list[Any], seed: int, chunk: int, count: int) -> int:
    """Every rank posts its puts, then all poll round-robin; after each poll every visible signal
    must guard correct bytes. Returns the number of signals checked."""
    world = len(ends)
    puts = make_plan(seed, world, chunk, count)
    _connect_all(ends, seed, len(puts))
    for put in puts:
        end = ends[put.src]
        if put.slot >= 0:
            end.put_with_signal(put.dst, put.src_offset, put.dst_offset, put.length, put.slot, put.value)
        else:
            end.put(put.dst, put.src_offset, put.dst_offset, put.length)
    sources = [source_bytes(seed, r) for r in range(world)]

    def landed(put: Put) -> bool:
        return np.array_equal(ends[put.dst].region[put.dst_offset : put.dst_offset + put.length],
                              sources[put.src][put.src_offset - HALF : put.src_offset - HALF + put.length])

    for _ in range(20_000):
        for end in ends:
            end.poll(max_messages=3)
        for slot, put in enumerate(puts):
            if put.slot >= 0 and ends[put.dst].signals.values[slot]:
                assert ends[put.dst].signals.values[slot] == put.value, f"signal {slot} applied twice"
                assert landed(put), f"signal {slot} visible before its bytes landed"
        if all(e.signals.values[p.slot] == p.value for e in ends for p in puts if p.slot >= 0 and p.dst == e.rank):
            break
    for end in ends:
        end.flush(timeout_s=5)
    assert all(landed(put) for put in puts), "some bytes never landed"
    assert all(end.signals.pending_signals() == 0 for end in ends)
    return sum(p.slot >= 0 for p in puts)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rc_protocol_on_unordered_fabric(seed: int) -> None:
    fake = FakeVerbs(seed=seed)
    ends = [vb.VerbsTransport(r, 3, max_write_bytes=700, window_ops=8, recv_depth=256, timeout_s=5,
                              verbs=fake.module) for r in range(3)]
    assert _drive(ends, seed, chunk=700, count=60) > 10
    assert not fake.pending


@pytest.mark.parametrize("seed", [4, 5])
def test_srd_protocol_on_unordered_fabric(seed: int) -> None:
    fake = FakeVerbs(efa=True, seed=seed, max_msg_sz=600 + 40)
    ends = [vb.EfaTransport(r, 4096, window_ops=8, send_depth=64, recv_depth=512, timeout_s=5, verbs=fake.module)
            for r in range(3)]
    assert ends[0].chunk_bytes == 600  # bounded by the port's maximum message size
    assert _drive(ends, seed, chunk=600, count=60) > 10


def test_rc_errors_name_the_peer() -> None:
    fake = FakeVerbs()
    a, b = (vb.VerbsTransport(r, 2, window_ops=2, timeout_s=0.2, verbs=fake.module) for r in range(2))
    _connect_all([a, b], seed=0, num_slots=2)
    with pytest.raises(ValueError, match="outside rank 1's"):
        a.put(1, 0, HALF * 2 - 10, 20)
    fake.frozen.add(a.qps[1].qp_num)  # rank 0's writes to rank 1 never complete
    with pytest.raises(CommTimeoutError, match="rank 0 -> rank 1") as info:
        for _ in range(3):
            a.put(1, 0, 0, 100)
    assert info.value.ranks == (1,)
    fake.frozen.clear()
    a.flush(timeout_s=5)
    b._remote[0] = vb.VerbsAddress(**{**b._remote[0].__dict__, "rkey": 1})  # a stale key: remote access error
    b.put(0, 0, 0, 10)
    with pytest.raises(TransportError, match="rank 1 -> rank 0"):
        b.flush(timeout_s=5)


# ---------------------------------------------------------------- a real device
def _no_rdma_reason() -> str | None:
    try:
        verbs = vb.load_pyverbs()
    except TransportError as exc:
        return str(exc)
    return None if vb.rdma_devices(verbs) else "no RDMA device (pyverbs finds none on this machine)"


_NO_RDMA = _no_rdma_reason()
needs_rdma = pytest.mark.skipif(_NO_RDMA is not None, reason=_NO_RDMA or "")


def verbs_exchange_task(rank: int, world_size: int, kind: str, seed: int, chunk: int, count: int) -> dict[str, int]:
    import torch.distributed as dist

    puts = make_plan(seed, world_size, chunk, count)
    if kind == "efa":
        transport: Any = vb.EfaTransport(rank, chunk, timeout_s=20)
    else:
        transport = vb.VerbsTransport(rank, world_size, max_write_bytes=chunk, timeout_s=20)
    try:
        register_and_connect(transport, rank, world_size, seed, puts)
        dist.barrier()
        return run_plan(transport, world_size, seed, puts)
    finally:
        transport.close()


@needs_rdma
@pytest.mark.timeout(90)
def test_rc_between_processes(pool2: RankPool) -> None:
    if vb.efa_devices():
        pytest.skip("EFA device: no RC queue pairs")
    pool2.run(verbs_exchange_task, timeout=60, kind="rc", seed=7, chunk=4096, count=80)


@needs_rdma
@pytest.mark.timeout(90)
def test_efa_between_processes(pool2: RankPool) -> None:
    if not vb.efa_devices():
        pytest.skip("no EFA device")
    pool2.run(verbs_exchange_task, timeout=60, kind="efa", seed=8, chunk=4096, count=80)


# ---------------------------------------------------------------- transport selection
def test_selection_registry_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from portep.backends import transports
    from portep.backends.loopback import LoopbackFabric, LoopbackTransport

    monkeypatch.delenv(transports.TRANSPORT_ENV, raising=False)
    assert {"efa", "verbs", "ucx", "loopback"} <= set(transports.available_transports())
    monkeypatch.setitem(transports._REGISTRY, "best", transports._Entry(lambda rank, **o: None, lambda: True, 99))
    monkeypatch.setitem(transports._REGISTRY, "broken", transports._Entry(lambda rank, **o: None, lambda: 1 / 0, 100))
    assert transports.auto_transport_name() == "best"
    assert "broken" not in transports.usable_transports()
    monkeypatch.setenv(transports.TRANSPORT_ENV, "loopback")
    assert transports.auto_transport_name() == "loopback"
    end = transports.create_transport(None, 0, world_size=2, fabric=LoopbackFabric())
    assert isinstance(end, LoopbackTransport)
    with pytest.raises(ValueError, match="pass fabric"):
        transports.create_transport("loopback", 0)
    with pytest.raises(ValueError, match="unknown portep transport 'nope'"):
        transports.create_transport("nope", 0)
    with pytest.raises(ValueError, match="pass world_size"):
        transports.create_transport("verbs", 0)


def test_selection_follows_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from portep.backends import transports

    monkeypatch.delenv(transports.TRANSPORT_ENV, raising=False)
    usable = transports.usable_transports()
    assert ("verbs" in usable or "efa" in usable) == (_NO_RDMA is None)
    if usable:
        assert transports.auto_transport_name() == usable[0]
    for name in list(transports._REGISTRY):
        if transports._REGISTRY[name].probe is not None:
            monkeypatch.setitem(transports._REGISTRY, name, transports._Entry(lambda rank, **o: None, None, 0))
    with pytest.raises(TransportError, match="no usable transport"):
        transports.auto_transport_name()
