"""Hypothesis fuzzing of every public call on two ranks: always a clear error before any
communication, and the Buffers keep giving correct results afterwards."""

from __future__ import annotations

import pytest

from tests import tasks_fuzz
from tests.rankpool import RankPool


@pytest.mark.timeout(300)
def test_broken_calls_are_rejected_and_buffers_keep_working(pool2: RankPool) -> None:
    counts = pool2.run(tasks_fuzz.fuzz_public_calls, timeout=240, examples=300)
    # hypothesis stops early once it has tried every distinct broken call it can build
    assert counts[0] == counts[1] >= 50, counts
