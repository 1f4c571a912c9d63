"""From per-rank samples to the figures of ``portep bench``: statistics, bandwidth, limit, fits, crossover."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from portep.costmodel import (
    MIN_FIT_POINTS,
    MIN_FIT_R2,
    LinkFit,
    crossover,
    crossover_problems,
    fit_problems,
    fit_round_trip,
    min_overlap_batch,
    overlap_problems,
)

OPS = ("dispatch", "combine")
B2B = "b2b round trip"  # the op of back-to-back round trips (see bench/ranks.py)


@dataclass
class Point:
    """One (implementation, backend, mode, size, op) measured on every rank.

    ``samples_s[i]`` is iteration ``i``'s time on the slowest rank; ``bytes_per_rank`` is DeepEP's
    byte count of each rank; ``limit_s`` is all ranks' bytes over the measured copy bandwidth.
    """

    impl: str
    backend: str
    mode: str
    tokens: int
    op: str
    samples_s: list[float]
    rank_samples_s: list[list[float]]
    bytes_per_rank: list[int]
    check: dict
    limit_s: float = 0.0

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def p99_s(self) -> float:
        return percentile(self.samples_s, 99)

    @property
    def mean_bytes(self) -> float:
        return sum(self.bytes_per_rank) / len(self.bytes_per_rank)

    @property
    def bandwidth_Bps(self) -> float:
        """Bytes per rank over the median time, as DeepEP reports it."""
        return self.mean_bytes / self.median_s

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(median_s=self.median_s, p99_s=self.p99_s, bandwidth_GBps=self.bandwidth_Bps / 1e9)
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (numpy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def merge_ranks(rank_results: Sequence[dict], copy_bandwidth_Bps: float) -> list[Point]:
    """Combine the results of every rank of one launch into :class:`Point` s (slowest rank per iteration)."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for result in rank_results:
        for p in result["points"]:
            grouped[(p["impl"], p["mode"], p["tokens"], p["op"])].append(p)
    backend = rank_results[0]["backend"]
    points = []
    for (impl, mode, tokens, op), per_rank in grouped.items():
        rank_samples = [p["samples_s"] for p in per_rank]
        samples = [max(col) for col in zip(*rank_samples, strict=True)]
        nbytes = [p["bytes"] for p in per_rank]
        ok = all(p["check"]["ok"] for p in per_rank)
        check = {"ok": ok, "max_combine_diff": max(p["check"]["combine_diff"] for p in per_rank),
                 "detail": "; ".join(p["check"]["detail"] for p in per_rank if p["check"]["detail"])}
        points.append(Point(impl, "all_to_all_single" if impl == "baseline" else backend, mode, tokens, op,
                            samples, rank_samples, nbytes, check, sum(nbytes) / copy_bandwidth_Bps))
    return points


@dataclass
class RoundTrip:
    """Dispatch + combine of one size: the quantities the cost model is fitted to."""

    impl: str
    backend: str
    mode: str
    tokens: int
    payload_bytes: float  # per rank per direction: mean of dispatch and combine bytes
    time_s: float  # median dispatch + median combine
    limit_s: float


def round_trips(points: Iterable[Point]) -> list[RoundTrip]:
    """Pair dispatch and combine points of the same size."""
    pairs: dict[tuple, dict[str, Point]] = defaultdict(dict)
    for p in points:
        pairs[(p.impl, p.backend, p.mode, p.tokens)][p.op] = p
    out = []
    for (impl, backend, mode, tokens), ops in sorted(pairs.items()):
        if not set(OPS) <= ops.keys():
            continue
        d, c = ops["dispatch"], ops["combine"]
        out.append(RoundTrip(impl, backend, mode, tokens, (d.mean_bytes + c.mean_bytes) / 2,
                             d.median_s + c.median_s, d.limit_s + c.limit_s))
    return out


def series_key(rt: RoundTrip) -> tuple[str, str, str]:
    """Curves fitted separately: portep per mode; the baseline over all its sizes."""
    return (rt.impl, rt.backend, "a2a" if rt.impl == "baseline" else rt.mode)


