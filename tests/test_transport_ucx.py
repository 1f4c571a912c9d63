"""UCX transport between real processes (and threads): puts and puts-with-signal of random sizes that
cross chunk boundaries land byte-exact, a signal is never visible before the bytes it guards, and a
peer that stops progressing gives a timeout naming it."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from portep.backends.transport import Transport
from portep.backends.ucx import UcxTransport, ucx_available
from portep.errors import CommTimeoutError
from tests.rankpool import RankPool

pytestmark = pytest.mark.skipif(not ucx_available(), reason="ucxx is not importable (pip install ucxx-cu12)")

REGION = 1 << 18  # first half receives, second half is the source of puts
HALF = REGION // 2
DEADLINE_S = 20.0


@dataclass(frozen=True)
class Put:
    src: int
    dst: int
    src_offset: int
    dst_offset: int
    length: int
    slot: int  # -1: plain put
    value: int


def make_plan(seed: int, world: int, chunk: int, count: int) -> list[Put]:
    """The same random puts on every rank: disjoint destinations, lengths around chunk multiples."""
    rng = random.Random(seed)
    next_dst = [0] * world
    puts: list[Put] = []
    for _ in range(count):
        src, dst = rng.randrange(world), rng.randrange(world)
        length = rng.choice([0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 7,
                             rng.randrange(1, 4 * chunk)])
        if next_dst[dst] + length > HALF:
            continue
        signal = length == 0 or rng.random() < 0.7
        slot = len(puts) if signal else -1
        puts.append(Put(src, dst, HALF + rng.randrange(HALF - length + 1), next_dst[dst], length, slot,
                        rng.randrange(1, 1000)))
        next_dst[dst] += length
    return puts


def source_bytes(seed: int, rank: int) -> np.ndarray:
    return np.random.default_rng([seed, rank]).integers(0, 256, HALF, dtype=np.uint8)


def make_region(seed: int, rank: int) -> np.ndarray:
    region = np.zeros(REGION, dtype=np.uint8)
    region[HALF:] = source_bytes(seed, rank)
    return region


def register_and_connect(transport: Transport, rank: int, world: int, seed: int, puts: list[Put]) -> None:
    """Register this rank's region for ``puts`` and connect to every rank (addresses over gloo)."""
    import torch.distributed as dist

    transport.register(make_region(seed, rank), num_signal_slots=len(puts) + 1)
    addresses: list[bytes] = [b""] * world
    dist.all_gather_object(addresses, transport.address())
    for peer, address in enumerate(addresses):
        transport.connect(peer, address)


def run_plan(transport: Transport, world: int, seed: int, puts: list[Put]) -> dict[str, int]:
    """Post this rank's puts, then poll until everything addressed to it has landed, checking after
    each poll that every visible signal guards correct bytes; then a completion round of signals.
    ``transport`` has a ``flush(timeout_s)`` method besides the Transport interface."""
    rank, region, signals = transport.rank, transport.region, transport.signals
    done_slot = len(puts)
    sources = {r: source_bytes(seed, r) for r in range(world)}
    mine = [p for p in puts if p.dst == rank]
    expected = {i: p for i, p in enumerate(puts) if p.dst == rank and p.slot >= 0}
    seen: set[int] = set()

    def check_signals() -> None:
        for slot in np.flatnonzero(signals.values[:done_slot]).tolist():
            if slot in seen:
                continue
            put = expected.get(slot)
            assert put is not None, f"rank {rank}: signal {slot} was not addressed to it"
            assert signals.values[slot] == put.value, f"rank {rank}: signal {slot} applied twice or wrong"
            landed = region[put.dst_offset : put.dst_offset + put.length]
            sent = sources[put.src][put.src_offset - HALF : put.src_offset - HALF + put.length]
            np.testing.assert_array_equal(landed, sent, err_msg=f"signal {slot} visible before its bytes landed")
            seen.add(slot)

    def all_landed() -> bool:
        if len(seen) < len(expected):
            return False
        return all(np.array_equal(region[p.dst_offset : p.dst_offset + p.length],
                                  sources[p.src][p.src_offset - HALF : p.src_offset - HALF + p.length])
                   for p in mine if p.slot < 0)

    deadline = time.monotonic() + DEADLINE_S
    for put in puts:
        if put.src != rank:
            continue
        if put.slot >= 0:
            transport.put_with_signal(put.dst, put.src_offset, put.dst_offset, put.length, put.slot, put.value)
        else:
            transport.put(put.dst, put.src_offset, put.dst_offset, put.length)
        transport.poll()
        check_signals()
    while not all_landed():
        transport.poll()
        check_signals()
        assert time.monotonic() < deadline, f"rank {rank}: missing bytes {signals.missing_bytes()}, " \
                                            f"signals {len(seen)}/{len(expected)}"
    transport.flush(timeout_s=DEADLINE_S)
    for peer in range(world):
        transport.put_with_signal(peer, 0, 0, 0, done_slot, 1)
    while signals.values[done_slot] < world:
        transport.poll()
        assert time.monotonic() < deadline, f"rank {rank}: {int(signals.values[done_slot])}/{world} ranks done"
    transport.flush(timeout_s=DEADLINE_S)
    assert signals.pending_signals() == 0
    return {"puts": sum(p.src == rank for p in puts)}


