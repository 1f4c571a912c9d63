"""The compiled index maps of an HT dispatch (CPU) give exactly what their torch versions (any
device) give, on random routings including empty rows, empty columns and -1 entries."""

from __future__ import annotations

import pytest
import torch

from portep.native import cpu


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (37, 4), (300, 8), (64, 2)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_rows_by_column(shape: tuple[int, int], density: float) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    mask = torch.rand(shape, generator=gen) < density
    index, counts = cpu.rows_by_column(mask)
    want_index, want_counts = cpu.rows_by_column_torch(mask)
    assert torch.equal(index, want_index) and torch.equal(counts, want_counts)
    strided = torch.rand(shape[1], shape[0], generator=gen).t() < density  # a transposed view
    assert all(torch.equal(a, b) for a, b in zip(cpu.rows_by_column(strided), cpu.rows_by_column_torch(strided),
                                                 strict=True))


@pytest.mark.parametrize(("per_node", "nodes"), [(1, 1), (2, 2), (4, 1), (2, 4), (3, 2)])
def test_ht_recv_positions(per_node: int, nodes: int) -> None:
    gen = torch.Generator().manual_seed(per_node * 10 + nodes)
    node_recv = torch.randint(0, 5, (per_node, nodes), generator=gen, dtype=torch.int64)
    positions = cpu.ht_recv_positions(node_recv)
    assert torch.equal(positions, cpu.ht_recv_positions_torch(node_recv))
    assert sorted(positions.tolist()) == list(range(int(node_recv.sum())))  # every output row once


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_local_routing(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    topk_idx = torch.randint(-1, 16, (50, 6), generator=gen, dtype=torch.int64)
    weights = torch.rand(50, 6, generator=gen)
    got = cpu.local_routing(topk_idx, weights, rank * 4, 4)
    want = cpu.local_routing_torch(topk_idx, weights, rank * 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
