"""The software fabric (``pe_transport_fabric.c``) between real processes.

Each rank is a spawned process with its own ``Proxy("fabric", options)``, window and descriptor ring;
ranks exchange addresses and window keys through pipes, then post puts-with-signal through their
rings. Checked: bytes land exactly; a signal is never visible before its bytes (the receiver checks
the bytes the moment it sees a counter move); with reordering and delays the results stay exact and
the statistics prove the faults happened; with drops a signal whose bytes were lost never applies;
a killed peer fails posts toward it, naming it, while the proxy keeps serving the others.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import struct
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from portep.native import engine
from portep.proxy.descriptor import DESCRIPTOR_DTYPE, Op

NUM_SIGNALS = 256
SRC_BYTES = 1 << 20  # each rank's source area (deterministic random bytes), then its receive area
RECV_BYTES = 2 << 20
DATA_BYTES = SRC_BYTES + RECV_BYTES
RECV_FILL = 0xA5
REPLY_TIMEOUT_S = 40.0
SHM_DIR = "/dev/shm"
SPAWN = mp.get_context("spawn")


def source_bytes(seed: int, rank: int) -> np.ndarray:
    """What rank ``rank`` holds in its source area."""
    return np.random.default_rng(seed * 1000 + rank).integers(0, 256, SRC_BYTES, dtype=np.uint8)


@dataclass(frozen=True)
class Put:
    """One put-with-signal: ``length`` bytes from ``src``'s source area to ``dst``'s receive area,
    then ``dst``'s counter ``slot`` += ``value``."""

    src: int
    dst: int
    slot: int
    src_offset: int
    dst_offset: int  # in the receive area
    length: int
    value: int = 1


def plan(seed: int, world: int, count: int, max_len: int, small_every: int = 0) -> list[Put]:
    """``count`` puts per rank to random ranks (itself included), each on its own counter."""
    rng = np.random.default_rng(seed)
    next_slot, next_offset = [0] * world, [0] * world
    puts = []
    for src in range(world):
        for k in range(count):
            dst = int(rng.integers(0, world))
            length = int(rng.integers(1, 257 if small_every and k % small_every == 0 else max_len + 1))
            puts.append(Put(src, dst, next_slot[dst], int(rng.integers(0, SRC_BYTES - length)), next_offset[dst],
                            length))
            next_slot[dst] += 1
            next_offset[dst] += length
    assert max(next_slot) <= NUM_SIGNALS and max(next_offset) <= RECV_BYTES
    return puts


def descriptors(puts: list[Put]) -> np.ndarray:
    records = np.zeros(len(puts), dtype=DESCRIPTOR_DTYPE)
    for i, p in enumerate(puts):
        records[i] = (1, int(Op.PUT_SIGNAL), p.slot, p.dst, p.src_offset, SRC_BYTES + p.dst_offset, p.length, p.value)
    return records