# ---------------------------------------------------------------- tasks run by the rank pool
def exchange_task(rank: int, world_size: int, seed: int, chunk: int, count: int, tls: str | None,
                  window_ops: int = 64) -> dict[str, object]:

    puts = make_plan(seed, world_size, chunk, count)
    transport = UcxTransport(rank, chunk_bytes=chunk, tls=tls, window_ops=window_ops, timeout_s=DEADLINE_S)
    try:
        register_and_connect(transport, rank, world_size, seed, puts)
        result = run_plan(transport, world_size, seed, puts)
        return {**result, "received_bytes": transport.stats["received_bytes"], "tls": transport.tls}
    finally:
        transport.close()


# ---------------------------------------------------------------- tests
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tls", ["sm,self", "tcp,self"])
def test_two_processes(pool2: RankPool, tls: str) -> None:
    results = pool2.run(exchange_task, timeout=45, seed=1, chunk=1024, count=80, tls=tls, window_ops=8)
    assert all(r["tls"] == tls for r in results)
    assert sum(r["puts"] for r in results) > 40


@pytest.mark.timeout(60)
def test_two_processes_default_chunks(pool2: RankPool) -> None:
    pool2.run(exchange_task, timeout=45, seed=2, chunk=65536, count=12, tls=None)


@pytest.mark.timeout(90)
def test_four_processes(pool4: RankPool) -> None:
    results = pool4.run(exchange_task, timeout=75, seed=3, chunk=2048, count=120, tls=None)
    assert sum(r["received_bytes"] for r in results) > 0


@pytest.mark.timeout(60)
def test_threads_in_one_process() -> None:
    world, seed, chunk = 3, 4, 1500
    puts = make_plan(seed, world, chunk, 60)
    addresses: list[bytes] = [b""] * world
    ready = threading.Barrier(world, timeout=DEADLINE_S)
    results: dict[int, object] = {}

    def rank_thread(rank: int) -> None:
        transport = UcxTransport(rank, chunk_bytes=chunk, timeout_s=DEADLINE_S)
        try:
            transport.register(make_region(seed, rank), num_signal_slots=len(puts) + 1)
            addresses[rank] = transport.address()
            ready.wait()
            for peer in range(world):
                transport.connect(peer, addresses[peer])
            results[rank] = run_plan(transport, world, seed, puts)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            results[rank] = exc
            ready.abort()
        finally:
            transport.close()

    threads = [threading.Thread(target=rank_thread, args=(r,), daemon=True) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S + 10)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    for rank in range(world):
        if isinstance(results.get(rank), BaseException):
            raise results[rank]  # type: ignore[misc]
        assert isinstance(results.get(rank), dict), f"rank {rank} returned {results.get(rank)!r}"


def _pair(chunk: int = 65536, **kwargs: object) -> tuple[UcxTransport, UcxTransport]:
    a = UcxTransport(0, chunk_bytes=chunk, **kwargs)  # type: ignore[arg-type]
    b = UcxTransport(1, chunk_bytes=chunk, **kwargs)  # type: ignore[arg-type]
    for t in (a, b):
        t.register(np.random.default_rng(t.rank).integers(0, 256, 1 << 20, dtype=np.uint8), num_signal_slots=2)
    a.connect(1, b.address())
    b.connect(0, a.address())
    return a, b


@pytest.mark.timeout(30)
def test_silent_peer_times_out_naming_it() -> None:
    a, b = _pair(window_ops=4, timeout_s=0.5)
    try:
        with pytest.raises(CommTimeoutError, match="rank 0 -> rank 1") as info:
            for _ in range(64):  # b never polls: its receives never complete the rendezvous
                a.put(1, 0, 0, 65536)
        assert info.value.ranks == (1,)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_flush_timeout_names_peer_then_delivers() -> None:
    a, b = _pair(timeout_s=5)
    try:
        a.put_with_signal(1, 4096, 0, 200_000, slot=1, value=7)
        with pytest.raises(CommTimeoutError) as info:
            a.flush(timeout_s=0.2)
        assert info.value.ranks == (1,)
        deadline = time.monotonic() + 10
        while b.signals.values[1] != 7:
            a.poll()
            b.poll()
            assert time.monotonic() < deadline
        np.testing.assert_array_equal(b.region[:200_000], a.region[4096 : 4096 + 200_000])
        a.flush(timeout_s=5)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_connect_and_send_errors() -> None:
    a = UcxTransport(0, chunk_bytes=1024)
    b = UcxTransport(1, chunk_bytes=2048)
    try:
        a.register(np.zeros(4096, dtype=np.uint8), num_signal_slots=1)
        with pytest.raises(ValueError, match="same chunk_bytes"):
            a.connect(1, b.address())
        with pytest.raises(ValueError, match="bad address"):
            a.connect(1, b"garbage")
        with pytest.raises(ValueError, match="not connected to rank 1"):
            a.put(1, 0, 0, 10)
        with pytest.raises(ValueError, match="outside"):
            a.put(1, 4000, 0, 200)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_self_connection_and_generic_receive() -> None:
    from portep.backends.transport import Kind, Message

    t = UcxTransport(0, chunk_bytes=256)
    try:
        t.register(np.zeros(1024, dtype=np.uint8), num_signal_slots=1)
        t.connect(0, t.address())
        t.send(0, Message(Kind.DATA, 0, dst_offset=10, payload=b"hello"))
        deadline, got = time.monotonic() + 10, []
        while not got:
            got = t.receive(None)
            assert time.monotonic() < deadline
        assert got[0].payload == b"hello" and got[0].dst_offset == 10
        with pytest.raises(ValueError, match="exceeds"):
            t.send(0, Message(Kind.DATA, 0, payload=bytes(300)))
    finally:
        t.close()
