"""Launchers other than torchrun (e.g. Ray): ranks carry no ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``,
nodes are found from host identity, and jobs build several EP groups one after the other; and
torchrun's ``LOCAL_WORLD_SIZE`` places EP groups smaller than the world by their world ranks."""

from __future__ import annotations

import pytest

from tests import tasks_launchers
from tests.rankpool import RankPool

# EP group layouts of a 4-rank job, built in this order: the world, pairs of consecutive ranks,
# pairs of ranks two apart (one per machine when machines hold two consecutive ranks).
LAYOUTS = [None, [[0, 1], [2, 3]], [[0, 2], [1, 3]]]


@pytest.mark.timeout(180)
def test_one_machine(pool4: RankPool) -> None:
    """All ranks on this host: every group is one node."""
    found = pool4.run(tasks_launchers.several_groups, timeout=150, seed=31, host_of_rank=None, layouts=LAYOUTS)
    assert found == [[1, 1, 1]] * 4


@pytest.mark.timeout(180)
def test_two_machines(pool4: RankPool) -> None:
    """Two machines of two consecutive ranks: the world is 2 nodes of 2, consecutive pairs are one
    node, pairs two apart are 2 nodes of 1."""
    hosts = ["ray-node-a", "ray-node-a", "ray-node-b", "ray-node-b"]
    found = pool4.run(tasks_launchers.several_groups, timeout=150, seed=32, host_of_rank=hosts, layouts=LAYOUTS)
    assert found == [[2, 1, 2]] * 4


@pytest.mark.timeout(180)
def test_interleaved_machines(pool4: RankPool) -> None:
    """Machines holding ranks 0, 2 and 1, 3: a world Buffer is refused on every rank with a clear
    error, node-local groups work."""
    hosts = ["ray-node-a", "ray-node-b", "ray-node-a", "ray-node-b"]
    messages = pool4.run(tasks_launchers.interleaved_hosts, timeout=150, seed=33, host_of_rank=hosts,
                         node_local=[[0, 2], [1, 3]])
    assert len(set(messages)) == 1, messages


@pytest.mark.timeout(180)
def test_torchrun_groups_smaller_than_the_world(pool4: RankPool) -> None:
    """torchrun with two ranks per node: ``LOCAL_WORLD_SIZE`` counts world ranks, so the group of
    ranks 0 and 2 spans two nodes."""
    found = pool4.run(tasks_launchers.several_groups, timeout=150, seed=34, host_of_rank=None, layouts=LAYOUTS,
                      local_world_size=2)
    assert found == [[2, 1, 2]] * 4
