"""The ring backend's machinery: descriptors flow through the proxy between nodes (and only
there), one proxy thread serves every Buffer of a process, a broken link gives errors naming the
ranks instead of hangs, killed ranks leave nothing behind, mismatched shapes are named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from portep.launch import free_port
from tests import tasks_ring
from tests.rankpool import RankPool


def test_descriptors_flow_through_proxy_between_nodes(pool4: RankPool) -> None:
    stats = pool4.run(tasks_ring.proxy_stats, num_nodes=2)
    for rank, s in enumerate(stats):
        for mode in ("ht", "ll"):
            assert s[f"{mode}_proxy_descriptors"] > 0, f"rank {rank}: no descriptor reached the proxy ({mode})"
            assert s[f"{mode}_proxy_transport_bytes"] > 0 and s[f"{mode}_proxy_transport_signals"] > 0, (rank, mode, s)
            assert s[f"{mode}_bytes_staged"] > 0 and s[f"{mode}_bytes_direct"] > 0, (rank, mode, s)
            assert s[f"{mode}_chunks_written"] > 0 and s[f"{mode}_chunks_read"] > 0, (rank, mode, s)
        assert s["proxies"] == 1, f"rank {rank}: its HT and LL Buffers should share one proxy, got {s['proxies']}"


def test_one_node_needs_no_proxy(pool2: RankPool) -> None:
    stats = pool2.run(tasks_ring.proxy_stats, num_nodes=1)
    for s in stats:
        assert s["ht_chunks_written"] > 0
        assert not any(key.startswith("ht_proxy_") for key in s), s


def test_a_broken_link_fails_every_rank_within_deadline_naming_the_ranks(pool4: RankPool) -> None:
    results = pool4.run(tasks_ring.broken_link, victim=1, peer=2, timeout_s=4.0)
    assert "rank 2" in results[1]["error"], f"rank 1 broke its link to rank 2 but does not name it: {results[1]}"
    assert "rank 1" in results[2]["error"] or "rank 2" in results[2]["error"], results[2]
    for rank, result in enumerate(results):
        assert result["error"], f"rank {rank}: the round after the break did not fail"
        assert "proxy" not in result["error"].split(":")[0], f"rank {rank} blames a proxy: {result['error']}"
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
    import json, os, sys, time
    import torch.distributed as dist
    os.environ["PORTEP_RANKS_PER_NODE"] = "1"
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
    import portep
    size = portep.Buffer.get_low_latency_rdma_size_hint(8, 128, 2, 4)
    buffer = portep.Buffer(dist.group.WORLD, num_rdma_bytes=size, low_latency_mode=True)
    shm = sorted(f for f in os.listdir("/dev/shm") if f"-{os.getpid()}-" in f)
    print(json.dumps({"pid": os.getpid(), "proxies": len(portep.proxy.service.proxies()), "shm": shm}), flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(60)
def test_killed_ranks_leave_no_segment_and_no_process() -> None:
    """A rank's windows are unlinked as soon as its peers have mapped them, and its proxy is a thread
    of it: a SIGKILL leaves nothing in /dev/shm and no process behind."""
    port = str(free_port())
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(r), port], stdout=subprocess.PIPE, text=True)
                for r in range(2)]
    try:
        infos = [json.loads(child.stdout.readline()) for child in children]
        for info in infos:
            assert info["proxies"] == 1, info
            assert not info["shm"], f"segments still named in /dev/shm while the job runs: {info['shm']}"
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(5)
        left = [f for f in os.listdir("/dev/shm") if any(f"-{info['pid']}-" in f for info in infos)]
        assert not left, f"segments left behind: {left}"
        assert not [i["pid"] for i in infos if os.path.exists(f"/proc/{i['pid']}")], "a killed rank lingers"
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.stdout.close()


def test_an_arena_past_the_engine_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from portep.backends import ring

    monkeypatch.setenv(ring.ARENA_ENV, str(ring.MAX_ARENA_BYTES + 1))
    with pytest.raises(ValueError, match=ring.ARENA_ENV):
        ring.arena_bytes_from_env()
    monkeypatch.setenv(ring.ARENA_ENV, "1000")
    assert ring.arena_bytes_from_env() == 1024  # whole cache lines


@pytest.mark.parametrize(("variable", "value"), [("PORTEP_ARENA_BYTES", "1048576"), ("PORTEP_CHUNK_SLOTS", "4")])
def test_ranks_that_disagree_on_the_stream_layout_are_named(pool4: RankPool, variable: str, value: str) -> None:
    errors = pool4.run(tasks_ring.mismatched_layout, variable=variable, value=value)
    for rank, error in enumerate(errors):
        assert "disagree" in error and variable in error, f"rank {rank}: {error!r}"
        named = "rank 1" if rank != 1 else "rank 0"
        assert named in error, f"rank {rank} does not name the other side: {error!r}"


def test_dropped_messages_time_out_naming_the_operation(pool4: RankPool) -> None:
    results = pool4.run(tasks_ring.dropped_messages, drop=0.5, timeout_s=3.0)
    assert any(r["error"] for r in results), f"nothing was lost at a 50% drop rate: {results}"
    assert sum(r["dropped"] for r in results) > 0, f"the fabric dropped nothing: {results}"
    for rank, r in enumerate(results):
        if r["error"]:
            assert "low_latency_" in r["error"], f"rank {rank}: the error does not name the operation: {r}"
            assert r["elapsed"] < 3.0 + 3.0, f"rank {rank}: failed only after {r['elapsed']:.1f} s"
        else:
            assert r["diff"] < 1e-5, f"rank {rank}: a wrong result instead of an error: {r}"


def test_destroy_delivers_the_last_message_to_a_slow_peer(pool4: RankPool) -> None:
    assert pool4.run(tasks_ring.destroy_right_after, cycles=4, delay_rank=3) == [4] * 4
