"""The reference itself, on hand-made examples and properties (single process)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from portep import reference


def test_calc_diff() -> None:
    x = torch.randn(64, 128)
    assert reference.calc_diff(x, x) == 0.0
    assert abs(reference.calc_diff(x, x.bfloat16())) < 1e-4
    assert reference.calc_diff(x, -x) > 0.1
    assert reference.calc_diff(torch.zeros(4), torch.zeros(4)) == 0.0


def test_fp8_cast_matches_deepep_formula() -> None:
    x = (torch.randn(16, 512) * torch.rand(16, 1) * 10).bfloat16()
    x_fp8, scales = reference.per_token_cast_to_fp8(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == (16, 512)
    assert scales.dtype == torch.float32 and scales.shape == (16, 4)
    groups = x.float().view(16, 4, 128)
    amax = groups.abs().amax(2).clamp(min=1e-4)
    assert torch.equal(scales, amax / 448)
    want = (groups * (448 / amax).unsqueeze(2)).view(16, 512).to(torch.float8_e4m3fn)
    assert torch.equal(x_fp8.view(torch.uint8), want.view(torch.uint8))
    # The largest magnitude of each group maps to 448.
    assert torch.equal(x_fp8.float().view(16, 4, 128).abs().amax(2), torch.full((16, 4), 448.0))
    back = reference.per_token_cast_back(x_fp8, scales)
    assert back.dtype == torch.bfloat16
    assert reference.calc_diff(back, x) < 1e-3


def test_fp8_zero_rows_use_min_amax() -> None:
    x_fp8, scales = reference.per_token_cast_to_fp8(torch.zeros(2, 128))
    assert torch.equal(scales, torch.full((2, 1), 1e-4 / 448))
    assert not x_fp8.float().any()


def test_round_scale_and_ue8m0() -> None:
    x = torch.randn(8, 1024).bfloat16()
    x_fp8, scales = reference.per_token_cast_to_fp8(x, round_scale=True)
    exponent = torch.log2(scales)
    assert torch.equal(exponent, exponent.round()), "round_scale gives powers of two"
    assert bool((scales >= reference.per_token_cast_to_fp8(x)[1]).all()), "rounded up"
    packed = reference.pack_ue8m0(scales)
    assert packed.dtype == torch.int32 and packed.shape == (8, 2)
    # Byte i of int32 j is the biased exponent of group 4*j + i (little-endian).
    as_bytes = packed.view(torch.uint8).view(8, 8).long()
    assert torch.equal(as_bytes, (exponent + 127).long())
    assert torch.equal(reference.unpack_ue8m0(packed), scales)
    assert torch.equal(reference.per_token_cast_back(x_fp8, packed), reference.per_token_cast_back(x_fp8, scales))


def test_layout_hand_example() -> None:
    # 4 ranks, 2 per node, 8 experts (2 per rank).
    topk_idx = torch.tensor([[0, 1], [2, 7], [-1, -1], [5, -1]])
    per_rank, per_node, per_expert, in_rank = reference.layout(topk_idx, 8, 4, 2)
    assert per_rank.tolist() == [1, 1, 1, 1]
    assert per_node.tolist() == [2, 2]
    assert per_expert.tolist() == [1, 1, 1, 0, 0, 1, 0, 1]
    assert in_rank.tolist() == [[True, False, False, False], [False, True, False, True],
                                [False, False, False, False], [False, False, True, False]]
    assert reference.layout(topk_idx, 8, 4, 4)[1] is None


def test_ht_dispatch_hand_example() -> None:
    # 2 ranks, 4 experts (2 per rank), hidden 1: values identify (rank, token).
    xs = [torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[10.0], [11.0]])]
    idx = [torch.tensor([[0, 3], [1, -1], [2, -1]]), torch.tensor([[3, 2], [-1, -1]])]
    w = [torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]), torch.tensor([[0.7, 0.8], [0.9, 1.0]])]
    r1 = reference.ht_dispatch(xs, idx, w, 4, rank=1, expert_alignment=4)
    assert r1.recv_x.view(-1).tolist() == [0.0, 2.0, 10.0]
    assert r1.recv_topk_idx.tolist() == [[-1, 1], [0, -1], [1, 0]]
    assert torch.allclose(r1.recv_topk_weights, torch.tensor([[0.0, 0.2], [0.5, 0.0], [0.7, 0.8]]))
    assert r1.num_recv_tokens_per_expert_list == [4, 4]  # 2 and 2, aligned to 4
    assert r1.recv_src == [(0, 0), (0, 2), (1, 0)]
    r0 = reference.ht_dispatch(xs, idx, w, 4, rank=0)
    assert r0.recv_src == [(0, 0), (0, 1)]
    assert r0.num_recv_tokens_per_expert_list == [1, 1]

    ys = [r0.recv_x * 2, r1.recv_x * 3]
    out0, wsum0 = reference.ht_combine(ys, [r0.recv_src, r1.recv_src], [3, 2], rank=0,
                                       recv_topk_weights=[r0.recv_topk_weights, r1.recv_topk_weights])
    assert out0.view(-1).tolist() == [0.0 * 5, 1.0 * 2, 2.0 * 3]
    assert torch.allclose(wsum0, torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.5, 0.0]]))
    bias = torch.ones(2, 1)
    out1, _ = reference.ht_combine(ys, [r0.recv_src, r1.recv_src], [3, 2], rank=1, bias=(bias, bias))
    assert out1.view(-1).tolist() == [30.0 + 2, 0.0 + 2]


def test_ll_dispatch_hand_example() -> None:
    # 2 ranks, 4 experts; rank 1's local experts are 2 and 3; T = 3.
    xs = [torch.arange(3.0).view(3, 1).repeat(1, 128).bfloat16(), (torch.arange(2.0) + 10).view(2, 1)
          .repeat(1, 128).bfloat16()]
    idx = [torch.tensor([[2, 3], [3, 0], [1, -1]]), torch.tensor([[3, -1], [2, 3]])]
    r = reference.ll_dispatch(xs, idx, 3, 4, rank=1)
    assert r.recv_count.tolist() == [2, 4]
    assert [s.tolist() for s in r.src_info] == [[0, 1], [0, 1, 0, 1]]
    assert [s.tolist() for s in r.recv_src_rank] == [[0, 1], [0, 0, 1, 1]]
    assert r.recv_x[1][:, 0].tolist() == [0.0, 1.0, 10.0, 11.0]
    unpack = [[reference.unpack_layout_range(int(v)) for v in row] for row in r.layout_range]
    assert unpack == [[(0, 1), (1, 1)], [(0, 2), (2, 2)]]
    masked = reference.ll_dispatch(xs, idx, 3, 4, rank=1, masked_ranks=(0,))
    assert masked.recv_count.tolist() == [1, 2]
    assert [reference.unpack_layout_range(int(v)) for v in masked.layout_range[1]] == [(0, 0), (0, 2)]

    # Combine with y = 2 * x at every expert: out = x * 2 * sum of valid weights.
    all_r = [reference.ll_dispatch(xs, idx, 3, 4, rank=q) for q in range(2)]
    ys = [[rows * 2 for rows in res.recv_x] for res in all_r]
    weights = torch.tensor([[0.5, 0.25], [1.0, 2.0], [4.0, 8.0]])
    out = reference.ll_combine(ys, [res.src_info for res in all_r], [res.layout_range for res in all_r],
                               idx[0], weights, 4, rank=0)
    assert out[:, 0].tolist() == [0.0, 1.0 * 2 * 3.0, 2.0 * 2 * 4.0]
    dropped = reference.ll_combine(ys, [res.src_info for res in all_r], [res.layout_range for res in all_r],
                                   idx[0], weights, 4, rank=0, masked_ranks=(1,))
    assert dropped[:, 0].tolist() == [0.0, 1.0 * 2 * 2.0, 2.0 * 2 * 4.0]


@settings(max_examples=25, deadline=None)
@given(
    num_ranks=st.sampled_from([1, 2, 4]),
    experts_per_rank=st.integers(1, 3),
    tokens=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_ht_round_trip_property(num_ranks: int, experts_per_rank: int, tokens: list[int], seed: int) -> None:
    """Combining the dispatched rows gives x times the number of ranks holding the token, and
    every rank's per-expert counts add up to the layout's num_tokens_per_expert."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = num_ranks * experts_per_rank
    topk = min(num_experts, 3)
    xs, idx = [], []
    for r in range(num_ranks):
        n = tokens[r]
        xs.append(torch.randn(n, 4, generator=gen))
        choice = torch.rand(n, num_experts, generator=gen).topk(topk, dim=1).indices
        idx.append(choice.masked_fill(torch.rand(n, topk, generator=gen) < 0.3, -1))
    results = [reference.ht_dispatch(xs, idx, None, num_experts, r) for r in range(num_ranks)]
    total_per_expert = sum(reference.layout(i, num_experts, num_ranks, num_ranks)[2] for i in idx)
    for r, res in enumerate(results):
        local = total_per_expert[r * experts_per_rank:(r + 1) * experts_per_rank].tolist()
        assert res.num_recv_tokens_per_expert_list == local
        assert res.recv_topk_weights is None
    for r in range(num_ranks):
        out, _ = reference.ht_combine([res.recv_x for res in results], [res.recv_src for res in results],
                                      tokens[:num_ranks], r)
        in_rank = reference.layout(idx[r], num_experts, num_ranks, num_ranks)[3]
        assert torch.allclose(out, xs[r] * in_rank.sum(1, keepdim=True), atol=1e-5)
