"""Shared fixtures: rank pools of 2, 4 and 8 processes, a per-test timeout, leak checks.

Run from the repository root: ``python -m pytest tests``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.rankpool import RankPool, live_pids

POOL_SIZES = (2, 4, 8)
DEFAULT_TEST_TIMEOUT_S = 120
SHM_DIR = "/dev/shm"
# Worker environment: portep's own deadline fires before the pool's, so a hang in portep shows
# up as portep's error (naming ranks), not as a pool timeout.
WORKER_ENV = {"PORTEP_TIMEOUT_S": "45"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets a timeout (pytest-timeout) unless it sets its own."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests asking for ``backend`` run once per registered portep backend, and once on the ring
    backend over a fabric that reorders and delays messages."""
    if "backend" in metafunc.fixturenames:
        from portep import backends
        from tests.tasks_common import BACKEND_VARIANTS

        metafunc.parametrize("backend", backends.available() + sorted(BACKEND_VARIANTS))


def _portep_segments() -> set[str]:
    try:
        return {name for name in os.listdir(SHM_DIR) if "portep" in name.lower()}
    except OSError:
        return set()


def _mapped_shm_paths() -> set[str]:
    """Every /dev/shm path some live process other than this test session has mapped or open (what
    this process still maps at the end was created by a test and not released)."""
    paths: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    index = line.find(SHM_DIR + "/")
                    if index >= 0:
                        paths.add(line[index:].strip().removesuffix(" (deleted)"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(SHM_DIR + "/"):
                    paths.add(target)
        except OSError:
            continue
    return paths


@pytest.fixture(scope="session", autouse=True)
def _leak_check() -> Iterator[list[RankPool]]:
    """At session end (after the pools are closed): no pool worker alive, no leaked portep segment.

    A segment counts as leaked when it appeared during this session and no live process has it
    mapped or open (segments of other, concurrent test sessions are in use and not reported).
    """
    before = _portep_segments()
    pools: list[RankPool] = []
    yield pools
    pids = [pid for pool in pools for pid in pool.all_pids]
    alive = live_pids(pids)
    in_use = _mapped_shm_paths()
    leaked = sorted(s for s in _portep_segments() - before if os.path.join(SHM_DIR, s) not in in_use)
    assert not alive, f"rank pool worker process(es) still alive after the session: {alive}"
    assert not leaked, f"portep shared-memory segment(s) left in {SHM_DIR}: {leaked}"


@pytest.fixture(scope="session")
def rank_pools(_leak_check: list[RankPool]) -> Iterator[Callable[[int], RankPool]]:
    """``rank_pools(n)``: the session's pool of ``n`` ranks, started on first use."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size, env=WORKER_ENV)
            _leak_check.append(pools[world_size])
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="session")
def pool2(rank_pools: Callable[[int], RankPool]) -> RankPool:
    return rank_pools(2)


@pytest.fixture(scope="session")
def pool4(rank_pools: Callable[[int], RankPool]) -> RankPool:
    return rank_pools(4)


@pytest.fixture(scope="session")
def pool8(rank_pools: Callable[[int], RankPool]) -> RankPool:
    return rank_pools(8)


@pytest.fixture
def pair() -> Iterator[list]:
    """Two engines of one process (ranks 0 and 1 of a pair), each with a direct window to the
    other: 4 slots of 4 KiB per pair, so that messages span chunks and wait for credits."""
    from portep.native import engine as native

    signals, data = native.Engine.window_size(2, 4, 4096)
    windows = [native.Window.create(signals, data) for _ in range(2)]
    engines = [native.Engine(rank, 2, 4, 4096, windows[rank]) for rank in range(2)]
    engines[0].set_direct(1, windows[1])
    engines[1].set_direct(0, windows[0])
    yield engines
    for e in engines:
        e.destroy()
    for w in windows:
        w.close()
