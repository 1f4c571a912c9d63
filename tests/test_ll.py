"""Low-latency mode on 2, 4 and 8 ranks against the reference (BF16, FP8, UE8M0, hooks, zero-copy)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests import tasks_ll
from tests.rankpool import RankPool

T = 32  # num_max_dispatch_tokens_per_rank


def _tokens(world_size: int, max_tokens: int = T) -> list[int]:
    """N == T, N == 0, N < T on different ranks."""
    return [max_tokens, 0, max_tokens - 5, 1, max_tokens - 1, 7, max_tokens, 3][:world_size]


TOPOLOGIES = [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2)]
TOPOLOGY_IDS = [f"{r}ranks-{n}node" for r, n in TOPOLOGIES]


@pytest.mark.parametrize(("world_size", "num_nodes"), TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_bf16(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int, backend: str) -> None:
    rank_pools(world_size).run(tasks_ll.dispatch_combine, seed=11, num_nodes=num_nodes,
                               num_tokens=_tokens(world_size), max_tokens=T, hidden=256,
                               num_experts=4 * world_size, topk=6, backend=backend)


@pytest.mark.parametrize(("chunk_bytes", "slots", "at_end"), [(256 << 10, 8, True), (4096, 13, True), (4096, 2, False)],
                         ids=["default", "small-chunks", "does-not-fit"])
def test_combine_sums_at_end(pool4: RankPool, chunk_bytes: int, slots: int, at_end: bool) -> None:
    """The expert-side sums of a combine are summed on the token side once all have landed, each
    token in one sweep straight into the output, when every message fits its slots (4 KiB chunks:
    rows straddle chunks and the end of the slots); larger messages are reduced as they arrive
    instead (their credits must come back), with the same results."""
    at_ends = pool4.run(tasks_ll.dispatch_combine_streams, chunk_bytes=chunk_bytes, slots=slots, seed=12,
                        num_nodes=2, num_tokens=T, max_tokens=T, hidden=320, num_experts=16, topk=6)
    assert all((n > 0) == at_end for n in at_ends), f"combines summed at the end, over the group: {at_ends}"


@pytest.mark.parametrize(
    ("round_scale", "use_ue8m0", "hidden"),
    [(False, False, 256), (True, False, 256), (True, True, 512)],
    ids=["fp8", "fp8-round_scale", "fp8-ue8m0"],
)
@pytest.mark.parametrize(("world_size", "num_nodes"), [(2, 1), (4, 2), (8, 1)],
                         ids=["2ranks-1node", "4ranks-2node", "8ranks-1node"])
def test_fp8(rank_pools: Callable[[int], RankPool], world_size: int, num_nodes: int, round_scale: bool,
             use_ue8m0: bool, hidden: int) -> None:
    rank_pools(world_size).run(tasks_ll.dispatch_combine, seed=12, num_nodes=num_nodes,
                               num_tokens=_tokens(world_size), max_tokens=T, hidden=hidden,
                               num_experts=2 * world_size, topk=4, use_fp8=True, round_scale=round_scale,
                               use_ue8m0=use_ue8m0)


def test_hidden_not_deepep_size(pool2: RankPool) -> None:
    """Any hidden that is a multiple of 128 works (DeepEP's LL kernels only take 2048...8192)."""
    pool2.run(tasks_ll.dispatch_combine, seed=13, num_nodes=1, num_tokens=[5, 9], max_tokens=9, hidden=384,
              num_experts=6, topk=3, use_fp8=True)


@pytest.mark.parametrize(("hidden", "use_fp8"), [(1100, False), (2176, True)], ids=["bf16-2200B", "fp8-2176B"])
def test_wide_rows(pool4: RankPool, hidden: int, use_fp8: bool) -> None:
    """Rows of 2 KiB and more, which the engine writes into the outputs with non-temporal stores (BF16
    rows of 2200 bytes start 8 bytes off a 16-byte boundary every other row)."""
    pool4.run(tasks_ll.dispatch_combine, seed=16, num_nodes=2, num_tokens=_tokens(4), max_tokens=T, hidden=hidden,
              num_experts=8, topk=4, use_fp8=use_fp8)


def test_logfmt(pool4: RankPool) -> None:
    pool4.run(tasks_ll.dispatch_combine, seed=14, num_nodes=1, num_tokens=_tokens(4), max_tokens=T, hidden=256,
              num_experts=8, topk=4, use_logfmt=True)


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_double_buffer_hooks(rank_pools: Callable[[int], RankPool], world_size: int, use_fp8: bool) -> None:
    rank_pools(world_size).run(tasks_ll.double_buffer, seed=15, num_nodes=1, max_tokens=16, hidden=256,
                               num_experts=2 * world_size, topk=3, use_fp8=use_fp8)


@pytest.mark.parametrize(("world_size", "num_nodes"), [(2, 1), (4, 2)], ids=["2ranks-1node", "4ranks-2node"])
def test_clean_low_latency_buffer_switch_modes(rank_pools: Callable[[int], RankPool], world_size: int,
                                               num_nodes: int) -> None:
    rank_pools(world_size).run(tasks_ll.clean_and_switch, seed=16, num_nodes=num_nodes, max_tokens=16,
                               hidden=256, num_experts=4 * world_size, topk=4)


def test_masked_rank(pool4: RankPool) -> None:
    pool4.run(tasks_ll.masked, seed=17, max_tokens=16, hidden=128, num_experts=8, topk=4, masked_rank=2)


@pytest.mark.parametrize("num_nodes", [1, 2], ids=["1node", "2nodes"])
def test_dispatch_sends_a_token_once_per_rank(pool4: RankPool, num_nodes: int) -> None:
    pool4.run(tasks_ll.wire_rows, seed=18, num_nodes=num_nodes, max_tokens=32, hidden=256, num_experts=8, topk=6)


def test_wait_cost_stats(pool4: RankPool, backend: str) -> None:
    pool4.run(tasks_ll.wait_cost_stats, seed=19, num_nodes=2, max_tokens=16, hidden=128, num_experts=8, topk=3,
              backend=backend)
