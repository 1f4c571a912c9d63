"""Puts with signals over the loopback fabric with reordering, delays and drops: a signal is never
visible before the bytes it guards; with drops, a missing signal, never a wrong result."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portep.backends.loopback import Faults, LoopbackFabric
from portep.proxy.signals import SignalTable

RANKS, REGION = 3, 16384
puts_strategy = st.lists(st.tuples(st.integers(0, RANKS - 1), st.integers(0, RANKS - 1), st.integers(1, 1500)),
                         min_size=1, max_size=12)


def run(puts: list[tuple[int, int, int]], faults: Faults) -> tuple[int, int]:
    """Send every put as a put-with-signal on its own slot, deliver one message at a time, and check
    after each delivery that every applied signal guards correct bytes. Returns (applied, total)."""
    fabric = LoopbackFabric(faults)
    rng = np.random.default_rng(faults.seed)
    ends = [fabric.endpoint(r, chunk_bytes=256) for r in range(RANKS)]
    for end in ends:
        end.register(rng.integers(0, 256, REGION, dtype=np.uint8), num_signal_slots=len(puts))
        for peer in ends:
            end.connect(peer.rank, peer.address())
    next_offset = [0] * RANKS
    expected = []
    for slot, (src, dst, length) in enumerate(puts):
        src_offset = int(rng.integers(0, REGION - length))
        dst_offset = next_offset[dst]
        next_offset[dst] += length
        ends[src].put_with_signal(dst, src_offset, dst_offset, length, slot, value=1)
        expected.append((dst, slot, dst_offset, ends[src].region[src_offset : src_offset + length].copy()))

    order = random.Random(faults.seed)
    for _ in range(100_000):
        if fabric.in_flight() == 0:
            break
        ends[order.randrange(RANKS)].poll(max_messages=1)
        for dst, slot, offset, data in expected:
            if ends[dst].signals.values[slot]:
                assert ends[dst].signals.values[slot] == 1, "a signal was applied twice"
                np.testing.assert_array_equal(ends[dst].region[offset : offset + data.size], data,
                                              err_msg=f"signal {slot} visible before its bytes landed")
    assert fabric.in_flight() == 0
    applied = sum(int(ends[dst].signals.values[slot]) for dst, slot, _, _ in expected)
    return applied, len(puts)


@settings(max_examples=30, deadline=None)
@given(puts=puts_strategy, seed=st.integers(0, 2**16), delay=st.integers(0, 6))
def test_reordered_and_delayed_delivery_gives_exact_results(puts: list, seed: int, delay: int) -> None:
    applied, total = run(puts, Faults(reorder=True, max_delay_polls=delay, seed=seed))
    assert applied == total


@settings(max_examples=20, deadline=None)
@given(puts=puts_strategy, seed=st.integers(0, 2**16))
def test_drops_lose_signals_never_correctness(puts: list, seed: int) -> None:
    faults = Faults(reorder=True, max_delay_polls=2, drop_rate=0.25, seed=seed)
    applied, total = run(puts, faults)
    assert applied <= total


def test_drop_is_reported_as_missing_bytes() -> None:
    table = SignalTable(2)
    table.on_signal(source=1, slot=0, value=5, cumulative_bytes=300)
    table.on_data(source=1, slot=0, nbytes=200)
    assert table.values[0] == 0 and table.missing_bytes() == {(1, 0): 100}
    table.on_data(source=1, slot=0, nbytes=100)
    assert table.values[0] == 5 and table.pending_signals() == 0


def test_signals_guard_cumulative_bytes_per_source() -> None:
    table = SignalTable(1)
    table.on_signal(source=0, slot=0, value=1, cumulative_bytes=20)  # second put's signal first
    table.on_signal(source=0, slot=0, value=1, cumulative_bytes=10)
    table.on_data(source=2, slot=0, nbytes=20)  # another source's bytes do not count
    assert table.values[0] == 0
    table.on_data(source=0, slot=0, nbytes=10)
    assert table.values[0] == 1
    table.on_data(source=0, slot=0, nbytes=10)
    assert table.values[0] == 2


def test_put_outside_region_is_rejected() -> None:
    fabric = LoopbackFabric()
    end = fabric.endpoint(0)
    end.register(np.zeros(64, dtype=np.uint8), num_signal_slots=1)
    end.connect(0, end.address())
    with pytest.raises(ValueError, match="outside"):
        end.put(0, 60, 0, 10)
