"""The proxy drains rings into a transport: coalescing, order-independent signals, stats."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest

from portep.backends.loopback import Faults, LoopbackFabric
from portep.proxy.descriptor import DESCRIPTOR_DTYPE, Descriptor, Op
from portep.proxy.loop import Proxy, coalesce
from portep.proxy.ring import DescriptorRing

REGION = 1 << 16


def records(*descs: Descriptor) -> np.ndarray:
    return np.concatenate([d.to_record() for d in descs])


def test_coalesce_merges_contiguous_puts_into_the_signal() -> None:
    batch = records(
        Descriptor(Op.PUT, 1, src_offset=0, dst_offset=100, length=10),
        Descriptor(Op.PUT, 1, src_offset=10, dst_offset=110, length=10),
        Descriptor(Op.PUT_SIGNAL, 1, src_offset=20, dst_offset=120, length=5, signal_slot=3, signal_value=2),
        Descriptor(Op.PUT, 1, src_offset=25, dst_offset=125, length=5),  # after a signal: not merged back
        Descriptor(Op.PUT, 2, src_offset=30, dst_offset=130, length=5),  # other peer
        Descriptor(Op.PUT, 2, src_offset=40, dst_offset=135, length=5),  # source not contiguous
    )
    assert coalesce(batch) == [
        (Op.PUT_SIGNAL, 1, 0, 100, 25, 3, 2),
        (Op.PUT, 1, 25, 125, 5, 0, 0),
        (Op.PUT, 2, 30, 130, 5, 0, 0),
        (Op.PUT, 2, 40, 135, 5, 0, 0),
    ]


def _pair(faults: Faults) -> tuple[LoopbackFabric, list]:
    fabric = LoopbackFabric(faults)
    rng = np.random.default_rng(faults.seed)
    ends = [fabric.endpoint(r, chunk_bytes=512) for r in range(2)]
    for end in ends:
        end.register(rng.integers(0, 256, REGION, dtype=np.uint8), num_signal_slots=8)
        for peer in ends:
            end.connect(peer.rank, peer.address())
    return fabric, ends


def _token_descriptors(num_tokens: int, token_bytes: int) -> np.ndarray:
    """Tokens 0..n-1 of rank 0 to rank 1 (reversed destination order), one signal per 8 tokens."""
    descs = []
    for t in range(num_tokens):
        op = Op.PUT_SIGNAL if t % 8 == 7 else Op.PUT
        descs.append(Descriptor(op, 1, src_offset=t * token_bytes, dst_offset=(num_tokens - 1 - t) * token_bytes,
                                length=token_bytes, signal_slot=0, signal_value=1 if op == Op.PUT_SIGNAL else 0))
    return records(*descs)


def assert_reversed_tokens_landed(fabric: LoopbackFabric, ends: list, num_tokens: int, token_bytes: int) -> None:
    """Deliver what is in flight, then check rank 1 holds rank 0's tokens in reverse order, with
    one signal per 8 tokens (the pattern of :func:`_token_descriptors`)."""
    while fabric.in_flight():
        ends[1].poll()
    assert ends[1].signals.values[0] == num_tokens // 8
    src = ends[0].region[: num_tokens * token_bytes].reshape(num_tokens, token_bytes)
    dst = ends[1].region[: num_tokens * token_bytes].reshape(num_tokens, token_bytes)
    np.testing.assert_array_equal(dst[::-1], src)


@pytest.mark.timeout(60)
def test_proxy_thread_delivers_through_a_reordering_fabric() -> None:
    num_tokens, token_bytes = 64, 700
    fabric, ends = _pair(Faults(reorder=True, max_delay_polls=3, seed=7))
    with DescriptorRing.create(16) as ring:
        sender = Proxy([ring], ends[0])
        with DescriptorRing.create(2) as idle_ring:
            receiver = Proxy([idle_ring], ends[1])
            threads = [threading.Thread(target=p.run, kwargs={"stop_after_s": 30}) for p in (sender, receiver)]
            for thread in threads:
                thread.start()
            try:
                ring.push(_token_descriptors(num_tokens, token_bytes), timeout_s=10)  # 64 through 16 slots
                deadline = time.monotonic() + 20
                while ends[1].signals.values[0] < num_tokens // 8:
                    assert time.monotonic() < deadline, f"signal at {ends[1].signals.values[0]}"
                    time.sleep(0.001)
            finally:
                for p in (sender, receiver):
                    p.stop()
                for thread in threads:
                    thread.join(timeout=10)
    src = ends[0].region[: num_tokens * token_bytes].reshape(num_tokens, token_bytes)
    dst = ends[1].region[: num_tokens * token_bytes].reshape(num_tokens, token_bytes)
    np.testing.assert_array_equal(dst[::-1], src)
    assert sender.stats.descriptors == num_tokens
    assert sender.stats.signals_posted == num_tokens // 8
    assert sender.stats.bytes_posted == num_tokens * token_bytes
    assert fabric.in_flight() == 0


def _push_from_process(name: str, num_tokens: int, token_bytes: int) -> None:
    ring = DescriptorRing.attach(name)
    ring.push(_token_descriptors(num_tokens, token_bytes), timeout_s=30)
    ring.close()


@pytest.mark.timeout(60)
def test_descriptors_from_another_process_reach_the_peer() -> None:
    num_tokens, token_bytes = 256, 64
    fabric, ends = _pair(Faults(reorder=True, seed=3))
    with DescriptorRing.create(32) as ring:
        proc = mp.get_context("spawn").Process(target=_push_from_process, args=(ring.name, num_tokens, token_bytes))
        proc.start()
        proxy = Proxy([ring], ends[0], max_batch=16)
        deadline = time.monotonic() + 30
        while proxy.stats.descriptors < num_tokens:
            assert time.monotonic() < deadline, f"proxy got {proxy.stats.descriptors} descriptors"
            proxy.step()
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert_reversed_tokens_landed(fabric, ends, num_tokens, token_bytes)


def test_unknown_version_in_ring_is_an_error() -> None:
    _, ends = _pair(Faults())
    with DescriptorRing.create(4) as ring:
        bad = np.zeros(1, dtype=DESCRIPTOR_DTYPE)
        bad["version"], bad["opcode"] = 9, 1
        ring.push(bad, timeout_s=1)
        with pytest.raises(ValueError, match="version 9"):
            Proxy([ring], ends[0]).step()
