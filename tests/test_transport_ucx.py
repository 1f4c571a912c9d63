"""The compiled proxy's UCX transport between real processes, each with its own ``Proxy("ucx")``,
``Window`` and ``Ring``: puts-with-signal of random sizes land byte-exact, a signal is never visible
before the bytes it guards, over shared memory (``UCX_TLS=sm,self``) and TCP (``UCX_TLS=tcp,self``);
a peer killed with SIGKILL fails later posts toward it, naming it, while the proxy keeps serving
another peer; nothing is left behind (processes, /dev/shm segments).

Measured with ``python -m tests.test_transport_ucx`` (two processes, one stream of puts-with-signal
on one counter, from the first push to the last signal; 2 cores shared by both processes, their
proxies and other work, so the figures follow the load; UCX 1.21): 1 MiB puts 5-9 GB/s over sm
(cma) and 1.5-5 GB/s over tcp (loopback); 64-byte puts 3-3.6 M/s over sm and over tcp, the rate at
which this Python producer also feeds the shm transport (0.2-0.45 M/s over tcp with ``bundle=0``).
"""

from __future__ import annotations

import argparse
import faulthandler
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

NUM_SIGNALS = 256
DEST_BYTES = 20 << 20  # receive area, then the source of puts
SRC_BYTES = 4 << 20
RING_SLOTS = 1024
DEADLINE_S = 30.0
TLS = {"sm": "sm,self", "tcp": "tcp,self"}


def _ucx_built() -> bool:
    """Whether the UCX transport library is built and loads."""
    try:
        import libucx  # noqa: F401

        from portep.native.engine import transport_ops

        transport_ops("ucx")
    except Exception:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ucx_built(), reason="portep.native._ucx is not built (needs the libucx wheel)")


# ------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class Put:
    counter: int
    bit: int  # the put adds 1 << bit to its counter: the counter's bits say which puts were signalled
    src: int  # offset in the source area
    dst: int  # offset in the receive area
    length: int


def make_plan(seed: int, counters: int, per_counter: int, max_len: int = 256 << 10, first_counter: int = 0
              ) -> list[Put]:
    """Puts of random sizes (every path: signal alone, tiny, around 1 and 8 KiB, large) to disjoint
    places, ``per_counter`` on each of ``counters`` counters from ``first_counter``, in a random order."""
    rng = np.random.default_rng(seed)
    lengths = [0, 1, 7, 64, 1024, 1025, 8191, 8192, 8193, 65536, max_len]
    puts, dst = [], 0
    for counter in range(first_counter, first_counter + counters):
        for bit in range(per_counter):
            if rng.random() < 0.5:
                length = int(rng.choice(lengths))
            else:
                length = int(rng.integers(1, 16384 if rng.random() < 0.5 else max_len + 1))
            length = min(length, max_len)
            assert dst + length <= DEST_BYTES
            puts.append(Put(counter, bit, int(rng.integers(0, SRC_BYTES - length + 1)), dst, length))
            dst += length
    order = rng.permutation(len(puts))
    return [puts[i] for i in order]


def source_bytes(seed: int) -> np.ndarray:
    """The sender's source area for ``seed`` (the receiver regenerates it to check)."""
    return np.random.default_rng([seed, 99]).integers(0, 256, SRC_BYTES, dtype=np.uint8)


def descriptors(puts: list[Put], dst_rank: int) -> np.ndarray:
    """PUT_SIGNAL descriptors for ``puts`` toward ``dst_rank``."""
    from portep.proxy.descriptor import DESCRIPTOR_DTYPE, DESCRIPTOR_VERSION, Op

    out = np.zeros(len(puts), dtype=DESCRIPTOR_DTYPE)
    out["version"], out["opcode"], out["dst_rank"] = DESCRIPTOR_VERSION, int(Op.PUT_SIGNAL), dst_rank
    out["signal_slot"] = [p.counter for p in puts]
    out["signal_value"] = [1 << p.bit for p in puts]
    out["src_offset"] = [DEST_BYTES + p.src for p in puts]
    out["dst_offset"] = [p.dst for p in puts]
    out["length"] = [p.length for p in puts]
    return out


def _sysv_segments() -> list[str]:
    """System V shared-memory segments (UCX's sysv transport makes some): key shmid perms size cpid ..."""
    try:
        with open("/proc/sysvipc/shm") as f:
            return f.read().splitlines()[1:]
    except OSError:
        return []


