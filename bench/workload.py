"""The benchmarked layer: shape, per-rank inputs, and payload bytes counted the way DeepEP counts them.

Bytes follow DeepEP's tests:

* LL (``test_low_latency.py``), per selection (a ``topk_idx`` entry != -1): FP8 dispatch
  ``hidden + hidden/128*4 + 16``, BF16 dispatch and combine ``2*hidden``.
* HT (``test_intranode.py`` / ``test_internode.py``), per received token copy (one per destination
  rank): BF16 ``2*hidden``, FP8 ``2*hidden * (1 + 4/128) / 2``; combine BF16 ``2*hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_GROUP = 128


@dataclass(frozen=True)
class Shape:
    """One MoE layer's routing shape (default: DeepSeek-V3)."""

    hidden: int = 7168
    topk: int = 8
    num_experts: int = 256
    fp8_dispatch: bool = True
    seed: int = 0


@dataclass
class Inputs:
    """What one rank feeds a dispatch: tokens, routing, weights."""

    x: torch.Tensor  # bf16 [N, hidden]
    topk_idx: torch.Tensor  # int64 [N, topk]
    topk_weights: torch.Tensor  # float32 [N, topk]


def rank_inputs(shape: Shape, rank: int, num_tokens: int) -> Inputs:
    """Deterministic inputs of ``rank`` at ``num_tokens`` (any rank can rebuild any other's)."""
    gen = torch.Generator().manual_seed(shape.seed * 1_000_003 + rank * 7919 + num_tokens)
    x = torch.randn(num_tokens, shape.hidden, generator=gen).bfloat16()
    scores = torch.randn(num_tokens, shape.num_experts, generator=gen).abs() + 1
    topk_idx = scores.topk(shape.topk, dim=1).indices
    weights = torch.rand(num_tokens, shape.topk, generator=gen) + 0.1
    return Inputs(x, topk_idx, weights)


def tokens_per_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """bool ``[N, R]``: token ``t`` has at least one expert on rank ``r``."""
    owner = topk_idx // (num_experts // num_ranks)
    hit = torch.zeros(topk_idx.size(0), num_ranks + 1, dtype=torch.bool)
    hit.scatter_(1, torch.where(topk_idx >= 0, owner, num_ranks), True)
    return hit[:, :num_ranks]


def ll_dispatch_bytes(topk_idx: torch.Tensor, hidden: int, fp8: bool) -> int:
    """DeepEP's LL dispatch bytes of one rank (per selection)."""
    per = hidden + hidden // FP8_GROUP * 4 + 16 if fp8 else 2 * hidden
    return int((topk_idx >= 0).sum()) * per


def ll_combine_bytes(topk_idx: torch.Tensor, hidden: int) -> int:
    """DeepEP's LL combine bytes of one rank (BF16, per selection)."""
    return int((topk_idx >= 0).sum()) * 2 * hidden


def ht_dispatch_bytes(recv_rows: int, hidden: int, fp8: bool) -> int:
    """DeepEP's HT dispatch bytes of one rank (per received token copy)."""
    bf16 = recv_rows * 2 * hidden
    return int(bf16 * (1 + 4 / FP8_GROUP) / 2) if fp8 else bf16


def ht_combine_bytes(recv_rows: int, hidden: int) -> int:
    """DeepEP's HT combine bytes of one rank (BF16, per received token copy)."""
    return recv_rows * 2 * hidden
