"""The SPSC descriptor ring: order kept, nothing lost or duplicated, backpressure with a deadline."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portep.errors import CommTimeoutError
from portep.proxy.descriptor import DESCRIPTOR_DTYPE
from portep.proxy.ring import DescriptorRing


def numbered(start: int, count: int) -> np.ndarray:
    """Descriptors whose src_offset is their sequence number."""
    records = np.zeros(count, dtype=DESCRIPTOR_DTYPE)
    records["version"], records["opcode"] = 1, 1
    records["src_offset"] = np.arange(start, start + count)
    records["length"] = np.arange(start, start + count) % 4096
    return records


def consume(ring: DescriptorRing, total: int, max_batch: int, timeout_s: float, pause_every: int = 0) -> np.ndarray:
    got, batches, deadline = [], 0, time.monotonic() + timeout_s
    received = 0
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
    with DescriptorRing.create(2**capacity_log2) as ring:
        total = sum(pushes)
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                start = 0
                for count in pushes:
                    ring.push(numbered(start, count), timeout_s=20)
                    start += count
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        producer = threading.Thread(target=produce)
        producer.start()
        got = consume(ring, total, max_batch, timeout_s=30)
        producer.join(timeout=30)
        assert not errors, errors
        np.testing.assert_array_equal(got, np.arange(total))
        assert ring.pending() == 0


def _produce_in_process(name: str, total: int, chunk: int) -> None:
    ring = DescriptorRing.attach(name)
    start = 0
    while start < total:
        count = min(chunk, total - start)
        ring.push(numbered(start, count), timeout_s=30)
        start += count
    ring.close()


@pytest.mark.timeout(120)
def test_producer_in_another_process_wraps_many_times() -> None:
    total, capacity = 20_000, 64
    with DescriptorRing.create(capacity) as ring:
        proc = mp.get_context("spawn").Process(target=_produce_in_process, args=(ring.name, total, 37))
        proc.start()
        try:
            got = consume(ring, total, max_batch=50, timeout_s=90, pause_every=50)
        finally:
            proc.join(timeout=30)
        assert proc.exitcode == 0
        np.testing.assert_array_equal(got, np.arange(total))  # wrapped total/capacity ≈ 312 times
        name = ring.name
    assert not os.path.exists(f"/dev/shm/{name}"), "the owner must remove the segment"


def test_full_ring_times_out_naming_it_and_loses_nothing() -> None:
    with DescriptorRing.create(8) as ring:
        started = time.monotonic()
        with pytest.raises(CommTimeoutError, match=rf"{ring.name} full .* 4 descriptor\(s\) not queued"):
            ring.push(numbered(0, 12), timeout_s=0.2)
        assert time.monotonic() - started < 2
        np.testing.assert_array_equal(ring.pop()["src_offset"], np.arange(8))
        ring.push(numbered(8, 4), timeout_s=1)  # the caller can retry what was not queued
        np.testing.assert_array_equal(ring.pop()["src_offset"], np.arange(8, 12))


def test_attached_side_does_not_remove_the_segment() -> None:
    with DescriptorRing.create(4) as ring:
        other = DescriptorRing.attach(ring.name)
        other.push(numbered(0, 3), timeout_s=1)
        other.close()
        assert os.path.exists(f"/dev/shm/{ring.name}")
        np.testing.assert_array_equal(ring.pop()["src_offset"], np.arange(3))


def test_rejects_bad_capacity_and_records() -> None:
    with pytest.raises(ValueError, match="power of two"):
        DescriptorRing.create(6)
    with DescriptorRing.create(4) as ring, pytest.raises(TypeError, match="descriptor dtype"):
        ring.push(np.zeros(2, dtype=np.int64), timeout_s=1)
