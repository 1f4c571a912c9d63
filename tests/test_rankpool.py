"""The rank pool: results by rank, tracebacks of failing ranks, timeouts that kill and restart."""

from __future__ import annotations

import pytest

from tests import tasks_pool
from tests.rankpool import RankPool, live_pids


def test_results_by_rank(pool2: RankPool) -> None:
    results = pool2.run(tasks_pool.ping, value=10)
    assert [r[:3] for r in results] == [(0, 2, 21), (1, 2, 21)]
    assert results[0][3] != results[1][3]


def test_failure_names_rank_and_pool_survives(pool2: RankPool) -> None:
    with pytest.raises(AssertionError, match=r"rank\(s\) \[1\]") as info:
        pool2.run(tasks_pool.fail_on, bad_rank=1)
    assert "deliberate failure on rank 1" in str(info.value)
    assert pool2.run(tasks_pool.fail_on, bad_rank=-1) == [0, 1]


def test_worker_cache_persists(pool2: RankPool) -> None:
    pool2.run(tasks_pool.remember, value=1)
    assert pool2.run(tasks_pool.remember, value=2) == [1, 1]


def test_timeout_kills_and_restarts() -> None:
    pool = RankPool(2)
    try:
        first = pool.run(tasks_pool.ping)
        with pytest.raises(AssertionError, match=r"rank\(s\) \[1\] did not answer"):
            pool.run(tasks_pool.sleep_on, timeout=2, slow_rank=1, seconds=30)
        assert live_pids([pid for *_, pid in first]) == [], "timed-out workers must be killed"
        again = pool.run(tasks_pool.ping, value=1)
        assert [r[2] for r in again] == [3, 3]
    finally:
        pool.close()
    assert live_pids(pool.all_pids) == []
