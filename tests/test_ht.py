"""High-throughput mode on 2, 4 and 8 ranks, one and two (virtual) nodes, against the reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests import tasks_ht
from tests.rankpool import RankPool

# (ranks, nodes): one node, two nodes, and two nodes of one rank (network hop only).
TOPOLOGIES = [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)]
TOPOLOGY_IDS = [f"{r}ranks-{n}node" for r, n in TOPOLOGIES]


def _tokens(world_size: int) -> list[int]:
    """Different token counts per rank, one rank with a single token."""
    return [(24 + 9 * r) % 40 + 1 if r != 1 else 1 for r in range(world_size)]


@pytest.mark.parametrize(("world_size", "num_nodes"), TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_layout(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int) -> None:
    rank_pools(world_size).run(tasks_ht.layout, seed=1, num_nodes=num_nodes, num_tokens=_tokens(world_size),
                               num_experts=4 * world_size, topk=4)


@pytest.mark.parametrize(("world_size", "num_nodes"), TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_dispatch_combine_bf16(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int,
                               backend: str) -> None:
    rank_pools(world_size).run(tasks_ht.dispatch_combine, seed=2, num_nodes=num_nodes,
                               num_tokens=_tokens(world_size), hidden=256, num_experts=4 * world_size, topk=6,
                               backend=backend)


@pytest.mark.parametrize("num_nodes", [1, 2], ids=["4ranks-1node", "4ranks-2node"])
def test_dispatch_combine_wide_rows(pool4: RankPool, num_nodes: int) -> None:
    """Rows of 2 KiB and more, which the engine writes into the outputs with non-temporal stores (BF16
    rows of 2200 bytes start 8 bytes off a 16-byte boundary every other row)."""
    pool4.run(tasks_ht.dispatch_combine, seed=9, num_nodes=num_nodes, num_tokens=_tokens(4), hidden=1100,
              num_experts=8, topk=4)


@pytest.mark.parametrize(("arena_bytes", "in_arena"), [(64 << 20, True), (4096, False), (0, False)],
                         ids=["arena", "arena-too-small", "no-arena"])
def test_network_hop_arena(pool4: RankPool, arena_bytes: int, in_arena: bool) -> None:
    """Between nodes the network hop's rows land in the forwarder's arena, and the node's ranks copy
    theirs out of it themselves (three passes); rows that do not fit (or no arena) go through the
    slots, a copy and the node hop, with the same results."""
    totals = pool4.run(tasks_ht.dispatch_combine_arena, arena_bytes=arena_bytes, seed=10, num_nodes=2,
                       num_tokens=[40, 33, 17, 25], hidden=512, num_experts=8, topk=4)
    assert all((landed > 0) == in_arena and (pulled > 0) == in_arena for landed, pulled in totals), (
        f"(arena messages, bytes pulled) over the group: {totals}")


@pytest.mark.parametrize(("world_size", "num_nodes"), [(4, 2), (8, 2)], ids=["4ranks-2node", "8ranks-2node"])
def test_dispatch_expert_alignment(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int) -> None:
    rank_pools(world_size).run(tasks_ht.dispatch_combine, seed=3, num_nodes=num_nodes,
                               num_tokens=_tokens(world_size), hidden=128, num_experts=2 * world_size, topk=3,
                               expert_alignment=4)


@pytest.mark.parametrize("scales_noncontig", [False, True], ids=["scales-contig", "scales-transposed"])
@pytest.mark.parametrize(("world_size", "num_nodes"), [(2, 1), (4, 2), (8, 2)],
                         ids=["2ranks-1node", "4ranks-2node", "8ranks-2node"])
def test_dispatch_fp8(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int,
                      scales_noncontig: bool) -> None:
    rank_pools(world_size).run(tasks_ht.dispatch_combine, seed=4, num_nodes=num_nodes,
                               num_tokens=_tokens(world_size), hidden=256, num_experts=2 * world_size, topk=4,
                               fp8=True, scales_noncontig=scales_noncontig)


@pytest.mark.parametrize(("world_size", "num_nodes"), [(2, 1), (4, 2), (8, 1)],
                         ids=["2ranks-1node", "4ranks-2node", "8ranks-1node"])
def test_num_worst_tokens(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int) -> None:
    rank_pools(world_size).run(tasks_ht.worst_tokens, seed=5, num_nodes=num_nodes, num_tokens=20, hidden=128,
                               num_experts=4 * world_size, topk=4)


@pytest.mark.parametrize(("world_size", "num_nodes"), [(2, 1), (4, 2)], ids=["2ranks-1node", "4ranks-2node"])
def test_fresh_buffer(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int) -> None:
    rank_pools(world_size).run(tasks_ht.fresh_buffer_roundtrip, seed=6, num_nodes=num_nodes, hidden=128,
                               num_experts=2 * world_size)
