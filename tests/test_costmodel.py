"""The cost model: fit, crossover, minimum batch for overlap, ``portep model``, and the checks that keep
implausible figures out of ``portep bench``'s results."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest
import torch

from portep import cli
from portep.bench import analysis, machine, report
from portep.costmodel import (
    LinkFit,
    compute_time,
    crossover,
    crossover_problems,
    fit_problems,
    fit_round_trip,
    min_overlap_batch,
    overlap_problems,
    payload_per_rank,
    round_trip_time,
)

LL = LinkFit(35e-6, 22e9)  # the worked example of the Wide-EP notes
HT = LinkFit(120e-6, 44e9)


def test_fit_recovers_latency_and_bandwidth() -> None:
    truth = LinkFit(80e-6, 12.5e9)
    payloads = [2**i * 1e4 for i in range(10)]
    fit = fit_round_trip(payloads, [round_trip_time(v, truth) for v in payloads])
    assert fit.latency_s == pytest.approx(truth.latency_s, rel=1e-9)
    assert fit.bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.samples == len(payloads)


def test_fit_with_noise() -> None:
    truth = LinkFit(50e-6, 5e9)
    rng = random.Random(0)
    payloads = [v * 1e5 for v in range(1, 41)]
    times = [round_trip_time(v, truth) * (1 + rng.uniform(-0.02, 0.02)) for v in payloads]
    fit = fit_round_trip(payloads, times)
    assert fit.bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=0.03)
    assert fit.latency_s == pytest.approx(truth.latency_s, abs=20e-6)
    assert 0.99 < fit.r2 <= 1.0


def test_fit_flat_times_give_infinite_bandwidth() -> None:
    fit = fit_round_trip([1e3, 2e3, 3e3], [1e-3, 1e-3, 1e-3])
    assert math.isinf(fit.bandwidth_Bps)
    assert fit.latency_s == pytest.approx(0.5e-3)


@pytest.mark.parametrize(("payloads", "times"), [([1.0], [1.0]), ([5.0, 5.0], [1.0, 2.0]), ([1.0, 2.0], [1.0])])
def test_fit_rejects_underdetermined_input(payloads: list[float], times: list[float]) -> None:
    with pytest.raises(ValueError):
        fit_round_trip(payloads, times)


def test_worked_example_crossover() -> None:
    cr = crossover(LL, HT)
    assert cr.payload_bytes == pytest.approx(85e-6 * 44e9)  # 3.74 MB
    assert round(cr.payload_bytes / 1e6, 1) == 3.7
    assert (cr.below, cr.above) == ("LL", "HT")
    # Below V* LL is faster, above it HT.
    assert round_trip_time(cr.payload_bytes / 2, LL) < round_trip_time(cr.payload_bytes / 2, HT)
    assert round_trip_time(cr.payload_bytes * 2, HT) < round_trip_time(cr.payload_bytes * 2, LL)


def test_worked_example_min_batch() -> None:
    ob = min_overlap_batch(HT, 1.8e-6, 1.1, ranks=16, topk=8, hidden=7168, bytes_per_elem=1)
    assert ob.feasible
    assert ob.compute_per_token_s == pytest.approx(1.98e-6)
    assert ob.comm_per_token_s == pytest.approx(2 * 7168 / 44e9)  # 0.326 us
    assert ob.numerator_s == pytest.approx(480e-6)
    assert ob.min_batch == pytest.approx(290.2, abs=0.05)
    assert 480e-6 / (1.98e-6 - 0.33e-6) == pytest.approx(290.9, abs=0.05)  # the notes' rounding: "~291"
    bf16_combine = min_overlap_batch(HT, 1.8e-6, 1.1, 16, 8, 7168, 1, combine_bytes_per_elem=2)
    assert bf16_combine.min_batch == pytest.approx(321.9, abs=0.05)


def test_worked_example_payload_and_overlap_condition() -> None:
    v = payload_per_rank(8192, 16, 8, 7168, 1)
    assert v == pytest.approx(29.36e6, rel=1e-3)  # "~29 MB >> V*: use HT"
    b = min_overlap_batch(HT, 1.8e-6, 1.1, 16, 8, 7168, 1).min_batch
    # At the minimum batch, compute exactly covers the round trip.
    comm = round_trip_time(payload_per_rank(b, 16, 8, 7168, 1), HT)
    assert compute_time(b, 16, 8, 1.8e-6, 1.1) == pytest.approx(comm)


def test_overlap_impossible_when_wire_outweighs_compute() -> None:
    ob = min_overlap_batch(LinkFit(10e-6, 1e9), 1e-6, 1.0, 16, 8, 7168, 1)
    assert not ob.feasible
    assert math.isinf(ob.min_batch)


def test_crossover_equal_bandwidths() -> None:
    cr = crossover(LinkFit(10e-6, 20e9), LinkFit(30e-6, 20e9))
    assert cr.payload_bytes is None and cr.below == cr.above == "LL"
    assert crossover(LinkFit(10e-6, 20e9), LinkFit(10e-6, 20e9)).below == "tie"


def test_crossover_one_mode_dominates() -> None:
    # HT has both lower latency and higher bandwidth: it wins everywhere.
    cr = crossover(LinkFit(50e-6, 20e9), LinkFit(40e-6, 40e9))
    assert cr.payload_bytes is None and cr.below == cr.above == "HT"
    # LL better in both.
    cr = crossover(LinkFit(10e-6, 50e9), LinkFit(40e-6, 40e9))
    assert cr.payload_bytes is None and cr.below == cr.above == "LL"
    # Same latency: the higher bandwidth wins at every positive payload.
    cr = crossover(LinkFit(10e-6, 20e9), LinkFit(10e-6, 40e9))
    assert cr.payload_bytes is None and cr.below == "HT"


def test_crossover_reversed_and_infinite_bandwidth() -> None:
    # LL with higher latency but higher bandwidth: HT below V*, LL above.
    cr = crossover(LinkFit(100e-6, 50e9), LinkFit(20e-6, 10e9))
    assert (cr.below, cr.above) == ("HT", "LL")
    assert cr.payload_bytes == pytest.approx(80e-6 / (1 / 10e9 - 1 / 50e9))
    cr = crossover(LinkFit(10e-6, 10e9), LinkFit(30e-6, math.inf))
    assert cr.payload_bytes == pytest.approx(20e-6 * 10e9)


def test_portep_model_reproduces_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["model"]) == 0
    out = capsys.readouterr().out
    assert "V* = 3.74 MB" in out
    assert "B >= 290.2 tokens" in out
    assert "291" in out
    assert "-> use HT" in out
    for stack in ("H100 + InfiniBand NDR", "MI300X + RoCE", "P5 (H100) + EFA"):
        assert stack in out


def test_portep_model_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["model", "--bw-ll-gbps", "44", "--c-tok-us", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "crossover: none" in out
    assert "impossible" in out


# --- Constrained fit -------------------------------------------------------------------------------------------


def _weighted_line(payloads: Sequence[float], times: Sequence[float], weights: Sequence[float]) -> tuple[float, float]:
    """Unconstrained weighted least squares ``t = a + b V``: (a, b)."""
    total = sum(weights)
    mv = sum(w * v for w, v in zip(weights, payloads, strict=True)) / total
    mt = sum(w * t for w, t in zip(weights, times, strict=True)) / total
    b = sum(w * (v - mv) * (t - mt) for w, v, t in zip(weights, payloads, times, strict=True)) / \
        sum(w * (v - mv) ** 2 for w, v in zip(weights, payloads, strict=True))
    return mt - b * mv, b


@pytest.mark.parametrize("relative", [False, True])
def test_fit_with_negative_unconstrained_latency_is_the_best_pure_bandwidth_fit(relative: bool) -> None:
    payloads = [1e5 * 2**i for i in range(6)]
    times = [2e-9 * v**1.4 for v in payloads]  # convex in V: a straight line through it crosses below zero
    weights = [1 / t**2 if relative else 1.0 for t in times]
    intercept, _ = _weighted_line(payloads, times, weights)
    assert intercept < 0  # the unconstrained fit would report L < 0

    fit = fit_round_trip(payloads, times, relative=relative)
    assert fit.latency_s == 0.0
    assert fit.constraint == "L = 0"
    assert 0 < fit.bandwidth_Bps < math.inf
    slope = sum(w * v * t for w, v, t in zip(weights, payloads, times, strict=True)) / \
        sum(w * v * v for w, v in zip(weights, payloads, strict=True))
    assert fit.bandwidth_Bps == pytest.approx(2 / slope, rel=1e-12)

    def residual(latency_s: float, bandwidth_Bps: float) -> float:
        return sum(w * (t - 2 * (latency_s + v / bandwidth_Bps)) ** 2
                   for w, v, t in zip(weights, payloads, times, strict=True))

    best = residual(fit.latency_s, fit.bandwidth_Bps)
    for bw in (fit.bandwidth_Bps * 0.99, fit.bandwidth_Bps * 1.01):
        assert residual(0.0, bw) > best
    for latency in (1e-7, 1e-6, 1e-5):  # no feasible L > 0 does better at its own best BW either
        assert min(residual(latency, fit.bandwidth_Bps * f) for f in (0.9, 0.95, 1.0, 1.05, 1.1)) > best


def test_fit_keeps_positive_latency_unconstrained() -> None:
    truth = LinkFit(80e-6, 12.5e9)
    payloads = [2**i * 1e4 for i in range(10)]
    fit = fit_round_trip(payloads, [round_trip_time(v, truth) for v in payloads], relative=True)
    assert fit.constraint == ""
    assert fit.latency_s == pytest.approx(80e-6, rel=1e-9)


def test_fit_of_times_falling_with_payload_is_constant() -> None:
    payloads, times = [1e3, 2e3, 4e3, 8e3], [4e-3, 3e-3, 2.5e-3, 2e-3]
    fit = fit_round_trip(payloads, times)
    assert math.isinf(fit.bandwidth_Bps) and fit.constraint == "1/BW = 0"
    assert fit.latency_s == pytest.approx(sum(times) / len(times) / 2)
    assert fit.latency_s > 0
    assert "time does not grow with payload (BW unbounded)" in fit_problems(fit)


# --- Flags: fits, crossover, overlap batch ------------------------------------------------------------------------


def test_fit_problems_flag_low_r2_and_too_few_points() -> None:
    assert fit_problems(LinkFit(50e-6, 5e9, r2=0.99, samples=5)) == []
    assert fit_problems(LinkFit(50e-6, 5e9, r2=0.71, samples=5)) == ["R^2 0.71 < 0.9"]
    assert fit_problems(LinkFit(50e-6, 5e9, r2=0.99, samples=3)) == ["3 points < 4"]
    assert fit_problems(LinkFit(50e-6, 5e9, r2=0.5, samples=2)) == ["2 points < 4", "R^2 0.50 < 0.9"]
    assert fit_problems(LinkFit(50e-6, 5e9, r2=math.nan, samples=5)) == ["R^2 nan < 0.9"]
    assert fit_problems(LinkFit(50e-6, 5e9, r2=0.8999, samples=5)) == ["R^2 0.8999 < 0.9"]
    assert fit_problems(LinkFit(50e-6, 5e9, r2=0.9, samples=5)) == []
    assert fit_problems(LinkFit(50e-6, 5e9)) == []  # given values are not judged
    # A real fit on three exact points is still flagged: three points cannot test a two-parameter model.
    payloads = [1e5, 2e5, 4e5]
    assert fit_problems(fit_round_trip(payloads, [round_trip_time(v, HT) for v in payloads])) == ["3 points < 4"]


def test_crossover_and_overlap_inherit_fit_problems() -> None:
    poor = LinkFit(120e-6, 44e9, r2=0.71, samples=5)
    good = LinkFit(35e-6, 22e9, r2=0.99, samples=5)
    assert crossover_problems(good, poor) == ["HT fit: R^2 0.71 < 0.9"]
    assert crossover_problems(good, good) == []
    ob = min_overlap_batch(poor, 1.8e-6, 1.1, 16, 8, 7168, 1)
    assert ob.min_batch > 1
    assert overlap_problems(ob, poor, link_name="HT fit") == ["HT fit: R^2 0.71 < 0.9"]
    assert overlap_problems(ob, good) == []
    assert overlap_problems(ob, good, ["repeats disagree"]) == ["c_tok: repeats disagree"]


def test_min_batch_below_one_token_is_flagged() -> None:
    # The symptom of an implausible c_tok (172 ms per routed token): a "minimum batch" of 0.03 tokens.
    ob = min_overlap_batch(LinkFit(200e-6, 1e9, r2=0.99, samples=5), 0.172, 1.1, 4, 8, 7168, 1, 2)
    assert ob.feasible and ob.min_batch < 1
    assert overlap_problems(ob) == [f"B = {ob.min_batch:.2g} < 1 token"]
    # A latency clamped to 0 makes every batch "enough": B = 0 is flagged too.
    zero = min_overlap_batch(LinkFit(0.0, 1e9, r2=0.99, samples=5), 1e-4, 1.1, 4, 8, 7168, 1, 2)
    assert zero.min_batch == 0 and overlap_problems(zero) == ["B = 0 < 1 token"]
    # Above one token but below one token per rank, when the ranks are known.
    few = min_overlap_batch(LinkFit(200e-6, 1e9), 1e-4, 1.1, 4, 8, 7168, 1, 2)
    assert 1 <= few.min_batch < 4 and overlap_problems(few) == []
    assert overlap_problems(few, ranks=4) == [f"B = {few.min_batch:.2g} < 1 token per rank (P = 4)"]
    # Impossible overlap is a result in itself.
    assert overlap_problems(min_overlap_batch(LinkFit(10e-6, 1e9), 1e-6, 1.0, 16, 8, 7168, 1)) == []


def _trip(mode: str, tokens: int, payload: float, time_s: float) -> analysis.RoundTrip:
    return analysis.RoundTrip("portep", "ring", mode, tokens, payload, time_s, time_s / 10)


def test_model_summary_flags_derived_figures() -> None:
    rng = random.Random(1)
    ll_truth, ht_truth = LinkFit(3000e-6, 0.2e9), LinkFit(9000e-6, 0.4e9)
    trips = [_trip("LL", n, n * 1e4, round_trip_time(n * 1e4, ll_truth)) for n in (8, 16, 32, 64, 128)]
    # HT: three noisy points only.
    trips += [_trip("HT", n, n * 2e4, round_trip_time(n * 2e4, ht_truth) * rng.uniform(0.5, 1.5)) for n in (64, 128,
                                                                                                          256)]
    fitted = analysis.fits(trips)
    assert fit_problems(fitted[("portep", "ring", "LL")]) == []
    assert "3 points < 4" in fit_problems(fitted[("portep", "ring", "HT")])
    (entry,) = analysis.model_summary(fitted, 2e-4, 1.1, 4, 8, 7168, True, c_tok_problems=["too noisy"])
    assert not entry["crossover"]["result"]
    assert "HT fit: 3 points < 4" in entry["crossover"]["problems"]
    assert not entry["overlap_LL"]["result"] and entry["overlap_LL"]["problems"] == ["c_tok: too noisy"]
    assert "HT fit: 3 points < 4" in entry["overlap_HT"]["problems"]
    record = analysis.fit_record(("portep", "ring", "HT"), fitted[("portep", "ring", "HT")])
    assert record["result"] is False and "3 points < 4" in record["problems"]
    assert analysis.fit_record(("portep", "ring", "LL"), fitted[("portep", "ring", "LL")])["result"] is True


# --- c_tok: robust measurement and plausibility -----------------------------------------------------------------


def test_c_tok_check_accepts_a_plausible_measurement() -> None:
    # 128 tokens of a 7168 -> 2048 -> 7168 expert at ~100 us per token: ~590 GFLOP/s on 2 threads.
    samples = [0.0128, 0.0131, 0.0127, 0.0130, 0.0129]
    assert machine.check_expert_cost(samples, 128, 7168, 2048, threads=2) == []


def test_c_tok_check_flags_a_rate_no_machine_has() -> None:
    # The 172,034 us per routed token seen once: 0.34 GFLOP/s.
    samples = [0.172034 * 128] * 5
    problems = machine.check_expert_cost(samples, 128, 7168, 2048, threads=2)
    assert problems == ["implies 0.341 GFLOP/s < 1 GFLOP/s"]
    # And one too fast for the threads used (1 ns per token is 58,720 TFLOP/s).
    fast = machine.check_expert_cost([128e-9] * 5, 128, 7168, 2048, threads=1)
    assert len(fast) == 1 and fast[0].startswith("implies") and "of 1 thread(s)" in fast[0]


def test_c_tok_check_flags_disagreeing_and_too_few_repeats() -> None:
    problems = machine.check_expert_cost([0.0128, 0.0130, 0.0400], 128, 7168, 2048, threads=2)
    assert len(problems) == 1 and problems[0].startswith("repeats disagree by 3.1x > 2x")
    assert machine.check_expert_cost([0.0128, 0.0129], 128, 7168, 2048, threads=2) == ["2 repeats < 3"]
    assert machine.check_expert_cost([], 128, 7168, 2048, threads=2) == ["no positive timing"]


def _fake_timer(durations: Sequence[float], threads_seen: list[int]) -> Callable[[], float]:
    """A clock that advances by the next of ``durations`` on each stop (every second call)."""
    state = {"now": 0.0, "calls": 0}
    queue = iter(durations)

    def timer() -> float:
        if state["calls"] % 2:
            state["now"] += next(queue)
        else:
            threads_seen.append(torch.get_num_threads())
        state["calls"] += 1
        return state["now"]

    return timer


# hidden 64, ffn 128, 4 tokens: 131,072 FLOPs per call; 20 us per call is 6.6 GFLOP/s, plausible.
SMALL = {"hidden": 64, "ffn": 128, "tokens": 4}


def test_c_tok_is_the_median_with_explicit_threads() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    durations = [20e-6, 21e-6, 19e-6, 35e-6, 20.5e-6]  # one slow repeat: the median ignores it
    m = machine.expert_cost_per_token(**SMALL, repeats=5, warmup=2, threads=1, timer=_fake_timer(durations, seen))
    assert m.value == pytest.approx(20.5e-6 / 4)
    assert m.plausible and m.problems == []
    assert seen == [1] * 5 and torch.get_num_threads() == before
    assert m.params["threads"] == 1 and m.params["statistic"] == "median" and m.params["attempts"] == 1
    assert m.params["spread"] == pytest.approx(35 / 19)


def test_c_tok_remeasures_once_then_reports_the_problem() -> None:
    noisy, steady = [20e-6, 20e-6, 90e-6], [22e-6, 21e-6, 22e-6]
    m = machine.expert_cost_per_token(**SMALL, repeats=3, threads=1, timer=_fake_timer(noisy + steady, []))
    assert m.plausible and m.params["attempts"] == 2 and m.value == pytest.approx(22e-6 / 4)

    m = machine.expert_cost_per_token(**SMALL, repeats=3, threads=1, timer=_fake_timer(noisy + noisy, []))
    assert not m.plausible and m.params["attempts"] == 2
    assert m.problems[0].startswith("repeats disagree by 4.5x > 2x")

    slow = [0.5] * 3  # 0.26 MFLOP/s
    m = machine.expert_cost_per_token(**SMALL, repeats=3, threads=1, attempts=1, timer=_fake_timer(slow, []))
    assert m.problems == ["implies 0.000262 GFLOP/s < 1 GFLOP/s"]


def test_c_tok_real_measurement_runs() -> None:
    m = machine.expert_cost_per_token(64, 128, tokens=8, repeats=3, warmup=1, threads=1)
    assert m.value > 0 and len(m.samples_s) == 3 and m.params["threads"] == 1


# --- Report text ---------------------------------------------------------------------------------------------------


def _c_tok_info(value_s: float, problems: list[str]) -> dict:
    params = {"hidden": 7168, "ffn": 2048, "dtype": "bfloat16", "tokens": 128, "threads": 2, "warmup": 2,
              "spread": 1.1, "flops_per_s": 4 * 7168 * 2048 / value_s}
    return {"value": value_s, "samples_s": [value_s * 128] * 7, "params": params, "problems": problems,
            "source": "measured"}


def test_report_flags_fits_and_derived_figures() -> None:
    fitted = {("portep", "ring", "LL"): LinkFit(300e-6, 0.2e9, r2=0.99, samples=5),
              ("portep", "ring", "HT"): LinkFit(900e-6, 0.4e9, r2=0.71, samples=5),
              ("baseline", "all_to_all_single", "a2a"): LinkFit(0.0, 0.5e9, r2=0.95, samples=3, constraint="L = 0")}
    table = "\n".join(report.fits_table(fitted))
    assert "not a result: R^2 0.71 < 0.9" in table
    assert "not a result: 3 points < 4 (bound L = 0)" in table
    ll_row = next(ln for ln in report.fits_table(fitted) if " LL " in ln)
    assert ll_row.rstrip().endswith("ok")

    c_problems = machine.check_expert_cost([0.172034 * 128] * 5, 128, 7168, 2048, threads=2)
    summary = analysis.model_summary(fitted, 0.172034, 1.1, 4, 8, 7168, True, c_problems)
    lines = report.model_lines(summary, _c_tok_info(0.172034, c_problems), 1.1, 4, 8)
    text = "\n".join(lines)
    assert "c_tok = 172,034.0 us per routed token [not a result: implies 0.341 GFLOP/s < 1 GFLOP/s]" in text
    cross = next(ln for ln in lines if "crossover" in ln)
    assert "[not a result: HT fit: R^2 0.71 < 0.9]" in cross
    overlap_ll = next(ln for ln in lines if "overlap with LL" in ln)
    assert "< 1 token" in overlap_ll and "c_tok: implies 0.341 GFLOP/s" in overlap_ll
    assert "not a result" in next(ln for ln in lines if "overlap with HT" in ln)

    md = report.markdown_summary([], fitted, lines)
    assert "| not a result: R^2 0.71 < 0.9 |" in md
    assert "* portep ring: LL/HT crossover" in md and "[not a result: HT fit: R^2 0.71 < 0.9]" in md


def test_report_prints_results_plainly() -> None:
    fitted = {("portep", "ring", "LL"): LinkFit(3000e-6, 0.2e9, r2=0.99, samples=5),
              ("portep", "ring", "HT"): LinkFit(9000e-6, 0.4e9, r2=0.98, samples=5)}
    summary = analysis.model_summary(fitted, 2e-4, 1.1, 4, 8, 7168, True)
    lines = report.model_lines(summary, _c_tok_info(2e-4, []), 1.1, 4, 8)
    assert not any("not a result" in ln for ln in [*lines, *report.fits_table(fitted)])
    assert "median of 7 repeats of 128 tokens after 2 warm-up, 2 thread(s)" in lines[0]


def test_portep_model_flags_batch_below_one_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["model", "--c-tok-us", "5000"]) == 0
    out = capsys.readouterr().out
    assert "[not a result: B = 0.087 < 1 token]" in out
    assert "(< 1 token: not a result)" in out