def fits(trips: Sequence[RoundTrip]) -> dict[tuple[str, str, str], LinkFit]:
    """``t = 2(L + V/BW)`` per series (those with two distinct payloads or more), fitted on relative error
    with ``L >= 0``: the sweep spans decades of payload, and ``L`` is set by its small end. Series with
    fewer than ``MIN_FIT_POINTS`` points are fitted too, and flagged by :func:`fit_record`."""
    series: dict[tuple[str, str, str], list[RoundTrip]] = defaultdict(list)
    for rt in trips:
        series[series_key(rt)].append(rt)
    out = {}
    for key, rts in series.items():
        if len({rt.payload_bytes for rt in rts}) >= 2:
            out[key] = fit_round_trip([rt.payload_bytes for rt in rts], [rt.time_s for rt in rts], relative=True)
    return out


def fit_record(key: tuple[str, str, str], fit: LinkFit) -> dict:
    """One fit as recorded in ``bench.json``: its figures, the bound it rests on, and why it is not a result."""
    problems = fit_problems(fit)
    return {"impl": key[0], "backend": key[1], "mode": key[2], "latency_us": fit.latency_us,
            "bandwidth_GBps": fit.bandwidth_GBps, "r2": fit.r2, "points": fit.samples,
            "constraint": fit.constraint, "result": not problems, "problems": problems}


def validation_rules() -> dict:
    """The thresholds a figure must pass to be reported as a result (recorded in ``bench.json``)."""
    from . import machine

    return {"fit_min_r2": MIN_FIT_R2, "fit_min_points": MIN_FIT_POINTS, "fit_bounds": "L >= 0, BW > 0",
            "min_overlap_batch": "at least 1 token per rank (B >= P)",
            "c_tok": {"statistic": "median of repeats after warm-up", "max_spread": machine.MAX_SPREAD,
                      "min_repeats": machine.MIN_REPEATS, "min_flops_per_s": machine.MIN_FLOPS,
                      "max_flops_per_s_per_thread": machine.MAX_FLOPS_PER_THREAD},
            "copy_bandwidth_Bps": list(machine.COPY_BOUNDS_BPS)}


def model_summary(fitted: dict[tuple[str, str, str], LinkFit], c_tok_s: float, gamma: float, ranks: int, topk: int,
                  hidden: int, fp8_dispatch: bool, c_tok_problems: Sequence[str] = ()) -> list[dict]:
    """Per implementation and backend: the LL/HT crossover and the minimum batch for dual-batch overlap.

    Each figure carries ``problems``: why it is not a result (its fits', ``c_tok_problems``, a batch
    below one token per rank); ``result`` is True when there are none.
    """
    out = []
    for impl, backend in sorted({(k[0], k[1]) for k in fitted if k[2] != "a2a"}):
        ll, ht = fitted.get((impl, backend, "LL")), fitted.get((impl, backend, "HT"))
        entry: dict = {"impl": impl, "backend": backend}
        if ll and ht:
            cr = crossover(ll, ht)
            problems = crossover_problems(ll, ht)
            entry["crossover"] = {"payload_bytes": cr.payload_bytes, "below": cr.below, "above": cr.above,
                                  "note": cr.note, "result": not problems, "problems": problems}
        for mode, link in (("LL", ll), ("HT", ht)):
            if link is None:
                continue
            ob = min_overlap_batch(link, c_tok_s, gamma, ranks, topk, hidden, 1.0 if fp8_dispatch else 2.0, 2.0)
            problems = overlap_problems(ob, link, c_tok_problems, f"{mode} fit", ranks)
            entry[f"overlap_{mode}"] = {"min_batch": ob.min_batch, "feasible": ob.feasible,
                                        "compute_per_token_s": ob.compute_per_token_s,
                                        "comm_per_token_s": ob.comm_per_token_s,
                                        "result": not problems, "problems": problems}
        out.append(entry)
    return out