# ------------------------------------------------------------------------------ the rank process
class _Rank:
    """A rank's proxy (of ``transport``), window and ring, driven by commands from the test."""

    def __init__(self, rank: int, world: int, options: str, seed: int, transport: str) -> None:
        self.rank, self.seed = rank, seed
        self.window = engine.Window.create(NUM_SIGNALS, DATA_BYTES)
        self.ring = engine.Ring.create(1024)
        self.window.unlink()  # nobody else maps them: no name is left behind, even if this process is killed
        self.ring.unlink()
        self.window.data[:SRC_BYTES] = source_bytes(seed, rank)
        self.window.data[SRC_BYTES:] = RECV_FILL
        self.proxy = engine.Proxy(transport, f"rank={rank},world={world},{options}")
        self.endpoint, self.key = self.proxy.add_endpoint(self.ring, self.window, world)
        self.sources: dict[int, np.ndarray] = {}

    def connect(self, table: list[tuple[bytes, bytes]]) -> None:
        for rank, (address, key) in enumerate(table):
            self.proxy.set_rank(self.endpoint, rank, self.proxy.connect(address), key)

    def post(self, records: np.ndarray) -> None:
        deadline = time.monotonic() + 10
        while records.size:
            pushed = self.ring.push(records)
            records = records[pushed:]
            self.proxy.wake()
            if records.size:
                assert time.monotonic() < deadline, "the proxy does not drain the ring"
                time.sleep(0.0005)

    def _expected(self, put: Put) -> np.ndarray:
        if put.src not in self.sources:
            self.sources[put.src] = source_bytes(self.seed, put.src)
        return self.sources[put.src][put.src_offset : put.src_offset + put.length]

    def _landed(self, put: Put) -> bool:
        start = SRC_BYTES + put.dst_offset
        return bool(np.array_equal(self.window.data[start : start + put.length], self._expected(put)))

    def watch(self, puts: list[Put], timeout_s: float, settle_s: float) -> dict[str, Any]:
        """Poll this rank's counters until every put toward it has signalled (or nothing moved for
        ``settle_s``, or ``timeout_s``). Each signal seen is checked against its bytes at once.
        Chains (several puts on one counter) must apply in order: counter == k means the first k
        landed."""
        chains: dict[int, list[Put]] = {}
        for p in puts:
            chains.setdefault(p.slot, []).append(p)
        seen = {slot: 0 for slot in chains}
        violations: list[str] = []
        start = last_change = time.monotonic()
        while True:
            values = self.window.signals.copy()
            for slot, chain in chains.items():
                value = int(values[slot])
                if value == seen[slot]:
                    continue
                last_change = time.monotonic()
                if not 0 <= value <= len(chain):
                    violations.append(f"counter {slot} = {value}, beyond its {len(chain)} puts")
                for k in range(seen[slot], min(value, len(chain))):
                    if not self._landed(chain[k]):
                        violations.append(f"counter {slot} reached {k + 1} before the bytes of put {k} landed")
                seen[slot] = value
            now = time.monotonic()
            if all(seen[s] == len(c) for s, c in chains.items()) or now - start > timeout_s:
                break
            if settle_s and now - last_change > settle_s:
                break
            time.sleep(0.0002)
        exact = all(self._landed(c[k]) for s, c in chains.items() for k in range(seen[s]))
        return {"seen": seen, "violations": violations, "exact": exact, "elapsed": time.monotonic() - start}

    def close(self) -> None:
        self.proxy.remove_endpoint(self.endpoint, 5.0)
        self.proxy.destroy(2.0)
        self.ring.close()
        self.window.close()


class RankFailure(str):
    """What a rank process answers when a command raised."""


def _serve(node: _Rank | None, command: str, args: list[Any]) -> Any:
    """Run one command of the test on this rank."""
    if command == "setup":
        return _Rank(*args)
    if command == "teardown":
        return node.close() if node is not None else None
    if node is None:
        raise RuntimeError(f"{command!r} before setup")
    if command == "connect":
        return node.connect(args[0])
    if command == "post":
        return node.post(args[0])
    if command == "watch":
        return node.watch(*args)
    if command == "stats":
        return node.proxy.stats()
    if command == "failure":
        deadline, reply = time.monotonic() + args[1], None
        while reply is None and time.monotonic() < deadline:
            reply = node.proxy.rank_failure(node.endpoint, args[0])
            time.sleep(0.005)
        return reply
    raise ValueError(f"unknown command {command!r}")


