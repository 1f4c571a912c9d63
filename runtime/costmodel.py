"""Latency-bandwidth (Hockney) cost model of expert-parallel dispatch + combine.

Units are SI throughout: seconds, bytes, bytes per second (1 GB = 1e9 B, 1 MB = 1e6 B).

* Round trip of one MoE layer (dispatch, then combine), ``V`` = bytes per rank per direction::

      t(V) = 2 (L + V / BW)

  ``L`` is the fixed cost of one all-to-all (launch, signalling, synchronisation) and ``BW`` its
  effective *per-direction* bandwidth: an all-to-all sends and receives at once over a full-duplex
  link, so plug in one-way figures (400 Gb/s = 50 GB/s), never "bidirectional" totals.
* LL/HT crossover payload (the factor 2 cancels)::

      V* = (L_LL - L_HT) / (1/BW_HT - 1/BW_LL)

* Dual-batch overlap holds when expert compute covers the round trip,
  ``gamma (B k / P) c_tok >= 2 (L + (B / P) k d s / BW)``, i.e. for a global batch::

      B >= 2 (P / k) L / (gamma c_tok - 2 d s / BW)

  ``B`` counts tokens across the ``P`` ranks, ``c_tok`` is expert seconds per routed token. ``2 d s``
  charges both directions at ``s`` bytes per element; DeepEP dispatches FP8 (s = 1) but combines
  BF16 (s = 2), which :func:`min_overlap_batch` takes as ``combine_bytes_per_elem``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Crossover",
    "LinkFit",
    "OverlapBatch",
    "compute_time",
    "crossover",
    "fit_round_trip",
    "min_overlap_batch",
    "one_way_time",
    "payload_per_rank",
    "round_trip_time",
]


@dataclass(frozen=True)
class LinkFit:
    """``(L, BW)`` of one mode, from :func:`fit_round_trip` or given.

    Attributes:
        latency_s: ``L``, seconds per all-to-all (negative only if the data says so).
        bandwidth_Bps: ``BW``, bytes/s per direction; ``math.inf`` when time does not grow with payload.
        r2: coefficient of determination of the fit (1.0 for given values).
        samples: number of points fitted (0 for given values).
    """

    latency_s: float
    bandwidth_Bps: float
    r2: float = 1.0
    samples: int = 0

    @property
    def latency_us(self) -> float:
        return self.latency_s * 1e6

    @property
    def bandwidth_GBps(self) -> float:
        return self.bandwidth_Bps / 1e9


def one_way_time(payload_bytes: float, link: LinkFit) -> float:
    """``L + V / BW``: one all-to-all (dispatch or combine) of ``payload_bytes`` per rank."""
    return link.latency_s + payload_bytes / link.bandwidth_Bps


def round_trip_time(payload_bytes: float, link: LinkFit) -> float:
    """``2 (L + V / BW)``: dispatch plus combine of ``payload_bytes`` per rank per direction."""
    return 2 * one_way_time(payload_bytes, link)


def fit_round_trip(payload_bytes: Sequence[float], times_s: Sequence[float], relative: bool = False) -> LinkFit:
    """Least-squares fit of ``t = 2 (L + V / BW)`` to measured round trips.

    Arguments:
        payload_bytes: ``V`` of each point, bytes per rank per direction.
        times_s: measured dispatch + combine seconds of each point.
        relative: minimise relative rather than absolute residuals (weights ``1/t^2``), so that
            small payloads, which set ``L``, count as much as large ones when sizes span decades.

    ``r2`` is the coefficient of determination of the minimised (weighted) residuals.

    Raises:
        ValueError: fewer than two distinct payloads, lengths differ, or a time is not positive with ``relative``.
    """
    if len(payload_bytes) != len(times_s):
        raise ValueError(f"{len(payload_bytes)} payloads but {len(times_s)} times")
    if len(set(payload_bytes)) < 2:
        raise ValueError("fitting L and BW needs at least two distinct payloads")
    if relative and min(times_s) <= 0:
        raise ValueError("a relative fit needs positive times")
    points = list(zip(payload_bytes, times_s, strict=True))
    weights = [1 / t**2 if relative else 1.0 for _, t in points]
    total = sum(weights)
    mean_v = sum(w * v for w, (v, _) in zip(weights, points, strict=True)) / total
    mean_t = sum(w * t for w, (_, t) in zip(weights, points, strict=True)) / total
    sxx = sum(w * (v - mean_v) ** 2 for w, (v, _) in zip(weights, points, strict=True))
    sxy = sum(w * (v - mean_v) * (t - mean_t) for w, (v, t) in zip(weights, points, strict=True))
    slope = sxy / sxx  # = 2 / BW
    intercept = mean_t - slope * mean_v  # = 2 L
    ss_tot = sum(w * (t - mean_t) ** 2 for w, (_, t) in zip(weights, points, strict=True))
    ss_res = sum(w * (t - intercept - slope * v) ** 2 for w, (v, t) in zip(weights, points, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    bandwidth = 2 / slope if slope > 0 else math.inf
    return LinkFit(latency_s=intercept / 2, bandwidth_Bps=bandwidth, r2=r2, samples=len(points))


@dataclass(frozen=True)
class Crossover:
    """Where HT starts to beat LL.

    Attributes:
        payload_bytes: ``V*`` (bytes per rank per direction), or None when one mode wins (or both tie)
            at every positive payload.
        below / above: the faster mode below and above ``V*``; with no crossover both name the
            mode that always wins ("tie" if the fits are identical).
        note: one line saying which case applies.
    """

    payload_bytes: float | None
    below: str
    above: str
    note: str


def crossover(ll: LinkFit, ht: LinkFit) -> Crossover:
    """``V* = (L_LL - L_HT) / (1/BW_HT - 1/BW_LL)``, with the no-crossover cases named."""
    d_latency = ll.latency_s - ht.latency_s  # > 0: HT starts ahead
    d_inverse = 1 / ht.bandwidth_Bps - 1 / ll.bandwidth_Bps  # < 0: HT gains per byte
    # t_LL(V) - t_HT(V) = d_latency - V * d_inverse
    if d_inverse == 0:
        if d_latency == 0:
            return Crossover(None, "tie", "tie", "identical fits: LL and HT cost the same at every payload")
        best = "HT" if d_latency > 0 else "LL"
        return Crossover(None, best, best, f"equal bandwidths: {best} (lower latency) wins at every payload")
    v_star = d_latency / d_inverse
    if v_star > 0:
        below, above = ("LL", "HT") if d_inverse < 0 else ("HT", "LL")
        return Crossover(v_star, below, above, f"{below} below V*, {above} above")
    # Same sign of t_LL - t_HT at every V > 0: evaluate it at V = 1 byte (or anywhere positive).
    gap = d_latency - d_inverse
    if gap == 0:
        return Crossover(None, "tie", "tie", "the fits meet at V = 0 and coincide")
    best = "HT" if gap > 0 else "LL"
    reason = "lower latency and higher bandwidth" if v_star < 0 else "higher bandwidth"
    return Crossover(None, best, best, f"no crossover at V > 0: {best} wins everywhere ({reason})")


def payload_per_rank(batch_tokens: float, ranks: int, topk: int, hidden: int, bytes_per_elem: float) -> float:
    """``V_rank = (B / P) k d s``: bytes one rank sends in one direction for a global batch ``B``."""
    return batch_tokens / ranks * topk * hidden * bytes_per_elem


def compute_time(batch_tokens: float, ranks: int, topk: int, c_tok_s: float, gamma: float) -> float:
    """``gamma (B k / P) c_tok``: expert compute on the critical (slowest) rank."""
    return gamma * batch_tokens * topk / ranks * c_tok_s


@dataclass(frozen=True)
class OverlapBatch:
    """Minimum global batch for dual-batch overlap, with the terms of the inequality.

    Attributes:
        min_batch: ``B`` (tokens across all ranks); ``math.inf`` when overlap is impossible.
        compute_per_token_s: ``gamma c_tok``.
        comm_per_token_s: ``d (s_dispatch + s_combine) / BW`` (``2 d s / BW`` when both are ``s``).
        numerator_s: ``2 (P / k) L``.
        feasible: the denominator is positive (compute per token outgrows wire time per token).
    """

    min_batch: float
    compute_per_token_s: float
    comm_per_token_s: float
    numerator_s: float
    feasible: bool


def min_overlap_batch(link: LinkFit, c_tok_s: float, gamma: float, ranks: int, topk: int, hidden: int,
                      bytes_per_elem: float, combine_bytes_per_elem: float | None = None) -> OverlapBatch:
    """``B >= 2 (P/k) L / (gamma c_tok - 2 d s / BW)``; ``inf`` (not feasible) when the denominator <= 0.

    ``combine_bytes_per_elem`` (default ``bytes_per_elem``) prices the combine direction on its own,
    e.g. 2 for DeepEP's BF16 combine after an FP8 (1) dispatch.
    """
    s_combine = bytes_per_elem if combine_bytes_per_elem is None else combine_bytes_per_elem
    compute = gamma * c_tok_s
    comm = hidden * (bytes_per_elem + s_combine) / link.bandwidth_Bps
    numerator = 2 * (ranks / topk) * link.latency_s
    denominator = compute - comm
    feasible = denominator > 0
    value = max(numerator, 0.0) / denominator if feasible else math.inf
    return OverlapBatch(value, compute, comm, numerator, feasible)
