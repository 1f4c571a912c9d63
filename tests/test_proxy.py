"""The compiled proxy thread: it drains rings into a transport, coalesces contiguous puts, applies a
signal only with its bytes, serves several Buffers' endpoints at once, and a broken link to one peer
fails that peer only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from portep.native.engine import Proxy, Ring, Window
from portep.proxy.descriptor import Descriptor, Op

DATA = 1 << 16


def records(*descs: Descriptor) -> np.ndarray:
    return np.concatenate([d.to_record() for d in descs])


def wait_for(condition, timeout_s: float = 5.0, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class Node:
    """One endpoint of a shared proxy: a window and a ring, peers = the given windows by rank."""

    def __init__(self, proxy: Proxy, windows: list[Window], ring: Ring, window: Window) -> None:
        self.proxy, self.ring, self.window = proxy, ring, window
        self.endpoint, _ = proxy.add_endpoint(ring, window, len(windows))
        peer = proxy.connect(proxy.address())
        for rank, target in enumerate(windows):
            _, key = target.name, target.name.encode()
            proxy.set_rank(self.endpoint, rank, peer, key)

    def push(self, recs: np.ndarray) -> None:
        assert self.ring.push(recs) == recs.size
        self.proxy.wake()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy("shm")
    yield p
    p.destroy()


@contextmanager
def nodes(proxy: Proxy, num_windows: int, num_nodes: int) -> Iterator[tuple[list[Window], list[Node]]]:
    """``num_windows`` windows (ranks) and endpoints for the first ``num_nodes`` of them; everything
    is removed and unmapped on exit, the endpoints first (the proxy thread reads their rings)."""
    windows = [Window.create(8, DATA) for _ in range(num_windows)]
    rings = [Ring.create(4096) for _ in range(num_nodes)]
    made: list[Node] = []
    try:
        made.extend(Node(proxy, windows, ring, windows[i]) for i, ring in enumerate(rings))
        yield windows, made
    finally:
        for node in made:
            proxy.remove_endpoint(node.endpoint, 2.0)
        for item in [*rings, *windows]:
            item.close()


def test_puts_and_signals_land_and_coalesce(proxy: Proxy) -> None:
    with nodes(proxy, 2, 1) as (windows, (node,)):
        src = windows[0]
        src.data[:4096] = np.arange(4096) % 251
        node.push(records(
            Descriptor(Op.PUT, 1, src_offset=0, dst_offset=1000, length=100),
            Descriptor(Op.PUT, 1, src_offset=100, dst_offset=1100, length=100),
            Descriptor(Op.PUT_SIGNAL, 1, src_offset=200, dst_offset=1200, length=50, signal_slot=3, signal_value=2),
            Descriptor(Op.SIGNAL, 1, signal_slot=5, signal_value=7),
            Descriptor(Op.PUT, 1, src_offset=300, dst_offset=3000, length=10),
        ))
        wait_for(lambda: windows[1].signals[5] == 7 and windows[1].data[3009] == src.data[309], what="delivery")
        assert windows[1].signals[3] == 2
        np.testing.assert_array_equal(windows[1].data[1000:1250], src.data[:250])
        stats = proxy.stats()
        assert stats["descriptors"] == 5 and stats["coalesced"] == 2, stats
        assert stats["transport_bytes"] == 260 and stats["transport_signals"] == 2, stats


def test_a_signal_is_never_seen_before_its_bytes(proxy: Proxy) -> None:
    with nodes(proxy, 2, 1) as (windows, (node,)):
        rng = np.random.default_rng(3)
        for round_ in range(1, 200):
            size = int(rng.integers(1, 4096))
            windows[0].data[:size] = round_ % 256
            node.push(Descriptor(Op.PUT_SIGNAL, 1, 0, 8192, size, signal_slot=1, signal_value=1).to_record())
            wait_for(lambda r=round_: windows[1].signals[1] >= r, what=f"round {round_}")
            assert (windows[1].data[8192 : 8192 + size] == round_ % 256).all(), f"round {round_}: stale bytes"


def test_one_proxy_serves_several_endpoints_and_a_broken_link_fails_its_rank_alone(proxy: Proxy) -> None:
    with nodes(proxy, 3, 2) as (windows, (a, b)):
        proxy.break_rank(a.endpoint, 2)
        a.push(Descriptor(Op.SIGNAL, 2, signal_slot=0, signal_value=1).to_record())
        wait_for(lambda: proxy.rank_failure(a.endpoint, 2) is not None, what="rank 2 marked failed")
        assert "rank 2" in proxy.rank_failure(a.endpoint, 2)
        assert proxy.rank_failure(a.endpoint, 1) is None and proxy.failure() is None
        # The other endpoint, and the other peers of the same endpoint, are still served.
        b.push(Descriptor(Op.SIGNAL, 0, signal_slot=1, signal_value=4).to_record())
        a.push(Descriptor(Op.SIGNAL, 1, signal_slot=2, signal_value=3).to_record())
        wait_for(lambda: windows[0].signals[1] == 4 and windows[1].signals[2] == 3, what="other peers")
        assert windows[2].signals[0] == 0


def test_removing_an_endpoint_posts_what_its_ring_holds(proxy: Proxy) -> None:
    with nodes(proxy, 2, 1) as (windows, (node,)):
        node.ring.push(np.concatenate([Descriptor(Op.SIGNAL, 1, signal_slot=0, signal_value=1).to_record()] * 3000))
        assert proxy.remove_endpoint(node.endpoint, 5.0)  # no wake-up: removal itself drains
        assert windows[1].signals[0] == 3000