def rank_main(conn: Connection) -> None:
    """Entry point of a rank process: serve the test's commands (a fresh proxy, window and ring per
    ``setup``) until ``exit``."""
    node: _Rank | None = None
    while True:
        command, *args = conn.recv()
        if command == "exit":
            conn.send(None)
            conn.close()
            os._exit(0)  # everything is released: skip the interpreter's (slow) teardown
        try:
            reply = _serve(node, command, args)
            if command == "setup":
                node, reply = reply, (reply.proxy.address(), reply.key)
            elif command == "teardown":
                node = None
        except Exception as exc:  # noqa: BLE001 - the test shows it, naming this rank
            reply = RankFailure(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        conn.send(reply)


# ----------------------------------------------------------------------------------- the test side
class Ranks:
    """Rank processes, started once for the module (starting one costs seconds: it imports torch)
    and restarted when a test killed one. ``setup`` gives ranks ``0..world-1`` fresh proxies,
    connected all to all."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.all_pids: list[int] = []
        self.world = 0

    def _start(self, world: int) -> None:
        while len(self.procs) < world:
            self.procs.append(None)
            self.conns.append(None)  # type: ignore[arg-type]
        for rank in range(world):
            if self.procs[rank] is not None and self.procs[rank].is_alive():
                continue
            parent, child = SPAWN.Pipe()
            proc = SPAWN.Process(target=rank_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.procs[rank], self.conns[rank] = proc, parent
            self.all_pids.append(proc.pid)

    def setup(self, world: int, options: str = "", seed: int = 0, transport: str = "fabric") -> Ranks:
        self._start(world)
        self.world, self.seed = world, seed
        table = list(self.call_all({r: ("setup", r, world, options, seed, transport) for r in range(world)}).values())
        self.call_all({r: ("connect", table) for r in range(world)})
        return self

    def recv(self, rank: int, timeout_s: float = REPLY_TIMEOUT_S) -> Any:
        if not self.conns[rank].poll(timeout_s):
            raise TimeoutError(f"rank {rank} did not answer within {timeout_s} s")
        reply = self.conns[rank].recv()
        if isinstance(reply, RankFailure):
            raise RuntimeError(f"rank {rank}: {reply}")
        return reply

    def call(self, rank: int, *command: Any) -> Any:
        self.conns[rank].send(command)
        return self.recv(rank)

    def call_all(self, commands: dict[int, tuple]) -> dict[int, Any]:
        for rank, command in commands.items():
            self.conns[rank].send(command)
        return {rank: self.recv(rank) for rank in commands}

    def alive(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p is not None and p.is_alive()]

    def post(self, puts: list[Put]) -> None:
        self.call_all({r: ("post", descriptors([p for p in puts if p.src == r])) for r in range(self.world)
                       if any(p.src == r for p in puts)})

    def watch(self, puts: list[Put], timeout_s: float = 20.0, settle_s: float = 0.0,
              ranks: list[int] | None = None) -> dict[int, dict[str, Any]]:
        ranks = list(range(self.world)) if ranks is None else ranks
        return self.call_all({r: ("watch", [p for p in puts if p.dst == r], timeout_s, settle_s) for r in ranks})

    def stats(self, ranks: list[int] | None = None) -> dict[str, int]:
        """Proxy and transport statistics summed over ``ranks`` (default: all)."""
        total: dict[str, int] = {}
        for s in self.call_all({r: ("stats",) for r in (range(self.world) if ranks is None else ranks)}).values():
            for name, value in s.items():
                total[name] = total.get(name, 0) + value
        return total

    def kill(self, rank: int) -> None:
        os.kill(self.procs[rank].pid, signal.SIGKILL)
        self.procs[rank].join(10)
        self.conns[rank].close()

    def teardown(self) -> None:
        live = [r for r in self.alive() if r < self.world]
        self.world = 0
        self.call_all({r: ("teardown",) for r in live})

    def close(self) -> None:
        for rank in self.alive():
            try:
                self.call(rank, "exit")
            except (TimeoutError, EOFError, OSError):
                pass
        for proc in self.procs:
            if proc is None:
                continue
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _segments_of(pids: list[int]) -> list[str]:
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(n for n in names if any(f"-{pid}-" in n for pid in pids))


@pytest.fixture(scope="module")
def rank_processes() -> Iterator[Ranks]:
    """The module's rank processes; at the end every one is gone and none left a segment."""
    ranks = Ranks()
    yield ranks
    ranks.close()
    alive = [p.pid for p in ranks.procs if p is not None and p.is_alive()]
    assert not alive, f"rank processes still alive: {alive}"
    assert not _segments_of(ranks.all_pids), f"segments left in {SHM_DIR}: {_segments_of(ranks.all_pids)}"


@pytest.fixture
def job_factory(rank_processes: Ranks) -> Iterator[Any]:
    """``job_factory(world, options, seed)``: ranks 0..world-1 with fresh, connected proxies; torn
    down (and checked for left-over segments) after the test."""
    yield rank_processes.setup
    rank_processes.teardown()
    assert not _segments_of(rank_processes.all_pids), f"segments left: {_segments_of(rank_processes.all_pids)}"


def _assert_exact(results: dict[int, dict[str, Any]], puts: list[Put]) -> None:
    for rank, result in results.items():
        assert not result["violations"], f"rank {rank}: {result['violations']}"
        expected = {p.slot: 1 for p in puts if p.dst == rank}
        assert result["seen"] == expected, f"rank {rank}: counters {result['seen']}, expected {expected}"
        assert result["exact"], f"rank {rank}: some bytes differ"


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.timeout(60)
def test_two_processes_land_exact_bytes(job_factory: Any) -> None:
    job = job_factory(2, seed=11)
    puts = plan(11, 2, count=40, max_len=40_000)
    job.post(puts)
    _assert_exact(job.watch(puts), puts)
    stats = job.stats()
    assert stats["transport_puts"] == len(puts) and stats["transport_signals_applied"] == len(puts)
    assert stats["transport_dropped"] == stats["transport_reordered"] == 0


@pytest.mark.timeout(60)
def test_reorder_and_delay_keep_results_exact(job_factory: Any) -> None:
    job = job_factory(3, "reorder,delay=3,seed=1,fragment=512", seed=12)
    puts = plan(12, 3, count=25, max_len=6000)
    job.post(puts)
    _assert_exact(job.watch(puts), puts)
    stats = job.stats()
    assert stats["transport_reordered"] > 0, stats
    assert stats["transport_delayed"] > 0, stats
    assert stats["transport_fragments"] > stats["transport_puts"] == len(puts), stats
    assert stats["transport_signals_applied"] == len(puts)
    assert stats["transport_dropped"] == 0


@pytest.mark.timeout(60)
def test_drops_lose_signals_never_correctness(job_factory: Any) -> None:
    job = job_factory(2, "drop=0.2,reorder,seed=5,fragment=512", seed=13)
    puts = plan(13, 2, count=40, max_len=6000, small_every=2)
    # A chain: four puts from rank 0 on one counter of rank 1, posted back to back; counter == k must
    # mean that the first k landed, even when a later put arrives whole and an earlier one does not.
    base = max(p.dst_offset + p.length for p in puts if p.dst == 1)
    chain = [Put(0, 1, NUM_SIGNALS - 1, 1000 * k, base + 700 * k, 300 + 100 * k) for k in range(4)]
    job.post(puts + chain)
    results = job.watch(puts + chain, timeout_s=20, settle_s=1.0)
    for rank, result in results.items():
        assert not result["violations"], f"rank {rank}: {result['violations']}"
        assert result["exact"], f"rank {rank}: a counter moved but its bytes are wrong"
    applied = sum(v for r in results.values() for v in r["seen"].values())
    stats = job.stats()
    assert stats["transport_dropped"] > 0, stats
    assert applied == stats["transport_signals_applied"] < len(puts) + len(chain), stats
    assert 0 < applied, "with 20% drops some single-fragment puts should arrive whole"


@pytest.mark.timeout(60)
def test_killed_peer_fails_posts_toward_it_only(job_factory: Any) -> None:
    job = job_factory(3, seed=14)
    warmup = plan(14, 3, count=5, max_len=3000)
    job.post(warmup)
    _assert_exact(job.watch(warmup), warmup)
    job.kill(2)
    job.post([Put(0, 2, 200, 0, 0, 5000)])
    failure = job.call(0, "failure", 2, 10.0)
    assert failure is not None and "rank 2" in failure, failure
    assert job.call(0, "failure", 1, 0.0) is None
    # Ranks 0 and 1 go on (fresh counters and offsets, above the warm-up's).
    puts = [Put(p.src, p.dst, p.slot + 100, p.src_offset, p.dst_offset + (1 << 20), p.length)
            for p in plan(15, 2, count=20, max_len=20_000)]
    job.post(puts)
    _assert_exact(job.watch(puts, ranks=[0, 1]), puts)
    assert job.stats([0])["failed_peers"] == 1


# --------------------------------------------------------------------------------- one process
def _local(options: str) -> tuple[engine.Proxy, engine.Window, engine.Ring, int]:
    window, ring = engine.Window.create(NUM_SIGNALS, DATA_BYTES), engine.Ring.create(256)
    window.unlink()
    ring.unlink()
    proxy = engine.Proxy("fabric", options)
    endpoint, key = proxy.add_endpoint(ring, window, 1)
    proxy.set_rank(endpoint, 0, proxy.connect(proxy.address()), key)
    return proxy, window, ring, endpoint


def _wait(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.mark.timeout(30)
def test_self_puts_and_signals() -> None:
    """To itself: puts-with-signal, plain puts, and signals alone (values split over immediates)."""
    proxy, window, ring, endpoint = _local("rank=0,world=1,fragment=512")
    try:
        window.data[:SRC_BYTES] = source_bytes(3, 0)
        window.data[SRC_BYTES:] = RECV_FILL
        puts = plan(3, 1, count=60, max_len=8000)
        records = descriptors(puts)
        extra = np.zeros(4, dtype=DESCRIPTOR_DTYPE)
        extra[0] = (1, int(Op.SIGNAL), 250, 0, 0, 0, 0, 300)  # three immediates: 127 + 127 + 46
        extra[1] = (1, int(Op.SIGNAL), 251, 0, 0, 0, 0, -200)
        extra[2] = (1, int(Op.PUT), 0, 0, 0, SRC_BYTES + RECV_BYTES - 4096, 4096, 0)
        extra[3] = (1, int(Op.SIGNAL), 252, 0, 0, 0, 0, 2000)
        assert ring.push(np.concatenate([records, extra])) == len(puts) + 4
        proxy.wake()
        slots = [p.slot for p in puts]
        assert _wait(lambda: (window.signals[slots] == 1).all() and window.signals[250] == 300
                     and window.signals[251] == -200 and window.signals[252] == 2000)
        src = source_bytes(3, 0)
        for p in puts:
            got = window.data[SRC_BYTES + p.dst_offset : SRC_BYTES + p.dst_offset + p.length]
            assert np.array_equal(got, src[p.src_offset : p.src_offset + p.length])
        assert _wait(lambda: np.array_equal(window.data[DATA_BYTES - 4096 :], src[:4096]))
        stats = proxy.stats()
        assert stats["transport_signals"] == len(puts) + 3
        assert stats["transport_signals_applied"] == len(puts) + 3 + 2 + 16  # immediates: 300, -200, 2000 split
        assert proxy.failure() is None and proxy.rank_failure(endpoint, 0) is None
        # A value beyond 16 immediates is refused, naming the limit; the peer is then failed.
        extra[0] = (1, int(Op.SIGNAL), 253, 0, 0, 0, 0, 5000)
        ring.push(extra[:1])
        proxy.wake()
        assert _wait(lambda: proxy.rank_failure(endpoint, 0) is not None)
        assert "does not fit 16 immediates" in proxy.rank_failure(endpoint, 0)
    finally:
        proxy.remove_endpoint(endpoint, 2.0)
        proxy.destroy()
        ring.close()
        window.close()


HEADER = struct.Struct("<IHHIIQQQII")  # pe_msg_hdr_t
KEY = struct.Struct("<IIIIQQQII")  # pe_msg_key_t
ADDRESS = struct.Struct("<8sQiiI108s")  # the fabric's address blob


def _decode_imm(imm: int) -> tuple[int, int, int, int]:
    """(kind, counter, sequence number, value) of an immediate (pe_msgproto.h)."""
    value = imm & 0xFF
    return imm >> 31, (imm >> 15) & 0xFFFF, (imm >> 8) & 0x7F, value - 256 if value > 127 else value


@pytest.mark.timeout(30)
def test_wire_format_backpressure_and_a_vanished_peer() -> None:
    """Toward a peer that does not read (a bare socket standing in for rank 1): the peer's socket
    fills, the per-peer queue (2 posts) fills, posts are refused with PE_BUSY and wait in the proxy's
    backlog; reading the socket shows the wire format (fragments of 512 bytes tagged DATA(counter,
    seq), then SIGNAL with the byte count). Once that socket is gone, posts toward it fail naming
    the rank."""
    window, ring = engine.Window.create(NUM_SIGNALS, DATA_BYTES), engine.Ring.create(256)
    window.unlink()
    ring.unlink()
    window.data[:SRC_BYTES] = source_bytes(4, 0)
    proxy = engine.Proxy("fabric", "rank=0,world=2,queue_posts=2,fragment=512")
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        endpoint, key = proxy.add_endpoint(ring, window, 2)
        proxy.set_rank(endpoint, 0, proxy.connect(proxy.address()), key)
        name = f"\0portep-test-{os.getpid()}".encode()
        fake.bind(name)
        fake.settimeout(5)
        address = ADDRESS.pack(b"PEFAB01\0", 0xFEED, 1, os.getpid(), len(name), name)
        first_counter = 77
        fake_key = KEY.pack(0x594B4550, 5, first_counter, NUM_SIGNALS, engine.lib().pe_window_bytes(
            NUM_SIGNALS, DATA_BYTES), engine.lib().pe_window_signals_offset(), 0, 0, 0)
        proxy.set_rank(endpoint, 1, proxy.connect(address), fake_key)
        data_offset = engine.lib().pe_window_data_offset(NUM_SIGNALS)
        puts = [Put(0, 1, slot, 3000 * slot, 4000 * slot, 2000) for slot in range(6)]
        ring.push(descriptors(puts))
        proxy.wake()
        assert _wait(lambda: proxy.stats()["transport_stalls"] > 0 and proxy.stats()["backlog"] > 0)
        src, own_id = source_bytes(4, 0), ADDRESS.unpack(proxy.address())[1]
        for put in puts:
            landed = bytearray()
            while len(landed) < put.length:
                message = fake.recv(1 << 16)
                magic, kind, _, imm, region, origin, dst, need, length, _ = HEADER.unpack_from(message)
                assert (magic, kind, region, origin, need) == (0x314D4550, 2, 5, own_id, 0)
                assert length == len(message) - HEADER.size == min(512, put.length - len(landed))
                assert _decode_imm(imm) == (0, first_counter + put.slot, 0, 0)
                assert dst == data_offset + SRC_BYTES + put.dst_offset + len(landed)
                landed += message[HEADER.size :]
            assert bytes(landed) == src[put.src_offset : put.src_offset + put.length].tobytes()
            _, kind, _, imm, _, _, _, need, length, _ = HEADER.unpack_from(fake.recv(1 << 16))
            assert (kind, need, length, _decode_imm(imm)) == (3, put.length, 0, (1, first_counter + put.slot, 0, 1))
        assert _wait(lambda: proxy.stats()["backlog"] == 0)
        fake.close()
        ring.push(descriptors([Put(0, 1, 9, 0, 0, 100)]))
        proxy.wake()
        assert _wait(lambda: proxy.rank_failure(endpoint, 1) is not None)
        assert f"rank 1 (pid {os.getpid()}) is unreachable" in proxy.rank_failure(endpoint, 1)
        assert proxy.rank_failure(endpoint, 0) is None and proxy.failure() is None
        proxy.remove_endpoint(endpoint, 2.0)
    finally:
        fake.close()
        proxy.destroy()
        ring.close()
        window.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("options", "message"), [
    ("drop=1.5", "drop=1.5 is not a probability"),
    ("delay=x", "delay=x is not a non-negative integer"),
    ("reorder=maybe", "reorder=maybe is not a flag"),
    ("fragment=999999999", "fragment=999999999 is larger than"),
    ("rank=3,world=2", "rank=3 is not a rank of world=2"),
])
def test_bad_options_are_named(options: str, message: str) -> None:
    with pytest.raises(engine.EngineError, match=message):
        engine.Proxy("fabric", options)


@pytest.mark.timeout(30)
def test_unknown_options_are_ignored_and_addresses_are_checked() -> None:
    proxy = engine.Proxy("fabric", "rank=0,world=1,colour=blue,reorder=0")
    try:
        assert proxy.address().startswith(b"PEFAB01")
        with pytest.raises(engine.EngineError, match="not a fabric address"):
            proxy.connect(b"PESHM1:somehost")
    finally:
        proxy.destroy()
