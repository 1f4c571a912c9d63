"""Megatron-core's own DeepEP dispatch/combine path runs on portep through the ``deep_ep`` alias.

4 ranks as 2 (virtual) nodes of 2; forward and backward (autograd through dispatch and combine),
synchronous and asynchronous (``async_finish`` + ``allocate_on_comm_stream``, what Megatron's
MoE layer uses), on the world group and on EP groups of 2 inside and across nodes.
"""

from __future__ import annotations

import pytest

from tests import tasks_megatron
from tests.rankpool import RankPool

pytest.importorskip("megatron.core", reason="megatron-core is in the test extra")

GROUPS = {
    "world": None,
    "ep2-in-node": [[0, 1], [2, 3]],
    "ep2-across-nodes": [[0, 2], [1, 3]],
}
NUM_TOKENS = [12, 1, 9, 16]  # per world rank; rank 1 has a single token


@pytest.mark.timeout(240)
@pytest.mark.parametrize("async_comm", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("groups", sorted(GROUPS))
def test_flex_dispatcher_deepep(pool4: RankPool, groups: str, async_comm: bool) -> None:
    pool4.run(tasks_megatron.flex_dispatcher, timeout=200, seed=11, num_nodes=2, ep_groups=GROUPS[groups],
              num_tokens=NUM_TOKENS, hidden=64, num_local_experts=2, topk=3, async_comm=async_comm)


@pytest.mark.timeout(240)
def test_flex_dispatcher_deepep_bf16(pool4: RankPool) -> None:
    pool4.run(tasks_megatron.flex_dispatcher, timeout=200, seed=12, num_nodes=2, ep_groups=None,
              num_tokens=NUM_TOKENS, hidden=128, num_local_experts=2, topk=4, async_comm=True, dtype="bfloat16")