# ------------------------------------------------------------------------------------ rank process
class Rank:
    """One process's side: a proxy, a window (receive area + source area) and a ring."""

    def __init__(self, world: int, options: str) -> None:
        from portep.native.engine import Proxy, Ring, Window

        self.proxy = Proxy("ucx", options)
        self.window = Window.create(NUM_SIGNALS, DEST_BYTES + SRC_BYTES)
        self.window.unlink()  # peers reach it through UCX, never by name: a killed rank leaves nothing
        self.ring = Ring.create(RING_SLOTS)
        self.ring.unlink()
        self.endpoint, self.key = self.proxy.add_endpoint(self.ring, self.window, world)

    def connect(self, peers: list[tuple[int, bytes, bytes]]) -> None:
        """Route every (rank, address, key) through this proxy."""
        for rank, address, key in peers:
            self.proxy.set_rank(self.endpoint, rank, self.proxy.connect(address), key)

    def push(self, records: np.ndarray, deadline_s: float = DEADLINE_S) -> None:
        """Push every descriptor into the ring, waking the proxy."""
        deadline = time.monotonic() + deadline_s
        while records.size:
            records = records[self.ring.push(records):]
            self.proxy.wake()
            if records.size:
                assert time.monotonic() < deadline, f"ring still full, {records.size} descriptors left"
                time.sleep(0.0002)

    def send(self, seed: int, dst_rank: int, puts: list[Put], batch: int = 4) -> None:
        """Post ``puts`` a few at a time (so that the receiver sees its counters move often)."""
        self.window.data[DEST_BYTES:] = source_bytes(seed)
        records = descriptors(puts, dst_rank)
        for start in range(0, records.size, batch):
            self.push(records[start:start + batch])
            time.sleep(0.0005)

    def receive(self, seed: int, puts: list[Put], deadline_s: float = DEADLINE_S) -> dict[str, int]:
        """Poll the counters until every put is signalled; each time a counter moves, the bytes of
        every put it now covers must be there already."""
        src = source_bytes(seed)
        by_bit = {(p.counter, p.bit): p for p in puts}
        ids = np.array(sorted({p.counter for p in puts}))
        full = np.zeros(ids.size, dtype=np.int64)
        for p in puts:
            full[np.searchsorted(ids, p.counter)] |= 1 << p.bit
        seen = np.zeros(ids.size, dtype=np.int64)
        data, signals = self.window.data, self.window.signals
        deadline, moves = time.monotonic() + deadline_s, 0
        while not np.array_equal(seen, full):
            now = signals[ids]
            changed = np.nonzero(now != seen)[0]
            if changed.size == 0:
                assert time.monotonic() < deadline, f"counters {seen.tolist()} of {full.tolist()}"
                time.sleep(0.0002)
                continue
            for i in changed:
                c, value, before = int(ids[i]), int(now[i]), int(seen[i])
                full_c = int(full[i])
                assert value & ~full_c == 0 and value & before == before, f"counter {c}: {before} -> {value}"
                new = value & ~before
                for bit in range(new.bit_length()):
                    if new >> bit & 1:
                        p = by_bit[(c, bit)]
                        got = data[p.dst:p.dst + p.length]
                        assert np.array_equal(got, src[p.src:p.src + p.length]), (
                            f"counter {c} signalled {p} before its bytes landed")
                seen[i] = value
            moves += 1
        return {"moves": moves}

    def failing_stream(self, dst_rank: int, sizes: list[int], deadline_s: float) -> str:
        """Post puts of ``sizes`` toward ``dst_rank`` until its route fails; the proxy's reason."""
        self.window.data[DEST_BYTES:DEST_BYTES + max(sizes)] = 7
        deadline = time.monotonic() + deadline_s
        while (reason := self.proxy.rank_failure(self.endpoint, dst_rank)) is None:
            assert time.monotonic() < deadline, f"posts toward rank {dst_rank} kept succeeding"
            self.push(descriptors([Put(i, 0, 0, 0, size) for i, size in enumerate(sizes)], dst_rank))
            time.sleep(0.002)
        return reason

    def failure(self) -> str | None:
        """Why the transport failed as a whole, or None."""
        return self.proxy.failure()

    def rank_failure(self, rank: int) -> str | None:
        """Why ``rank`` is unreachable, or None."""
        return self.proxy.rank_failure(self.endpoint, rank)

    def stream(self, dst_rank: int, size: int, count: int, slots: int) -> float:
        """``count`` puts of ``size`` bytes, each adding 1 to counter 0, over ``slots`` places; returns
        when the first was pushed (``time.monotonic``, one clock for every process of the host)."""
        records = descriptors([Put(0, 0, 0, (i % slots) * size, size) for i in range(count)], dst_rank)
        start = time.monotonic()
        self.push(records, deadline_s=120)
        return start

    def count(self, count: int) -> float:
        """When counter 0 reached ``count`` (``time.monotonic``)."""
        signals = self.window.signals
        deadline = time.monotonic() + 120
        while signals[0] < count:
            assert time.monotonic() < deadline, f"{int(signals[0])} of {count} arrived"
            time.sleep(0.0002)
        return time.monotonic()

    def close(self) -> dict[str, int]:
        """Tear everything down; the proxy's last stats."""
        stats = self.proxy.stats()
        self.proxy.remove_endpoint(self.endpoint, 5.0)
        self.proxy.destroy(5.0)
        self.window.close()
        self.ring.close()
        return stats


