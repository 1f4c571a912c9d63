"""A rank that SIGKILLs itself at any moment of a Buffer's life — right after creation, between two
calls, in the middle of an HT dispatch, an LL dispatch or an LL combine — over each inter-node
transport (UCX on shared memory, UCX on TCP, the software fabric) between 2 virtual nodes of 2
ranks: every survivor's pending or next call raises ``PeerFailureError`` naming it, within seconds,
without blaming its own proxy or transport; with ``enable_shrink`` the survivors drop it and keep
combining correctly among themselves on the same Buffer; nothing is left behind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import tasks_failures
from tests.conftest import SHM_DIR, WORKER_ENV
from tests.rankpool import RankPool, live_pids

WORLD = 4
TIMEOUT_S = 30  # portep's deadline: detection must come well before it
HEARTBEAT_TIMEOUT_S = 2
# A death is seen in well under a second (a failed link, the control plane's notice); the control
# plane's own host (rank 0) after the heartbeat timeout. Either way far below portep's deadline.
DETECT_WITHIN_S = 3 * HEARTBEAT_TIMEOUT_S
AGAIN_WITHIN_S = 2.0  # a broken Buffer's next call fails at once
TEARDOWN_WITHIN_S = 5.0  # a survivor drops its Buffer and stops its proxies without waiting on the dead
SHRINK_ROUNDS = 5
RANKS_PER_NODE = 2
TEST_TIMEOUT_S = 90
TRANSPORTS: dict[str, dict[str, str]] = {
    "fabric": {"PORTEP_TRANSPORT": "fabric"},
    "ucx-sm": {"PORTEP_TRANSPORT": "ucx", "UCX_TLS": "sm,self"},
    "ucx-tcp": {"PORTEP_TRANSPORT": "ucx", "UCX_TLS": "tcp,self"},
}
# How a rank blames itself: its proxy stopped, a TransportError ("<op>: transport error: ..."), its
# deadline ("<op>: timed out after ..."), also when quoted in a peer's failure notice.
OWN_FAULT = ("this rank's proxy", ": transport error:", ": timed out after")


def _ucx_built() -> bool:
    """Whether the UCX transport library is built and loads."""
    try:
        import libucx  # noqa: F401

        from portep.native.engine import transport_ops

        transport_ops("ucx")
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False
    return True


UCX = pytest.mark.skipif(not _ucx_built(), reason="portep.native._ucx is not built (needs the libucx wheel)")


def _transport_param(transport: str, *rest: Any) -> Any:
    return pytest.param(transport, *rest, marks=[UCX] if transport.startswith("ucx") else [],
                        id="-".join(str(p) for p in (transport, *rest)))


# Every moment over the fabric and UCX on shared memory, a subset over UCX on TCP; victims on
# either node, the control plane's host (rank 0) among them.
KILL_CASES = [
    *(_transport_param("fabric", moment, victim) for moment, victim in
      [("created", 2), ("between", 1), ("ht-dispatch", 3), ("ll-dispatch", 0), ("ll-combine", 2)]),
    *(_transport_param("ucx-sm", moment, victim) for moment, victim in
      [("created", 3), ("between", 2), ("ht-dispatch", 1), ("ll-dispatch", 2), ("ll-combine", 0)]),
    *(_transport_param("ucx-tcp", moment, victim) for moment, victim in
      [("created", 1), ("ht-dispatch", 2), ("ll-combine", 3)]),
]
SHRINK_CASES = [
    _transport_param("fabric", "between", 2), _transport_param("fabric", "ll-combine", 3),
    _transport_param("fabric", "between", 0),
    _transport_param("ucx-sm", "between", 3), _transport_param("ucx-sm", "ll-dispatch", 1),
    _transport_param("ucx-tcp", "between", 2),
]


def _shm_names() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except OSError:
        return set()


def _new_segments_of(pids: list[int], before: set[str]) -> list[str]:
    """portep's /dev/shm segments named after one of ``pids`` (``portep-<kind>-<pid>-<n>``) that
    were not there ``before`` (a stale segment of another session may carry a reused pid)."""
    return sorted(n for n in _shm_names() - before
                  if n.startswith("portep-") and any(f"-{pid}-" in n for pid in pids))


def survivors_outcomes(task: Callable[..., None], tmp_path: Path, transport: str, victim: int,
                       leak_check: list[RankPool], **kwargs: Any) -> dict[int, dict[str, Any]]:
    """Run ``task`` on a throw-away pool over ``transport`` (the killed worker takes it down); the
    survivors' outcomes, each with how long its Buffer's and proxies' teardown took. No process
    and no segment of the pool may be left."""
    pool = RankPool(WORLD, env={**WORKER_ENV, **TRANSPORTS[transport], "PORTEP_TIMEOUT_S": str(TIMEOUT_S),
                                "PORTEP_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)})
    leak_check.append(pool)
    before = _shm_names()
    try:
        with pytest.raises(AssertionError, match="worker died") as failure:
            pool.run(task, timeout=60, victim=victim, out_dir=str(tmp_path), **kwargs)
    finally:
        pool.close()
    assert not live_pids(pool.all_pids), f"worker processes left: {live_pids(pool.all_pids)}"
    leaked = _new_segments_of(pool.all_pids, before)
    assert not leaked, f"segments left in {SHM_DIR}: {leaked}"
    outcomes = {}
    for rank in range(WORLD):
        if rank != victim:
            path = tmp_path / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} did not finish: {failure.value}"
            outcome = json.loads(path.read_text())
            teardown = {k: round(v, 2) for k, v in outcome.items() if k.endswith("teardown_s")}
            assert all(v < TEARDOWN_WITHIN_S for v in teardown.values()), f"rank {rank}: slow teardown {teardown}"
            outcomes[rank] = outcome
    return outcomes


def _posted_after_death(rank: int, victim: int, moment: str, ll_moment: str, outcome: dict[str, Any]) -> bool:
    """Whether ``rank`` certainly posted to the dead victim through its proxy: it is on the other
    node, and its LL call (which sends to every rank) started after the death, before the control
    plane named the victim. Its proxy must then have marked the victim failed."""
    return (moment == ll_moment and rank // RANKS_PER_NODE != victim // RANKS_PER_NODE
            and not outcome["dead_known"])


def _expected_transport(transport: str) -> str:
    return TRANSPORTS[transport]["PORTEP_TRANSPORT"]


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize(("transport", "moment", "victim"), KILL_CASES)
def test_dead_rank_is_named_by_every_survivor(tmp_path: Path, _leak_check: list[RankPool], transport: str,
                                              moment: str, victim: int) -> None:
    outcomes = survivors_outcomes(tasks_failures.kill_at_moment, tmp_path, transport, victim, _leak_check,
                                  moment=moment)
    for rank, o in outcomes.items():
        where = f"rank {rank} ({transport}, rank {victim} killed at {moment})"
        assert o["transport"] == _expected_transport(transport), f"{where}: ran over {o['transport']!r}"
        assert o["type"], f"{where}: the call succeeded although rank {victim} was dead"
        assert o["type"] == "PeerFailureError", f"{where}: {o['type']}: {o['error']}{o.get('traceback', '')}"
        assert o["ranks"] == [victim], f"{where}: names rank(s) {o['ranks']}, not rank {victim} alone: {o['error']}"
        assert not any(s in o["error"] for s in OWN_FAULT), f"{where}: blames itself: {o['error']}"
        assert o["elapsed"] < DETECT_WITHIN_S, f"{where}: took {o['elapsed']:.1f} s: {o['error']}"
        again = o["again"]
        assert again["type"] and again.get("portep", False), f"{where}: the broken Buffer's next call: {again}"
        assert again["elapsed"] < AGAIN_WITHIN_S, (
            f"{where}: the broken Buffer's next call took {again['elapsed']:.1f} s")
        assert o["proxy_failure"] is None, f"{where}: this rank's proxy failed as a whole: {o['proxy_failure']}"
        if _posted_after_death(rank, victim, moment, "created", o):
            assert o["victim_link"], f"{where}: its proxy did not mark rank {victim} failed"


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize(("transport", "moment", "victim"), SHRINK_CASES)
def test_shrink_drops_the_dead_rank_and_survivors_go_on(tmp_path: Path, _leak_check: list[RankPool],
                                                        transport: str, moment: str, victim: int) -> None:
    outcomes = survivors_outcomes(tasks_failures.shrink_keeps_serving, tmp_path, transport, victim, _leak_check,
                                  moment=moment, rounds=SHRINK_ROUNDS)
    for rank, o in outcomes.items():
        where = f"rank {rank} ({transport}, shrink, rank {victim} killed at {moment})"
        assert o["transport"] == _expected_transport(transport), f"{where}: ran over {o['transport']!r}"
        assert not o["type"], (f"{where}: round {len(o['diffs']) + 1} of {SHRINK_ROUNDS} raised {o['type']}: "
                               f"{o['error']}{o.get('traceback', '')}")
        assert len(o["diffs"]) == SHRINK_ROUNDS and all(d < 1e-5 for d in o["diffs"]), f"{where}: diffs {o['diffs']}"
        assert o["mask"] == [int(r == victim) for r in range(WORLD)], f"{where}: mask {o['mask']}"
        assert o["elapsed"][0] < DETECT_WITHIN_S, f"{where}: the first round took {o['elapsed'][0]:.1f} s"
        assert o["proxy_failure"] is None, f"{where}: this rank's proxy failed as a whole: {o['proxy_failure']}"
        if _posted_after_death(rank, victim, moment, "between", o):
            assert o["victim_link"], f"{where}: its proxy did not mark rank {victim} failed"
