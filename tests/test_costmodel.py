"""The cost model: fit, crossover, minimum batch for overlap, and ``portep model``."""

from __future__ import annotations

import math
import random

import pytest

from portep import cli
from portep.costmodel import (
    LinkFit,
    compute_time,
    crossover,
    fit_round_trip,
    min_overlap_batch,
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
