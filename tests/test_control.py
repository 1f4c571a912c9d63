"""The control plane: rendezvous, heartbeat death detection, stats, job files and ``portep status``.

Ranks are threads of this process or, where a death must be real, separate processes that are
killed (SIGKILL), frozen (SIGSTOP) or exit without closing. Heartbeat timeouts are short (1.5 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portep.cli import main
from portep.errors import CommTimeoutError, PeerFailureError, TransportError
from portep.launch import free_port
from portep.proxy.control import (
    CONNECTION_GRACE_S,
    ControlClient,
    ControlServer,
    decode,
    encode,
    fetch_stats,
    list_jobs,
)

pytestmark = pytest.mark.timeout(30)

TIMEOUT_S = 1.5  # heartbeat timeout
INTERVAL_S = 0.1  # heartbeat interval
WORLD = 4
ROOT = Path(__file__).resolve().parents[1]

# A rank in its own process: heartbeats, says it is ready, then per mode leaves cleanly, exits
# without close(), or waits to be killed / frozen.
RANK_PROCESS = r"""
import sys, time
from portep.proxy.control import ControlClient
address, rank, world, mode, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
client = ControlClient(address, rank, world, heartbeat_interval_s=interval)
client.start_heartbeats()
client.put(f"ready/{rank}", b"1")
if mode == "leave":
    client.close()
    sys.exit(0)
if mode == "exit":
    sys.exit(3)
time.sleep(60)
"""


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.fixture(autouse=True)
def jobs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private job-file directory; afterwards no new thread and no job file may remain."""
    directory = tmp_path / "jobs"
    monkeypatch.setenv("PORTEP_RUN_DIR", str(directory))
    before = _threads()
    yield directory
    deadline = time.monotonic() + 5.0
    while _threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _threads() - before, f"threads left running: {_threads() - before}"
    assert not list(directory.glob("*.json")), f"job files left: {list(directory.iterdir())}"


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start processes; every one must have exited by the end of the test (leftovers are killed)."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        return proc

    yield start
    alive = [proc.pid for proc in procs if proc.poll() is None]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    assert not alive, f"processes still running at the end of the test: {alive}"


@pytest.fixture
def server() -> Iterator[ControlServer]:
    srv = ControlServer(WORLD, heartbeat_timeout_s=TIMEOUT_S, job="test-job").start()
    yield srv
    srv.stop(grace_s=0.5)
    assert srv.job_path is None


@pytest.fixture
def clients(server: ControlServer) -> Iterator[list[ControlClient]]:
    """One client per rank (in threads of this process); closed at the end."""
    made = [ControlClient(server.address, rank, WORLD, heartbeat_interval_s=INTERVAL_S) for rank in range(WORLD)]
    yield made
    for client in made:
        client.close()


