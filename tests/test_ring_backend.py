"""The ring backend's machinery: descriptors flow through the proxy between nodes (and only
there), a dead proxy gives errors not hangs, no proxy outlives its rank, mismatched shapes are
named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests import tasks_ring
from tests.rankpool import RankPool


def test_descriptors_flow_through_proxy_between_nodes(pool4: RankPool) -> None:
    stats = pool4.run(tasks_ring.proxy_stats, num_nodes=2)
    for rank, s in enumerate(stats):
        for mode in ("ht", "ll"):
            assert s[f"{mode}_proxy_descriptors"] > 0, f"rank {rank}: no descriptor reached the proxy ({mode})"
            assert s[f"{mode}_proxy_bytes"] > 0 and s[f"{mode}_proxy_signals"] > 0, (rank, mode, s)
            assert s[f"{mode}_chunks_written"] > 0 and s[f"{mode}_chunks_read"] > 0, (rank, mode, s)


def test_one_node_needs_no_proxy(pool2: RankPool) -> None:
    stats = pool2.run(tasks_ring.proxy_stats, num_nodes=1)
    for s in stats:
        assert s["ht_chunks_written"] > 0
        assert not any(key.startswith("ht_proxy_") for key in s), s


def test_killed_proxy_fails_every_rank_within_deadline(pool4: RankPool) -> None:
    results = pool4.run(tasks_ring.killed_proxy, victim=1, timeout_s=4.0)
    assert "proxy" in results[1]["error"] and "rank 1" in results[1]["error"], results[1]
    for rank, result in enumerate(results):
        assert result["error"], f"rank {rank}: the round after the kill did not fail"
        assert result["elapsed"] < 4.0 + 3.0, f"rank {rank}: failed after {result['elapsed']:.1f} s"
        assert result["fresh_ok"], f"rank {rank}: a new Buffer did not work after the failure"


@pytest.mark.parametrize(("param", "named"), [("hidden", "hidden"), ("max_tokens", "num_max_dispatch_tokens_per_rank"),
                                             ("num_experts", "")])
def test_ranks_that_disagree_on_a_call_are_named(pool4: RankPool, param: str, named: str) -> None:
    messages = pool4.run(tasks_ring.mismatched_call, param=param)
    for rank, message in enumerate(messages):
        assert message, f"rank {rank}: no error although rank 0 called with another {param}"
        if rank != 0:
            assert "rank 0" in message, f"rank {rank}: the error does not name rank 0: {message!r}"
        assert named in message, f"rank {rank}: the error does not name {named}: {message!r}"


CHILD = textwrap.dedent("""
    import json, sys, time
    from portep.proxy.process import ProxyProcess
    from portep.proxy.ring import DescriptorRing
    from portep.proxy.window import Window
    window = Window.create(4, 1 << 16)
    ring = DescriptorRing.create(64)
    proxy = ProxyProcess(0, 1, window, [ring], "shm", timeout_s=20)
    proxy.connect({})
    print(json.dumps({"proxy": proxy.proc.pid, "segments": [window.name, ring.name]}), flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(30)
def test_proxy_exits_and_segments_go_when_the_rank_is_killed() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(child.stdout.readline())
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            proxy_alive = os.path.exists(f"/proc/{info['proxy']}") and "Z" not in _state(info["proxy"])
            left = [s for s in info["segments"] if os.path.exists(f"/dev/shm/{s}")]
            if not proxy_alive and not left:
                break
            time.sleep(0.1)
        assert not proxy_alive, "the proxy outlived its rank"
        assert not left, f"segments left behind: {left}"
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0]
    except OSError:
        return "gone"


def test_dropped_messages_time_out_naming_the_operation(pool4: RankPool) -> None:
    results = pool4.run(tasks_ring.dropped_messages, drop=0.5, timeout_s=3.0)
    assert any(r["error"] for r in results), f"nothing was lost at a 50% drop rate: {results}"
    for rank, r in enumerate(results):
        if r["error"]:
            assert "low_latency_" in r["error"], f"rank {rank}: the error does not name the operation: {r}"
            assert r["elapsed"] < 3.0 + 3.0, f"rank {rank}: failed only after {r['elapsed']:.1f} s"
        else:
            assert r["diff"] < 1e-5, f"rank {rank}: a wrong result instead of an error: {r}"


def test_destroy_delivers_the_last_message_to_a_slow_peer(pool4: RankPool) -> None:
    assert pool4.run(tasks_ring.destroy_right_after, cycles=4, delay_rank=3) == [4] * 4