def _rank_main(conn: Connection) -> None:
    """Serve the test's commands over ``conn``: ``open`` a :class:`Rank` (with its UCX environment),
    call its methods, ``close`` it; until ``exit`` (or the test goes away)."""
    faulthandler.enable()
    from portep.native import engine  # noqa: F401  (the imports' cost is paid before "ready")

    conn.send(("ok", os.getpid()))
    rank: Rank | None = None
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:  # the test gave up on this process
            command, args = "exit", []
        try:
            if command in ("close", "exit"):
                stats = rank.close() if rank is not None else {}
                rank = None
                if command == "exit":
                    return
                conn.send(("ok", stats))
            elif command == "open":
                env, world, options = args
                for name in [n for n in os.environ if n.startswith("UCX_")]:
                    del os.environ[name]
                os.environ.update(env)
                rank = Rank(world, options)
                conn.send(("ok", (rank.proxy.address(), rank.key)))
            else:
                conn.send(("ok", getattr(rank, command)(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Process:
    """The test's handle on one rank process (spawned: a fresh interpreter)."""

    def __init__(self) -> None:
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_rank_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.pid = -1
        self.address, self.key = b"", b""
        self.stats: dict[str, int] = {}
        self.unanswered = 1  # the "ready" message

    def ready(self) -> Process:
        """Wait until the process serves commands."""
        self.pid = self.reply(60)
        return self

    def reply(self, timeout_s: float = DEADLINE_S + 15) -> Any:
        """The answer to the last command (an error there raises here)."""
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"rank process {self.proc.pid} did not answer within {timeout_s} s")
        status, value = self.conn.recv()
        self.unanswered -= 1
        if status != "ok":
            raise RuntimeError(f"rank process {self.proc.pid}: {value}")
        return value

    def call(self, command: str, *args: Any) -> Any:
        """Run a :class:`Rank` method in the process and wait for its answer."""
        self.start(command, *args)
        return self.reply()

    def start(self, *args: Any) -> None:
        """Send a command without waiting (collect its answer with :meth:`reply`)."""
        self.conn.send(args)
        self.unanswered += 1

    def settle(self) -> None:
        """Collect the answers a failed test left unread, so that the next command gets its own."""
        while self.unanswered and self.proc.is_alive():
            try:
                self.reply()
            except RuntimeError:
                pass


def spawn(n: int) -> list[Process]:
    """``n`` rank processes, ready for commands."""
    procs = [Process() for _ in range(n)]
    return [p.ready() for p in procs]


def shut_down(procs: list[Process]) -> None:
    """End the processes; none may be left, nor a shared-memory segment of theirs."""
    for p in procs:
        p.conn.close()  # a process waiting for a command closes what it has open and exits
    for p in procs:
        p.proc.join(timeout=10)
        if p.proc.is_alive():
            p.proc.kill()
            p.proc.join(timeout=5)
    pids = [str(p.pid) for p in procs]
    left = [n for n in os.listdir("/dev/shm") if any(f"-{pid}-" in n for pid in pids)]
    left += [f"sysv {line.split()[1]}" for line in _sysv_segments() if line.split()[4] in pids]
    assert not left, f"shared-memory segments left behind: {left}"
    codes = [p.proc.exitcode for p in procs]
    assert all(code in (0, -signal.SIGKILL) for code in codes), f"rank process exit codes {codes}"


@contextmanager
def ranks(procs: list[Process], tls_name: str, options: str = "", env: dict[str, str] | None = None
          ) -> Iterator[list[Process]]:
    """A Rank in each process with ``UCX_TLS`` for ``tls_name`` and ``env``, connected every rank to
    every rank (itself included); closed afterwards (in the processes still alive)."""
    world = len(procs)
    for r, p in enumerate(procs):  # the options proxy/service.py gives, then the test's
        rank_options = ",".join(filter(None, (f"rank={r},world={world}", options)))
        p.start("open", {"UCX_TLS": TLS[tls_name], **(env or {})}, world, rank_options)
    try:
        try:
            for p in procs:
                p.address, p.key = p.reply(60)
            peers = [(r, p.address, p.key) for r, p in enumerate(procs)]
            for p in procs:
                p.call("connect", peers)
        except RuntimeError as exc:
            if "unreachable" in str(exc).lower() or "no such device" in str(exc).lower():
                pytest.skip(f"UCX has no usable {tls_name} transport between two processes here: {exc}")
            raise
        yield procs
    finally:
        live = [p for p in procs if p.proc.is_alive()]
        for p in live:
            p.settle()
            p.start("close")
        for p in live:
            p.stats = p.reply()


@pytest.fixture(scope="module")
def pool() -> Iterator[list[Process]]:
    """Three rank processes shared by the tests (each test opens and closes its own Ranks)."""
    procs = spawn(3)
    try:
        yield procs
    finally:
        shut_down(procs)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tls_name,options,env,rounds", [
    ("sm", "", {}, 1),
    ("tcp", "", {}, 1),
    ("sm", "inline=0,bundle=0", {}, 1),  # every put through RMA (cma) and a flush
    # RMA striped over two TCP connections (where there are two devices) while signals take one:
    # only the flush orders them; and few operations in flight, so that posts stall
    ("tcp", "inline=0,bundle=0,max_ops=8", {"UCX_MAX_RMA_RAILS": "2"}, 16),
], ids=["sm", "tcp", "sm-rma", "tcp-rma-2-rails"])
def test_puts_with_signal_land_before_their_signals(pool: list[Process], tls_name: str, options: str,
                                                    env: dict[str, str], rounds: int) -> None:
    seed, posted = 11, []
    with ranks(pool[:2], tls_name, options, env) as (sender, receiver):
        for r in range(rounds):  # fresh counters and bytes each round
            plan = make_plan(seed + r, counters=8, per_counter=20, first_counter=8 * r)
            receiver.start("receive", seed + r, plan)
            sender.call("send", seed + r, 1, plan)
            assert receiver.reply()["moves"] > 0
            posted += plan
        loop = make_plan(seed + 100, counters=2, per_counter=8, max_len=32 << 10)  # to itself, through UCX
        sender.call("send", seed + 100, 0, loop)
        sender.call("receive", seed + 100, loop)
        posted += loop
        assert sender.call("failure") is None
    stats = sender.stats
    assert stats["transport_puts"] == sum(p.length > 0 for p in posted)
    assert stats["transport_signals"] == len(posted)
    if "max_ops=8" in options:
        assert stats["transport_stalls"] > 0  # the window of in-flight operations was hit


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tls_name,sizes", [
    ("sm", [64, 4096]),  # active messages only: shared memory to a dead process raises no error, its pid tells
    ("tcp", [64, 4096, 64 << 10]),  # the connection is reset
], ids=["sm", "tcp"])
def test_killed_peer_fails_alone(pool: list[Process], tls_name: str, sizes: list[int]) -> None:
    seed = 5
    plan = make_plan(seed, counters=4, per_counter=6)
    victim = spawn(1)
    try:
        with ranks([pool[0], *victim, pool[1]], tls_name) as (survivor, dead, other):
            dead.start("receive", seed, plan)
            survivor.call("send", seed, 1, plan)
            dead.reply()
            os.kill(dead.pid, signal.SIGKILL)
            dead.proc.join(timeout=10)
            reason = survivor.call("failing_stream", 1, sizes, 20.0)
            assert f"rank 1 (pid {dead.pid} " in reason, reason
            other.start("receive", seed + 1, plan)  # the proxy keeps serving the other peer
            survivor.call("send", seed + 1, 2, plan)
            other.reply()
            assert survivor.call("rank_failure", 2) is None
            assert survivor.call("failure") is None
    finally:
        shut_down(victim)