def _on_threads(fn: Callable[[ControlClient], object], clients: list[ControlClient]) -> dict[int, object]:
    results: dict[int, object] = {}

    def run(client: ControlClient) -> None:
        try:
            results[client.rank] = fn(client)
        except Exception as exc:
            results[client.rank] = exc

    threads = [threading.Thread(target=run, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def _wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------- wire + rendezvous
def test_wire_format_round_trip() -> None:
    message = ({"key": "a", "n": [1, 2]}, [b"", b"\x00\xff" * 3, b"xyz"])
    assert decode(encode(message)) == message
    with pytest.raises(ValueError, match="trailing"):
        decode(encode(message) + b"!")


def test_allgather_and_barrier_across_threads(clients: list[ControlClient]) -> None:
    results = _on_threads(lambda c: c.allgather("endpoints", f"ep{c.rank}".encode() * (c.rank + 1), 5.0), clients)
    expected = [f"ep{rank}".encode() * (rank + 1) for rank in range(WORLD)]
    assert results == {rank: expected for rank in range(WORLD)}
    assert _on_threads(lambda c: c.barrier("after-endpoints", 5.0), clients) == dict.fromkeys(range(WORLD))
    # the same key again is a new round
    again = _on_threads(lambda c: c.allgather("endpoints", bytes([c.rank]), 5.0), clients)
    assert again == {rank: [bytes([r]) for r in range(WORLD)] for rank in range(WORLD)}


def test_get_waits_for_put_then_times_out(clients: list[ControlClient]) -> None:
    timer = threading.Timer(0.2, clients[1].put, ("key", b"value"))
    timer.start()
    start = time.monotonic()
    assert clients[0].get("key", timeout_s=5.0) == b"value"
    assert 0.1 < time.monotonic() - start < 2.0
    timer.join()
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match="'missing'.*0.3 s.*was not put") as info:
        clients[0].get("missing", timeout_s=0.3)
    assert 0.25 < time.monotonic() - start < 2.0
    assert info.value.op == "control.get('missing')"


def test_allgather_timeout_names_the_ranks_that_did_not_arrive(clients: list[ControlClient]) -> None:
    results = _on_threads(lambda c: c.allgather("partial", b"x", 0.4), clients[:2])
    for rank in (0, 1):
        error = results[rank]
        assert isinstance(error, CommTimeoutError), error
        assert error.ranks == (2, 3)
        assert "rank(s) [2, 3] did not arrive" in str(error)


def test_errors_are_typed() -> None:
    closed = f"127.0.0.1:{free_port()}"
    client = ControlClient(closed, 0, 2, rpc_timeout_s=0.3)
    try:
        with pytest.raises(CommTimeoutError, match="did not answer"):
            client.put("k", b"v")
    finally:
        client.close()
    with pytest.raises(TransportError, match="UNAVAILABLE"):
        fetch_stats(closed, timeout_s=2.0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ControlClient(closed, 2, 2)
    with ControlServer(2, job_file=False) as srv:
        wrong = ControlClient(srv.address, 3, 4)  # the server's job has 2 ranks
        with pytest.raises(ValueError, match="world size is 4, this job.s is 2"):
            wrong.put("k", b"v")
        wrong.close()


# ---------------------------------------------------------------------------------------------- health
def test_killed_exited_and_departed_processes(server: ControlServer,
                                              spawn: Callable[..., subprocess.Popen]) -> None:
    """SIGKILL -> named as dead, fast; exit without close() -> dead ("exiting"); leave() -> not dead."""
    me = ControlClient(server.address, 0, WORLD, heartbeat_interval_s=INTERVAL_S)
    me.start_heartbeats()
    modes = {1: "hang", 2: "leave", 3: "exit"}
    procs = {rank: spawn("-c", RANK_PROCESS, server.address, str(rank), str(WORLD), mode, str(INTERVAL_S))
             for rank, mode in modes.items()}
    try:
        for rank in modes:
            me.get(f"ready/{rank}", timeout_s=20.0, from_rank=rank)
        assert procs[2].wait(10) == 0 and procs[3].wait(10) == 3
        _wait_for(lambda: 3 in me.dead_ranks(), 2.0, "rank 3 reported exiting")
        assert me.dead_ranks()[3] == "exiting: the process exited without close()"

        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        procs[1].wait(5)
        while True:
            try:
                me.check("dispatch")
            except PeerFailureError as exc:
                if 1 in exc.ranks:
                    error = exc
                    break
            assert time.monotonic() - killed_at < TIMEOUT_S, "SIGKILLed rank not detected within the timeout"
            time.sleep(0.005)
        detected_s = time.monotonic() - killed_at
        assert error.op == "dispatch" and error.ranks == (1, 3)
        assert error.causes[1].startswith("connection lost")
        assert "rank 1: connection lost" in str(error) and "rank 3: exiting" in str(error)
        assert detected_s > CONNECTION_GRACE_S

        with pytest.raises(PeerFailureError, match=r"allgather\('late'\).*rank 1: connection lost"):
            me.allgather("late", b"", timeout_s=10.0)  # ends at once: its missing ranks are dead

        # rank 2 left, then its process exited and its connection closed: not a death
        assert 2 not in me.dead_ranks() and 2 not in server.dead_ranks()
        assert server.get_stats()["ranks"][2]["state"] == "left"
    finally:
        me.close()


def test_frozen_process_is_dead_after_the_heartbeat_timeout(server: ControlServer,
                                                            spawn: Callable[..., subprocess.Popen]) -> None:
    me = ControlClient(server.address, 0, WORLD, heartbeat_interval_s=INTERVAL_S)
    me.start_heartbeats()
    proc = spawn("-c", RANK_PROCESS, server.address, "2", str(WORLD), "hang", str(INTERVAL_S))
    try:
        me.get("ready/2", timeout_s=20.0)
        proc.send_signal(signal.SIGSTOP)  # its socket stays open: only the heartbeats stop
        took = _wait_for(lambda: 2 in me.dead_ranks(), TIMEOUT_S + 1.5, "frozen rank detected")
        assert TIMEOUT_S - 0.3 < took < TIMEOUT_S + 1.0
        with pytest.raises(PeerFailureError, match=r"combine: peer rank\(s\) \[2\] failed: rank 2: heartbeat: "
                                                   r"no heartbeat for 1\.[5-9]\d s \(timeout 1.5 s\)"):
            me.check("combine")
    finally:
        proc.kill()
        proc.wait(5)
        me.close()


def test_reported_failure_reaches_every_rank(clients: list[ControlClient]) -> None:
    for client in clients:
        client.start_heartbeats()
    with pytest.raises(RuntimeError, match="boom"), clients[3]:
        raise RuntimeError("boom")
    for client in clients[:3]:
        _wait_for(lambda c=client: 3 in c.dead_ranks(), 2.0, f"rank {client.rank} hears of rank 3")
        assert client.dead_ranks() == {3: "reported failure: RuntimeError: boom"}
    clients[0].fail("NIC mlx5_1 went down")
    _wait_for(lambda: 0 in clients[1].dead_ranks(), 2.0, "rank 1 hears of rank 0")
    with pytest.raises(PeerFailureError, match=r"rank 0: reported failure: NIC mlx5_1 went down; rank 3"):
        clients[1].check("low_latency_dispatch")


def test_clean_leave_is_not_a_death(clients: list[ControlClient], server: ControlServer) -> None:
    for client in clients:
        client.start_heartbeats()
    _wait_for(lambda: clients[0].dead_ranks() == {} and clients[0]._last_reply, 2.0, "first heartbeat reply")
    clients[2].leave()
    clients[3].close()
    time.sleep(TIMEOUT_S + 0.3)
    clients[0].check("dispatch")
    assert server.dead_ranks() == {}
    assert [server.get_stats()["ranks"][r]["state"] for r in range(WORLD)] == ["alive", "alive", "left", "left"]


def test_stopped_server_is_named_by_clients(clients: list[ControlClient], server: ControlServer) -> None:
    clients[1].start_heartbeats()
    _wait_for(lambda: clients[1]._last_reply, 2.0, "first heartbeat reply")
    waiting = _on_threads_async(lambda: clients[2].get("never", timeout_s=20.0))
    time.sleep(0.1)
    server.stop(grace_s=0.0)
    error = waiting()
    assert isinstance(error, TransportError) and "shutting down" in str(error)
    _wait_for(lambda: 0 in clients[1].dead_ranks(), 2.0, "the stop is heard")
    assert clients[1].dead_ranks()[0].startswith("control plane: stopped by its host")


def _on_threads_async(fn: Callable[[], object]) -> Callable[[], object]:
    box: list[object] = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as exc:
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def result() -> object:
        thread.join(10)
        return box[0]
    return result


# ---------------------------------------------------------------------------------------------- stats + status
@dataclass
class ProxyStats:
    """Stats as a dataclass (report_stats takes those as well as mappings)."""

    descriptors: int = 0
    bytes_posted: int = 0
    max_queue_depth: int = 0
    per_peer_bytes: dict[int, int] = field(default_factory=dict)


def test_stats_round_trip(clients: list[ControlClient], server: ControlServer) -> None:
    proxy = ProxyStats(descriptors=120, bytes_posted=3 << 20, max_queue_depth=7, per_peer_bytes={1: 10})
    clients[0].report_stats(0, proxy)
    clients[0].report_stats(1, {"descriptors": 5, "bytes": 2048, "queue_depth": 1, "stalls": 2})
    counter = {"descriptors": 0}

    def live() -> dict[str, int]:
        counter["descriptors"] += 1
        return dict(counter)

    clients[2].watch_stats(0, live)
    clients[2].start_heartbeats()
    _wait_for(lambda: 2 in clients[1].get_stats()["proxies"], 2.0, "piggybacked stats")
    stats = clients[1].get_stats()
    assert stats["world_size"] == WORLD and stats["dead"] == {}
    assert stats["proxies"][0][0]["stats"]["bytes_posted"] == 3 << 20
    assert stats["proxies"][0][0]["stats"]["per_peer_bytes"] == {"1": 10}
    assert stats["proxies"][0][1]["stats"]["stalls"] == 2
    assert 0 <= stats["proxies"][0][1]["age_s"] < 2.0
    assert stats["proxies"][2][0]["stats"]["descriptors"] >= 1
    assert stats["ranks"][2]["state"] == "alive" and stats["ranks"][2]["heartbeat_age_s"] < 1.0
    assert server.get_stats()["proxies"][0][1] == stats["proxies"][0][1] | {"age_s": pytest.approx(
        stats["proxies"][0][1]["age_s"], abs=2.0)}


def test_status_prints_every_running_job(clients: list[ControlClient], server: ControlServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    clients[0].report_stats(0, ProxyStats(descriptors=120, bytes_posted=3 << 20, max_queue_depth=7))
    clients[1].report_stats(0, {"descriptors": 5, "bytes": 2048, "queue_depth": 1, "stalls": 2})
    clients[2].start_heartbeats()
    clients[3].fail("proxy thread crashed")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"job test-job at {server.address} (world size 4, pid {os.getpid()}" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "proxy"])
    assert lines[header].split() == ["rank", "proxy", "descriptors", "bytes", "queue", "depth", "stalls", "age", "(s)"]
    assert lines[header + 1].split()[:7] == ["0", "0", "120", "3.0", "MiB", "7", "-"]
    assert lines[header + 2].split()[:7] == ["1", "0", "5", "2.0", "KiB", "1", "2"]
    assert "rank 3: reported failure: proxy thread crashed" in out

    assert main(["status", "--address", server.address, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["stats"]["dead"] == {"3": "reported failure: proxy thread crashed"}

    assert main(["status", "--address", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "unreachable" in capsys.readouterr().out


def test_job_files_are_written_removed_and_stale_ones_ignored(jobs_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    srv = ControlServer(2, job="lifecycle").start()
    path = jobs_dir / "lifecycle.json"
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["address"] == srv.address and info["world_size"] == 2
    assert [job["job"] for job in list_jobs()] == ["lifecycle"]
    srv.stop()
    assert not path.exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = jobs_dir / "stale.json"
    stale.write_text(json.dumps({"job": "stale", "pid": gone.pid, "host": os.uname().nodename,
                                 "address": "127.0.0.1:1", "world_size": 2, "start_time": 0}))
    assert main(["status"]) == 0
    assert "no running portep job found" in capsys.readouterr().out
    assert not stale.exists()


def _start_server_process(spawn: Callable[..., subprocess.Popen], jobs_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = spawn("-m", "portep.cli", "control-server", "--world-size", "2", "--heartbeat-timeout-s", str(TIMEOUT_S),
                 "--job", "standalone")
    line = proc.stdout.readline()
    assert "portep control plane listening on" in line, line + proc.stderr.read()
    address = line.split(" on ")[1].split()[0]
    assert (jobs_dir / "standalone.json").exists()
    return proc, address


def test_standalone_server_stops_cleanly_on_sigterm(spawn: Callable[..., subprocess.Popen], jobs_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    proc, address = _start_server_process(spawn, jobs_dir)
    assert main(["status"]) == 0
    assert f"job standalone at {address} (world size 2" in capsys.readouterr().out
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not (jobs_dir / "standalone.json").exists()


def test_unreachable_server_counts_as_dead_host(spawn: Callable[..., subprocess.Popen], jobs_dir: Path) -> None:
    proc, address = _start_server_process(spawn, jobs_dir)
    client = ControlClient(address, 1, 2, heartbeat_interval_s=INTERVAL_S)
    try:
        client.start_heartbeats()
        _wait_for(lambda: client._last_reply, 5.0, "first heartbeat reply")
        proc.kill()
        proc.wait(5)
        took = _wait_for(lambda: 0 in client.dead_ranks(), TIMEOUT_S + 1.0, "server death noticed")
        assert took > TIMEOUT_S - 0.3
        with pytest.raises(PeerFailureError, match=r"rank 0: control plane: no heartbeat reply from"):
            client.check("dispatch")
    finally:
        client.close()
    assert [job["job"] for job in list_jobs()] == []  # its job file was stale: removed
    assert not (jobs_dir / "standalone.json").exists()
