"""A rank killed (SIGKILL) in the middle of HT and LL dispatch and combine: every survivor fails
within seconds with an error naming it, and nothing is left behind."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import tasks_faults
from tests.conftest import WORKER_ENV
from tests.rankpool import RankPool

WORLD = 4
DETECT_WITHIN_S = 10.0  # heartbeat loss is seen in ~0.3 s; a dead control-plane host after its timeout


def survivors_outcomes(task: Callable[..., None], tmp_path: Path, victim: int, **kwargs: Any) -> dict[int, dict]:
    """Run ``task`` on a throw-away pool (the killed worker takes it down); the survivors' outcomes.

    Rank 0 hosts the control plane; its death is noticed by heartbeat silence, so that timeout is
    short here."""
    pool = RankPool(WORLD, env={**WORKER_ENV, "PORTEP_TIMEOUT_S": "30", "PORTEP_HEARTBEAT_TIMEOUT_S": "2"})
    try:
        with pytest.raises(AssertionError, match="worker died") as failure:
            pool.run(task, timeout=60, victim=victim, out_dir=str(tmp_path), **kwargs)
    finally:
        pool.close()
    outcomes = {}
    for rank in range(WORLD):
        if rank != victim:
            path = tmp_path / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} did not finish: {failure.value}"
            outcomes[rank] = json.loads(path.read_text())
    return outcomes


@pytest.mark.parametrize(("mode", "phase", "victim"), [
    ("ht", "dispatch", 1), ("ht", "combine", 2), ("ll", "dispatch", 3), ("ll", "combine", 1), ("ll", "dispatch", 0),
], ids=["ht-dispatch", "ht-combine", "ll-dispatch", "ll-combine", "ll-dispatch-control-host"])
def test_killed_rank_is_named_by_survivors(tmp_path: Path, mode: str, phase: str, victim: int) -> None:
    outcomes = survivors_outcomes(tasks_faults.kill_mid_operation, tmp_path, victim, mode=mode, phase=phase)
    for rank, outcome in outcomes.items():
        assert outcome["error"], f"rank {rank}: the {mode} {phase} succeeded although rank {victim} was dead"
        assert victim in outcome["ranks"], f"rank {rank}: the error does not name rank {victim}: {outcome}"
        assert outcome["elapsed"] < DETECT_WITHIN_S, f"rank {rank}: took {outcome['elapsed']:.1f} s: {outcome}"


def test_shrink_masks_a_dead_rank_and_survivors_combine_correctly(tmp_path: Path) -> None:
    victim = 2
    for rank, outcome in survivors_outcomes(tasks_faults.shrink_after_death, tmp_path, victim).items():
        assert outcome["mask"] == [int(r == victim) for r in range(WORLD)], (rank, outcome)
        assert all(d < 1e-5 for d in outcome["diffs"]), (rank, outcome)


@pytest.mark.parametrize(("phase", "victim"), [("dispatch", 2), ("combine", 1)])
def test_shrink_drops_a_rank_that_dies_during_the_call(tmp_path: Path, phase: str, victim: int) -> None:
    outcomes = survivors_outcomes(tasks_faults.shrink_in_flight, tmp_path, victim, phase=phase)
    for rank, outcome in outcomes.items():
        assert outcome["mask"] == [int(r == victim) for r in range(WORLD)], (rank, outcome)
        assert all(d < 1e-5 for d in outcome["diffs"]), (rank, outcome)
        assert outcome["elapsed"] < DETECT_WITHIN_S, (rank, outcome)
