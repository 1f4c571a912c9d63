"""A real two-host job: two network namespaces joined by a veth pair, one torchrun per host.

Each host (``hostA``, ``hostB``; see :mod:`tests.netns`) has its own network, host name,
``/dev/shm``, ``/etc/hosts``, IPC namespace and boot id; the file system is shared. torchrun
starts 2 ranks per host (static rendezvous on host A's veth address) running
:mod:`tests.multihost_job`, which checks HT and LL dispatch/combine (BF16 and FP8) against the
reference and writes one JSON result per rank. Rows between the hosts can only cross the veth
pair, so this guards the control plane (rank 0's server on host A's address) and the data path
between real hosts. Runs on the backend the session was started with (``PORTEP_BACKEND``,
default portep's). Skipped where the machine does not allow it (not root, no ``ip netns``, no
veth, no ``unshare``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB = REPO_ROOT / "tests" / "multihost_job.py"
JOB_TIMEOUT_S = 240.0
NPROC_PER_NODE = 2
NUM_NODES = 2
WORLD_SIZE = NPROC_PER_NODE * NUM_NODES
MASTER_PORT = 29400  # free: the namespaces are new
LOG_TAIL_CHARS = 6000
# Placement set by an outer launcher or for virtual nodes (the job must find its own), and HTTP
# proxies (unreachable from the namespaces; gRPC would use them).
_DROPPED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PORTEP_RANKS_PER_NODE", "PORTEP_CONTROL_HOST",
                "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")

pytestmark = pytest.mark.timeout(JOB_TIMEOUT_S + 60)


def _torchrun() -> list[str]:
    """torchrun of this interpreter (its console script, else ``python -m torch.distributed.run``)."""
    script = Path(sys.executable).parent / "torchrun"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "torch.distributed.run"]


def _job_env(workdir: Path) -> dict[str, str]:
    """The launchers' environment: this one, without placement or proxies, with the repository
    importable and portep's deadline below the job's."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["PORTEP_TIMEOUT_S"] = "90"  # portep names a stuck peer before the job's deadline
    env["PORTEP_RUN_DIR"] = str(workdir / "run")
    return env


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<{exc}>"
    return text[-LOG_TAIL_CHARS:]


def _run_job(hosts: netns.TwoHosts, workdir: Path) -> tuple[list[int | None], list[Path]]:
    """torchrun on both hosts; exit codes (None: killed at the deadline) and log files."""
    out = workdir / "results"
    out.mkdir()
    env = _job_env(workdir)
    master = hosts.hosts[0].address
    logs = []
    for node_rank, host in enumerate(hosts.hosts):
        argv = [*_torchrun(), "--nnodes", str(NUM_NODES), "--nproc-per-node", str(NPROC_PER_NODE),
                "--node-rank", str(node_rank), "--master-addr", master, "--master-port", str(MASTER_PORT),
                "--rdzv-backend", "static", "--max-restarts", "0", str(JOB), "--out", str(out)]
        logs.append(workdir / f"{host.hostname}.log")
        hosts.start(host, argv, env, logs[-1], cwd=REPO_ROOT)
    return hosts.wait(JOB_TIMEOUT_S), logs


def _report(codes: list[int | None], logs: list[Path], results: dict[int, dict[str, Any]]) -> str:
    parts = [f"exit codes per host: {codes} (None: still running after {JOB_TIMEOUT_S:.0f} s, killed)"]
    for rank in range(WORLD_SIZE):
        result = results.get(rank)
        if result is None:
            parts.append(f"rank {rank}: no result")
        elif not result.get("ok"):
            parts.append(f"rank {rank} failed in stage {result.get('stage')}:\n{result.get('error')}")
    for log in logs:
        parts.append(f"--- {log.name} (tail) ---\n{_tail(log)}")
    return "\n".join(parts)


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[netns.TwoHosts]:
    """Two emulated hosts, torn down after the test whatever happened."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"two-host test needs network namespaces: {reason}")
    with netns.TwoHosts(tmp_path) as hosts:
        yield hosts


def test_two_hosts_ht_and_ll(two_hosts: netns.TwoHosts, tmp_path: Path) -> None:
    """HT and LL dispatch/combine between two hosts match the reference on every rank."""
    start = time.monotonic()
    codes, logs = _run_job(two_hosts, tmp_path)
    elapsed = time.monotonic() - start
    results: dict[int, dict[str, Any]] = {}
    for path in sorted((tmp_path / "results").glob("rank*.json")):
        result = json.loads(path.read_text())
        results[result["rank"]] = result
    report = _report(codes, logs, results)
    assert sorted(results) == list(range(WORLD_SIZE)) and all(r["ok"] for r in results.values()), report
    assert codes == [0, 0], report

    addresses = {host.hostname: host.address for host in two_hosts.hosts}
    host_names = [host.hostname for host in two_hosts.hosts]
    expected_hosts = [host_names[r // NPROC_PER_NODE] for r in range(WORLD_SIZE)]
    for rank, result in sorted(results.items()):
        where = f"rank {rank} ({elapsed:.0f} s)"
        # Identity: node-major placement, each host's name resolves to its veth address.
        assert result["hostname"] == expected_hosts[rank], f"{where}: on {result['hostname']}"
        assert result["host_address"] == addresses[result["hostname"]], f"{where}: {result['host_address']}"
        assert result["hosts"] == expected_hosts, f"{where}: hosts {result['hosts']}"
        assert result["local_world_size"] == NPROC_PER_NODE, f"{where}: LOCAL_WORLD_SIZE"
        assert result["local_rank"] == rank % NPROC_PER_NODE, f"{where}: LOCAL_RANK"
        assert result["hostname_ranks_per_node"] == NPROC_PER_NODE, (
            f"{where}: node discovery from host names: {result['hostname_ranks_per_node']}")
        for mode in ("ht", "ll"):
            topology = result[mode]["topology"]
            assert topology == {"ranks_per_node": NPROC_PER_NODE, "num_nodes": NUM_NODES,
                                "node": rank // NPROC_PER_NODE, "local_rank": rank % NPROC_PER_NODE}, (
                f"{where}: {mode} Buffer topology {topology}")
        # A control-plane server (if the backend runs one) listens on host A's veth address.
        for job in result["ht"]["control_plane_jobs"]:
            assert job["host"] == host_names[0] and job["address"].startswith(addresses[host_names[0]] + ":"), (
                f"{where}: control plane {job}")
        # Rows crossed between the hosts.
        ht, ll = result["ht"], result["ll"]
        assert ht["stats"]["ht_internode_rows"] > 0 and ht["stats"]["rows_peers"] > 0, (
            f"{where}: HT stats {ht['stats']}")
        assert ht["bf16"]["dispatch_internode_rows"] > 0 and ht["fp8"]["dispatch_internode_rows"] > 0, (
            f"{where}: HT dispatch sent no row to the other host: {ht}")
        assert ll["stats"]["rows_world"] > 0, f"{where}: LL stats {ll['stats']}"
        assert ll["bf16"]["rows_from_other_nodes"] > 0 and ll["fp8"]["rows_from_other_nodes"] > 0, (
            f"{where}: LL dispatch received no row from the other host: {ll}")
    backends = {result[mode]["backend"] for result in results.values() for mode in ("ht", "ll")}
    assert len(backends) == 1, f"ranks used different backends: {backends}"
