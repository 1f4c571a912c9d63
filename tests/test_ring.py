"""The compiled SPSC descriptor ring: order kept, nothing lost or duplicated, a full ring takes only
what fits, and a producer in another process works."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portep.native.engine import EngineError, Ring, segment_name
from portep.proxy.descriptor import DESCRIPTOR_DTYPE
from tests.conftest import SHM_DIR


def numbered(start: int, count: int) -> np.ndarray:
    """Descriptors whose src_offset is their sequence number."""
    records = np.zeros(count, dtype=DESCRIPTOR_DTYPE)
    records["version"], records["opcode"] = 1, 1
    records["src_offset"] = np.arange(start, start + count)
    records["length"] = np.arange(start, start + count) % 4096
    return records


def push_all(ring: Ring, records: np.ndarray, timeout_s: float) -> None:
    deadline, done = time.monotonic() + timeout_s, 0
    while done < records.size:
        assert time.monotonic() < deadline, f"producer pushed {done} of {records.size}"
        pushed = ring.push(records[done:])
        done += pushed
        if not pushed:
            time.sleep(0)


def consume(ring: Ring, total: int, max_batch: int, timeout_s: float, pause_every: int = 0) -> np.ndarray:
    got, batches, deadline, received = [], 0, time.monotonic() + timeout_s, 0
    while received < total:
        assert time.monotonic() < deadline, f"consumer got {received} of {total} descriptors"
        batch = ring.pop(max_batch)
        if batch.size:
            got.append(batch["src_offset"].copy())
            received += batch.size
            batches += 1
            if pause_every and batches % pause_every == 0:
                time.sleep(0.002)  # a slow consumer: the producer must wait, not overwrite
        else:
            time.sleep(0)
    return np.concatenate(got) if got else np.zeros(0, dtype=np.uint64)


@settings(max_examples=25, deadline=None)
@given(capacity_log2=st.integers(0, 5), pushes=st.lists(st.integers(1, 70), min_size=1, max_size=25),
       max_batch=st.integers(1, 40))
def test_concurrent_producer_and_consumer_keep_every_descriptor_once(capacity_log2: int, pushes: list[int],
                                                                      max_batch: int) -> None:
    with Ring.create(2**capacity_log2) as ring:
        total = sum(pushes)

        def produce() -> None:
            start = 0
            for count in pushes:
                push_all(ring, numbered(start, count), 20)
                start += count

        producer = threading.Thread(target=produce)
        producer.start()
        got = consume(ring, total, max_batch, 20, pause_every=7)
        producer.join(20)
        assert not producer.is_alive()
        np.testing.assert_array_equal(got, np.arange(total))
        assert ring.pending() == 0


def test_full_ring_takes_only_what_fits() -> None:
    with Ring.create(8) as ring:
        assert ring.push(numbered(0, 5)) == 5
        assert ring.push(numbered(5, 5)) == 3, "a full ring must not overwrite unread descriptors"
        assert ring.pending() == 8
        np.testing.assert_array_equal(ring.pop(100)["src_offset"], np.arange(8))
        assert ring.push(numbered(8, 2)) == 2
        np.testing.assert_array_equal(ring.pop(1)["src_offset"], [8])


def test_capacity_must_be_a_power_of_two() -> None:
    name = segment_name("ring")
    with pytest.raises(EngineError, match="power of two"):
        Ring.create(12, name=name)
    assert not Path(SHM_DIR, name).exists(), "a refused ring left its shared-memory segment"


def _produce_in_child(name: str, count: int) -> None:
    ring = Ring.attach(name)
    push_all(ring, numbered(0, count), 30)
    ring.close()


@pytest.mark.timeout(60)
def test_producer_in_another_process() -> None:
    with Ring.create(64) as ring:
        child = mp.get_context("spawn").Process(target=_produce_in_child, args=(ring.name, 20_000))
        child.start()
        got = consume(ring, 20_000, 17, 40)
        child.join(10)
        assert child.exitcode == 0
        np.testing.assert_array_equal(got, np.arange(20_000))


def test_compiled_consumer_counts_and_times() -> None:
    with Ring.create(1024) as ring:
        push_all(ring, numbered(0, 1000), 5)
        taken, seconds = ring.consume(1000, 5)
        assert taken == 1000 and seconds >= 0
        assert ring.consume(1, 0.05)[0] == 0, "an empty ring gives nothing before the deadline"
