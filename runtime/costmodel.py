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

Fits are constrained to ``L >= 0`` and ``BW > 0`` (``1/BW >= 0``). :func:`fit_problems`,
:func:`overlap_problems` and :func:`crossover_problems` say why a figure is not a result (a poor or
under-determined fit, an implausible batch), so that reports can flag it instead of printing it plainly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MIN_FIT_POINTS",
    "MIN_FIT_R2",
    "Crossover",
    "LinkFit",
    "OverlapBatch",
    "compute_time",
    "crossover",
    "crossover_problems",
    "fit_problems",
    "fit_round_trip",
    "min_overlap_batch",
    "one_way_time",
    "overlap_problems",
    "payload_per_rank",
    "round_trip_time",
]

MIN_FIT_R2 = 0.9  # below this a fit does not describe its points
MIN_FIT_POINTS = 4  # two parameters from fewer points leave (almost) no residual to judge the model by


@dataclass(frozen=True)
class LinkFit:
    """``(L, BW)`` of one mode, from :func:`fit_round_trip` or given.

    Attributes:
        latency_s: ``L``, seconds per all-to-all (``>= 0`` when fitted).
        bandwidth_Bps: ``BW``, bytes/s per direction; ``math.inf`` when time does not grow with payload.
        r2: coefficient of determination of the fit (1.0 for given values).
        samples: number of points fitted (0 for given values).
        constraint: the bound the fit rests on: ``""`` (none), ``"L = 0"`` (the data asked for a
            negative latency: best pure-bandwidth fit) or ``"1/BW = 0"`` (time does not grow with payload).
    """

    latency_s: float
    bandwidth_Bps: float
    r2: float = 1.0
    samples: int = 0
    constraint: str = ""

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
    """Least-squares fit of ``t = 2 (L + V / BW)`` to measured round trips, subject to ``L >= 0, 1/BW >= 0``.

    Arguments:
        payload_bytes: ``V`` of each point, bytes per rank per direction.
        times_s: measured dispatch + combine seconds of each point.
        relative: minimise relative rather than absolute residuals (weights ``1/t^2``), so that
            small payloads, which set ``L``, count as much as large ones when sizes span decades.

    When the unconstrained optimum breaks a bound, the best fit on that bound is taken (``L = 0``: the
    best pure-bandwidth fit; ``1/BW = 0``: a constant time), as the problem is a convex quadratic in
    ``(2L, 2/BW)``; :attr:`LinkFit.constraint` names the active bound. ``r2`` is the coefficient of
    determination of the minimised (weighted) residuals, and may be negative for a bounded fit.

    Raises:
        ValueError: fewer than two distinct payloads, lengths differ, or a time is not positive with ``relative``.
    """
    if len(payload_bytes) != len(times_s):
        raise ValueError(f"{len(payload_bytes)} payloads but {len(times_s)} times")
    if len(set(payload_bytes)) < 2:
        raise ValueError("fitting L and BW needs at least two distinct payloads")
    if relative and min(times_s) <= 0:
        raise ValueError("a relative fit needs positive times")
    v = list(payload_bytes)
    t = list(times_s)
    w = [1 / ti**2 if relative else 1.0 for ti in t]
    total = sum(w)
    mean_v = sum(wi * vi for wi, vi in zip(w, v, strict=True)) / total
    mean_t = sum(wi * ti for wi, ti in zip(w, t, strict=True)) / total
    sxx = sum(wi * (vi - mean_v) ** 2 for wi, vi in zip(w, v, strict=True))
    sxy = sum(wi * (vi - mean_v) * (ti - mean_t) for wi, vi, ti in zip(w, v, t, strict=True))
    svv = sum(wi * vi * vi for wi, vi in zip(w, v, strict=True))
    svt = sum(wi * vi * ti for wi, vi, ti in zip(w, v, t, strict=True))

    def residual(intercept: float, slope: float) -> float:
        return sum(wi * (ti - intercept - slope * vi) ** 2 for wi, vi, ti in zip(w, v, t, strict=True))

    # (intercept = 2L, slope = 2/BW, active bound): the free optimum, then the optimum on each bound.
    candidates: list[tuple[float, float, str]] = []
    slope = sxy / sxx
    if slope >= 0 and mean_t - slope * mean_v >= 0:
        candidates.append((mean_t - slope * mean_v, slope, ""))
    else:
        if svv > 0:
            candidates.append((0.0, max(svt / svv, 0.0), "L = 0"))
        candidates.append((max(mean_t, 0.0), 0.0, "1/BW = 0"))
    intercept, slope, bound = min(candidates, key=lambda c: residual(c[0], c[1]))
    if bound == "" and slope == 0:
        bound = "1/BW = 0"
    ss_tot = sum(wi * (ti - mean_t) ** 2 for wi, ti in zip(w, t, strict=True))
    ss_res = residual(intercept, slope)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    bandwidth = 2 / slope if slope > 0 else math.inf
    return LinkFit(latency_s=intercept / 2, bandwidth_Bps=bandwidth, r2=r2, samples=len(v), constraint=bound)


def fit_problems(fit: LinkFit, min_r2: float = MIN_FIT_R2, min_points: int = MIN_FIT_POINTS) -> list[str]:
    """Why ``fit`` is not a result (empty when it is): R^2 below ``min_r2``, fewer than ``min_points``
    points, or a time that does not grow with payload. Given values (``samples == 0``) are taken as they are."""
    if fit.samples == 0:
        return []
    problems = []
    if fit.samples < min_points:
        problems.append(f"{fit.samples} points < {min_points}")
    if not fit.r2 >= min_r2:  # also catches NaN
        shown = f"{fit.r2:.2f}"
        if float(shown) >= min_r2:  # 0.899 must not read "0.90 < 0.9"
            shown = f"{math.floor(fit.r2 * 1e4) / 1e4:.4f}"
        problems.append(f"R^2 {shown} < {min_r2:g}")
    if math.isinf(fit.bandwidth_Bps):
        problems.append("time does not grow with payload (BW unbounded)")
    return problems


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


def crossover_problems(ll: LinkFit, ht: LinkFit) -> list[str]:
    """Why the crossover of ``ll`` and ``ht`` is not a result: the problems of either fit, named by mode."""
    return [f"{mode} fit: {p}" for mode, fit in (("LL", ll), ("HT", ht)) for p in fit_problems(fit)]


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


def overlap_problems(ob: OverlapBatch, link: LinkFit | None = None, c_tok_problems: Sequence[str] = (),
                     link_name: str = "fit", ranks: int | None = None) -> list[str]:
    """Why a minimum overlap batch is not a result: a batch below one token (below one token per rank
    when ``ranks`` is given: the model spreads ``B`` evenly and cannot split a token), or not a number,
    a non-positive compute term, the problems of the fit it uses (named ``link_name``) and of ``c_tok``.

    An impossible overlap (``min_batch = inf``) is a result in itself unless its inputs are flagged.
    """
    problems = []
    if math.isnan(ob.min_batch):
        problems.append("B is not a number")
    elif ob.min_batch < 1:
        problems.append(f"B = {ob.min_batch:.2g} < 1 token")
    elif ranks is not None and ob.min_batch < ranks:
        problems.append(f"B = {ob.min_batch:.2g} < 1 token per rank (P = {ranks})")
    if ob.compute_per_token_s <= 0:
        problems.append("gamma*c_tok is not positive")
    if link is not None:
        problems += [f"{link_name}: {p}" for p in fit_problems(link)]
    problems += [f"c_tok: {p}" for p in c_tok_problems]
    return problems
