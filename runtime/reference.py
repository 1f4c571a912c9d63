"""Reference implementations of dispatch and combine, written for clarity, not speed.

Every function takes the inputs of *all* ranks (lists indexed by rank) and returns what one
rank must end up with, computed with plain per-token loops. Nothing here communicates and
nothing here shares code with the fast paths, so tests can compare any implementation against
it on random data.

Conventions (DeepEP's):

* ``E`` experts spread over ``R`` ranks; expert ``e`` lives on rank ``e // (E // R)`` and is
  local expert ``e % (E // R)`` there.
* ``topk_idx`` is int64 ``[N, topk]``; ``-1`` means "no expert" for that slot.
* Rank ``r`` is on node ``r // ranks_per_node``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

FP8_GROUP = 128  # channels per FP8 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
UE8M0_PER_INT32 = 4  # power-of-two scale exponents packed per int32

__all__ = [
    "HTDispatchResult",
    "LLDispatchResult",
    "calc_diff",
    "ht_combine",
    "ht_dispatch",
    "layout",
    "ll_combine",
    "ll_dispatch",
    "pack_layout_range",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "unpack_layout_range",
]


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity metric: ``1 - 2·Σ(x+1)(y+1) / Σ((x+1)² + (y+1)²)`` in float64.

    0 for identical tensors; DeepEP's thresholds are 5e-6 (HT combine), 1e-5 / 9e-4 (LL combine
    after a BF16 / FP8 dispatch).
    """
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast each token to FP8 with one scale per 128 channels.

    Arguments:
        x: `[N, H]` (any float dtype), ``H`` a multiple of 128.
        round_scale: round every scale up to a power of two.

    Returns:
        ``(x_fp8 float8_e4m3fn [N, H], scales float32 [N, H/128])`` with
        ``x ≈ x_fp8 * scales`` (per group). Per group: ``amax = max|x|`` clamped to ``1e-4``,
        ``scale = amax / 448`` and ``x_fp8 = x * (448 / amax)`` (DeepEP's kernel and test utility);
        with ``round_scale``, ``scale = 2**ceil(log2(scale))`` and ``x_fp8 = x / scale``.
    """
    if x.dim() != 2 or x.size(1) % FP8_GROUP != 0:
        raise ValueError(f"x must be [N, H] with H a multiple of {FP8_GROUP}, got {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    groups = x.float().view(num_tokens, hidden // FP8_GROUP, FP8_GROUP)
    amax = groups.abs().amax(dim=2).clamp(min=1e-4)
    scale = amax / FP8_MAX
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
        x_fp8 = groups / scale.unsqueeze(2)
    else:
        x_fp8 = groups * (FP8_MAX / amax).unsqueeze(2)
    return x_fp8.to(torch.float8_e4m3fn).view(num_tokens, hidden), scale.contiguous()


def unpack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Unpack ue8m0 scales: int32 `[..., H/512]` -> float32 `[..., H/128]`.

    Byte ``i`` (little-endian) of int32 ``j`` is the biased exponent of scale group ``4*j + i``;
    its value is ``2**(byte - 127)``.
    """
    if scales.dtype != torch.int32:
        raise TypeError(f"packed scales must be int32, got {scales.dtype}")
    exponents = []
    for i in range(UE8M0_PER_INT32):
        exponents.append((scales >> (8 * i)) & 0xFF)
    stacked = torch.stack(exponents, dim=-1)  # [..., H/512, 4]; group 4*j + i at [..., j, i]
    stacked = stacked.reshape(*scales.shape[:-1], scales.shape[-1] * UE8M0_PER_INT32)
    return torch.exp2(stacked.double() - 127).float()


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales `[..., H/128]` into int32 `[..., H/512]` (see :func:`unpack_ue8m0`)."""
    if scales.size(-1) % UE8M0_PER_INT32 != 0:
        raise ValueError(f"number of scale groups must be a multiple of 4, got {scales.size(-1)}")
    exponent = torch.log2(scales.double())
    if not torch.equal(exponent, exponent.round()):
        raise ValueError("ue8m0 packing needs power-of-two scales (round_scale=True)")
    biased = (exponent.round() + 127).long()
    if biased.min() < 0 or biased.max() > 255:
        raise ValueError("scale exponent out of the ue8m0 range")
    biased = biased.view(*scales.shape[:-1], scales.size(-1) // UE8M0_PER_INT32, UE8M0_PER_INT32)
    packed = torch.zeros(biased.shape[:-1], dtype=torch.int64)
    for i in range(UE8M0_PER_INT32):
        packed |= biased[..., i] << (8 * i)
    # Reinterpret as signed int32 (the top byte may exceed 127).
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def per_token_cast_back(
    x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantise FP8 rows: `[..., H]` float8_e4m3fn with scales float32 `[..., H/128]` or
    ue8m0-packed int32 `[..., H/512]` -> `[..., H]` of ``dtype`` (bf16 as DeepEP's utility)."""
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    hidden = x_fp8.size(-1)
    if scales.size(-1) != hidden // FP8_GROUP:
        raise ValueError(f"scales {tuple(scales.shape)} do not match x {tuple(x_fp8.shape)}")
    groups = x_fp8.float().reshape(*x_fp8.shape[:-1], hidden // FP8_GROUP, FP8_GROUP)
    return (groups * scales.float().unsqueeze(-1)).reshape(x_fp8.shape).to(dtype)


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def _experts_per_rank(num_experts: int, num_ranks: int) -> int:
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} is not a multiple of num_ranks={num_ranks}")
    return num_experts // num_ranks


def _token_ranks(topk_row: Sequence[int], experts_per_rank: int) -> list[int]:
    """Sorted distinct ranks holding at least one of the experts in ``topk_row``."""
    return sorted({e // experts_per_rank for e in topk_row if e >= 0})


def layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """What ``Buffer.get_dispatch_layout`` returns for one rank's ``topk_idx`` `[N, topk]`.

    Returns:
        ``num_tokens_per_rank`` int32 `[R]` (tokens with ≥1 expert on each rank),
        ``num_tokens_per_rdma_rank`` int32 `[R / ranks_per_node]` (tokens with ≥1 expert on each
        node) or None with a single node, ``num_tokens_per_expert`` int32 `[E]` (selections),
        ``is_token_in_rank`` bool `[N, R]`.
    """
    experts_per_rank = _experts_per_rank(num_experts, num_ranks)
    num_nodes = num_ranks // ranks_per_node
    num_tokens = topk_idx.size(0)
    per_rank = torch.zeros(num_ranks, dtype=torch.int32)
    per_node = torch.zeros(num_nodes, dtype=torch.int32)
    per_expert = torch.zeros(num_experts, dtype=torch.int32)
    in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
    for t, row in enumerate(topk_idx.tolist()):
        for e in row:
            if e >= 0:
                per_expert[e] += 1
        ranks = _token_ranks(row, experts_per_rank)
        for r in ranks:
            per_rank[r] += 1
            in_rank[t, r] = True
        for node in sorted({r // ranks_per_node for r in ranks}):
            per_node[node] += 1
    return per_rank, (per_node if num_nodes > 1 else None), per_expert, in_rank


# --------------------------------------------------------------------------------------------
# High-throughput mode
# --------------------------------------------------------------------------------------------


class HTDispatchResult(NamedTuple):
    """What one rank receives from an HT dispatch (``M`` = received tokens)."""

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [M, H] or (fp8 [M, H], scales [M, S])
    recv_topk_idx: torch.Tensor | None  # int64 [M, topk], local expert id or -1
    recv_topk_weights: torch.Tensor | None  # float32 [M, topk], 0 where recv_topk_idx is -1
    num_recv_tokens_per_expert_list: list[int]  # per local expert, rounded up to the alignment
    recv_src: list[tuple[int, int]]  # (source rank, source token index) of every received row


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    index = torch.tensor(rows, dtype=torch.long)
    if x.dtype == torch.float8_e4m3fn:  # gather bytes: indexing FP8 is not supported everywhere
        return x.view(torch.uint8).index_select(0, index).view(torch.float8_e4m3fn)
    return x.index_select(0, index)


def ht_dispatch(
    xs: Sequence[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    topk_idxs: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor] | None,
    num_experts: int,
    rank: int,
    expert_alignment: int = 1,
) -> HTDispatchResult:
    """What ``rank`` receives from an HT ``Buffer.dispatch``.

    Arguments:
        xs: per source rank, `[N_r, H]` or a tuple ``(x_fp8 [N_r, H], scales [N_r, H/128])``.
        topk_idxs: per source rank, int64 `[N_r, topk]` (the routing; also used when the
            implementation is called with ``topk_idx=None`` and an explicit layout).
        topk_weights: per source rank, float32 `[N_r, topk]`, or None.
        num_experts: ``E``; ``rank`` holds experts ``[rank*E_local, (rank+1)*E_local)``.
        expert_alignment: each per-expert count is rounded up to a multiple of this.

    Every token with at least one expert on ``rank`` is received once. Rows are grouped by
    source rank (0 first) and keep source order within a group.
    """
    num_ranks = len(xs)
    experts_per_rank = _experts_per_rank(num_experts, num_ranks)
    first_local = rank * experts_per_rank
    recv_src: list[tuple[int, int]] = []
    recv_idx_rows: list[list[int]] = []
    recv_weight_rows: list[list[float]] = []
    per_expert = [0] * experts_per_rank
    for src in range(num_ranks):
        weights = topk_weights[src].tolist() if topk_weights is not None else None
        for t, row in enumerate(topk_idxs[src].tolist()):
            if rank not in _token_ranks(row, experts_per_rank):
                continue
            recv_src.append((src, t))
            local = [e - first_local if 0 <= e - first_local < experts_per_rank and e >= 0 else -1 for e in row]
            recv_idx_rows.append(local)
            if weights is not None:
                recv_weight_rows.append([w if i >= 0 else 0.0 for i, w in zip(local, weights[t], strict=True)])
            for i in local:
                if i >= 0:
                    per_expert[i] += 1

    def gather(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        for src in range(num_ranks):
            rows = [t for s, t in recv_src if s == src]
            if rows:
                parts.append(_take_rows(tensors[src], rows))
        if parts:
            if parts[0].dtype == torch.float8_e4m3fn:
                return torch.cat([p.view(torch.uint8) for p in parts]).view(torch.float8_e4m3fn)
            return torch.cat(parts)
        return tensors[0].new_empty((0, *tensors[0].shape[1:]))

    if isinstance(xs[0], tuple):
        recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = (
            gather([x[0] for x in xs]),
            gather([x[1] for x in xs]),
        )
    else:
        recv_x = gather(xs)  # type: ignore[arg-type]
    topk = topk_idxs[0].size(1)
    recv_topk_idx = torch.tensor(recv_idx_rows, dtype=torch.int64).view(-1, topk)
    recv_topk_weights = None
    if topk_weights is not None:
        recv_topk_weights = torch.tensor(recv_weight_rows, dtype=torch.float32).view(-1, topk)
    aligned = [(n + expert_alignment - 1) // expert_alignment * expert_alignment for n in per_expert]
    return HTDispatchResult(recv_x, recv_topk_idx, recv_topk_weights, aligned, recv_src)


def ht_combine(
    ys: Sequence[torch.Tensor],
    recv_srcs: Sequence[Sequence[tuple[int, int]]],
    num_tokens: Sequence[int],
    rank: int,
    bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    recv_topk_weights: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``rank`` gets back from an HT ``Buffer.combine``.

    Arguments:
        ys: per rank ``r``, the expert output `[M_r, H]` (row ``i`` belongs to ``recv_srcs[r][i]``).
        recv_srcs: per rank, ``HTDispatchResult.recv_src`` of that rank's dispatch.
        num_tokens: per rank, the number of tokens it dispatched.
        bias: `[N, H]` tensor or a 2-tuple of them, added to ``rank``'s result.
        recv_topk_weights: per rank, float32 `[M_r, topk]` to be combined the same way.

    Returns:
        ``(combined_x [N, H] of ys' dtype, combined_topk_weights float32 [N, topk] or None)``:
        for each of ``rank``'s tokens, the float32 sum (no weights) of every received copy, plus
        the bias, cast once at the end.
    """
    hidden = ys[0].size(1)
    n = num_tokens[rank]
    acc = torch.zeros(n, hidden, dtype=torch.float32)
    weights_acc = None
    if recv_topk_weights is not None:
        weights_acc = torch.zeros(n, recv_topk_weights[0].size(1), dtype=torch.float32)
    for holder, srcs in enumerate(recv_srcs):
        for row, (src, t) in enumerate(srcs):
            if src != rank:
                continue
            acc[t] += ys[holder][row].float()
            if weights_acc is not None:
                weights_acc[t] += recv_topk_weights[holder][row].float()
    if bias is not None:
        for b in bias if isinstance(bias, tuple) else (bias,):
            if b is not None:
                acc += b.float()
    return acc.to(ys[0].dtype), weights_acc


# --------------------------------------------------------------------------------------------
# Low-latency mode
# --------------------------------------------------------------------------------------------


def pack_layout_range(begin: int, count: int) -> int:
    """``(begin << 32) | count`` as stored in ``layout_range``."""
    return (begin << 32) | count


def unpack_layout_range(value: int) -> tuple[int, int]:
    """Inverse of :func:`pack_layout_range`: returns ``(begin, count)``."""
    return value >> 32, value & 0xFFFFFFFF


class LLDispatchResult(NamedTuple):
    """What one rank receives from a LL dispatch (``C_e`` = rows received by local expert ``e``)."""

    recv_x: list  # per local expert: bf16 [C_e, H], or (fp8 [C_e, H], scales [C_e, S]) with FP8
    recv_count: torch.Tensor  # int32 [E_local]
    src_info: list[torch.Tensor]  # per local expert: int32 [C_e], source token index of each row
    layout_range: torch.Tensor  # int64 [E_local, R], (begin << 32) | count per source rank
    recv_src_rank: list[torch.Tensor]  # per local expert: int32 [C_e], source rank of each row


def ll_dispatch(
    xs: Sequence[torch.Tensor],
    topk_idxs: Sequence[torch.Tensor],
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    rank: int,
    use_fp8: bool = False,
    round_scale: bool = False,
    use_ue8m0: bool = False,
    masked_ranks: Sequence[int] = (),
) -> LLDispatchResult:
    """What ``rank`` receives from ``Buffer.low_latency_dispatch``.

    Arguments:
        xs: per source rank, bf16 `[N_r, H]` with ``N_r <= T``.
        topk_idxs: per source rank, int64 `[N_r, topk]`.
        num_max_dispatch_tokens_per_rank: ``T`` (only checked against ``N_r``).
        use_fp8 / round_scale / use_ue8m0: the sender casts each token with
            :func:`per_token_cast_to_fp8` before sending; ue8m0 packs the scales as int32.
        masked_ranks: source ranks whose tokens are not received.

    portep's row order (stricter than DeepEP's arrival order): for each local expert, rows are
    grouped by source rank ascending and keep source token order within a rank; a token is
    received once per top-k slot whose expert is local. ``layout_range[e, r]`` packs the begin
    (sum of the counts of lower source ranks) and the count of source rank ``r``.
    """
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0 needs round_scale")
    num_ranks = len(xs)
    experts_per_rank = _experts_per_rank(num_experts, num_ranks)
    first_local = rank * experts_per_rank
    rows: list[list[tuple[int, int]]] = [[] for _ in range(experts_per_rank)]  # (src, t)
    layout_range = torch.zeros(experts_per_rank, num_ranks, dtype=torch.int64)
    for e in range(experts_per_rank):
        for src in range(num_ranks):
            if xs[src].size(0) > num_max_dispatch_tokens_per_rank:
                raise ValueError(f"rank {src} has more than {num_max_dispatch_tokens_per_rank} tokens")
            begin = len(rows[e])
            if src not in masked_ranks:
                for t, row in enumerate(topk_idxs[src].tolist()):
                    # Distinct experts per token: at most one slot matches, but count every slot.
                    rows[e].extend((src, t) for k in row if k == first_local + e)
            layout_range[e, src] = pack_layout_range(begin, len(rows[e]) - begin)

    casts = {}
    if use_fp8:
        casts = {src: per_token_cast_to_fp8(xs[src], round_scale) for src in range(num_ranks)}
    recv_x: list = []
    for e in range(experts_per_rank):
        if use_fp8:
            fp8 = [casts[src][0][t].view(torch.uint8) for src, t in rows[e]]
            scales = [casts[src][1][t] for src, t in rows[e]]
            hidden = xs[0].size(1)
            fp8_rows = (torch.stack(fp8) if fp8 else torch.empty(0, hidden, dtype=torch.uint8)).view(
                torch.float8_e4m3fn
            )
            scale_rows = torch.stack(scales) if scales else torch.empty(0, hidden // FP8_GROUP)
            if use_ue8m0:
                scale_rows = pack_ue8m0(scale_rows) if scales else torch.empty(0, hidden // 512, dtype=torch.int32)
            recv_x.append((fp8_rows, scale_rows))
        else:
            bf16 = [xs[src][t] for src, t in rows[e]]
            recv_x.append(torch.stack(bf16) if bf16 else xs[0].new_empty(0, xs[0].size(1)))
    recv_count = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    src_info = [torch.tensor([t for _, t in r], dtype=torch.int32) for r in rows]
    src_rank = [torch.tensor([s for s, _ in r], dtype=torch.int32) for r in rows]
    return LLDispatchResult(recv_x, recv_count, src_info, layout_range, src_rank)


def ll_combine(
    ys: Sequence[Sequence[torch.Tensor] | torch.Tensor],
    src_infos: Sequence[Sequence[torch.Tensor] | torch.Tensor],
    layout_ranges: Sequence[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    rank: int,
    masked_ranks: Sequence[int] = (),
    partial_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """What source ``rank`` gets back from ``Buffer.low_latency_combine``.

    Arguments:
        ys: per expert rank ``q``, the expert output per local expert: `[E_local, >= C_e, H]`
            or a list of `[>= C_e, H]` (row ``i`` of expert ``e`` answers ``src_infos[q][e][i]``).
        src_infos: per rank, the source token index of every received row (handle ``src_info``).
        layout_ranges: per rank, int64 `[E_local, R]` (handle ``layout_range``).
        topk_idx / topk_weights: ``rank``'s routing, `[N, topk]` int64 / float32.
        masked_ranks: expert ranks whose contribution is dropped.
        partial_dtype: when given, each expert rank's share of a token (its selections' weighted
            rows, summed in float32) is rounded to this dtype before the shares are summed: the
            combine summed on the expert side (the ring backend's default).

    Returns:
        bf16 `[N, H]`: ``out[t] = Σ_k w[t, k] · y_{topk_idx[t, k]}(t)`` in float32 over the slots
        with ``topk_idx >= 0`` whose expert rank is not masked.
    """
    num_ranks = len(layout_ranges)
    experts_per_rank = _experts_per_rank(num_experts, num_ranks)
    num_tokens = topk_idx.size(0)
    hidden = ys[0][0].size(-1)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for t, (row, weights) in enumerate(zip(topk_idx.tolist(), topk_weights.tolist(), strict=True)):
        shares: dict[int, torch.Tensor] = {}  # per expert rank, with partial_dtype
        for e, w in zip(row, weights, strict=True):
            if e < 0:
                continue
            holder, local = divmod(e, experts_per_rank)
            if holder in masked_ranks:
                continue
            begin, count = unpack_layout_range(int(layout_ranges[holder][local, rank]))
            sources = src_infos[holder][local]
            matches = [i for i in range(begin, begin + count) if int(sources[i]) == t]
            if len(matches) != 1:
                raise AssertionError(
                    f"token {t} of rank {rank} appears {len(matches)} times at expert {e} (rank {holder})"
                )
            value = w * ys[holder][local][matches[0]].float()
            if partial_dtype is None:
                out[t] += value
            else:
                shares[holder] = shares[holder] + value if holder in shares else value
        for share in shares.values():
            out[t] += share.to(partial_dtype).float()
    return out.to(torch.bfloat16)