# ------------------------------------------------------------------------------------- measurement
def measure(procs: list[Process], tls_name: str, size: int, count: int, options: str = "") -> float:
    """Seconds for ``count`` puts-with-signal of ``size`` bytes from one process to another, from the
    first push to the last signal."""
    with ranks(procs, tls_name, options) as (sender, receiver):
        receiver.start("count", count)
        start = sender.call("stream", 1, size, count, max(1, min(16, DEST_BYTES // max(size, 1))))
        return receiver.reply() - start


def main() -> None:
    """Print the figures of the module docstring."""
    parser = argparse.ArgumentParser(description="UCX transport: one-way put-with-signal streams")
    parser.add_argument("--tls", nargs="*", default=["sm", "tcp"])
    parser.add_argument("--options", default="")
    args = parser.parse_args()
    procs = spawn(2)
    try:
        for tls_name in args.tls:
            for size, count in ((1 << 20, 2000), (64, 200000)):
                rates = [count / measure(procs, tls_name, size, count, args.options) for _ in range(3)]
                print(f"{tls_name}: {size}-byte puts: " + ", ".join(f"{r / 1e6:.3f} M/s = {r * size / 1e9:.2f} GB/s"
                                                                   for r in rates))
    finally:
        shut_down(procs)


if __name__ == "__main__":
    main()
