"""The proxy: drains descriptor rings and drives a transport.

One proxy serves one NIC. Its loop body reads as its steps: take descriptors from the rings,
coalesce contiguous puts to the same peer, post them to the transport, make transport progress
(which applies arriving data and signals), and back off when there was nothing to do so that a
proxy never starves the ranks it shares cores with.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from portep.backends.transport import Transport

from .descriptor import DESCRIPTOR_DTYPE, DESCRIPTOR_VERSION, Op
from .ring import DescriptorRing, backoff


@dataclass
class ProxyStats:
    """Live counters of one proxy (reported by ``portep status``)."""

    descriptors: int = 0
    puts_posted: int = 0
    bytes_posted: int = 0
    signals_posted: int = 0
    coalesced: int = 0
    max_queue_depth: int = 0
    idle_polls: int = 0
    per_peer_bytes: dict[int, int] = field(default_factory=dict)


def coalesce(batch: np.ndarray) -> list[tuple[int, int, int, int, int, int, int]]:
    """Merge runs of PUT descriptors to one peer whose source and destination are both contiguous.

    Returns ``(opcode, dst_rank, src_offset, dst_offset, length, signal_slot, signal_value)`` tuples
    in ring order. A PUT_SIGNAL absorbs the contiguous PUTs before it (its signal then guards them
    all, which is what the producer asked: they were written before the signal).
    """
    out: list[list[int]] = []
    columns = (batch[name].tolist() for name in
               ("opcode", "dst_rank", "src_offset", "dst_offset", "length", "signal_slot", "signal_value"))
    for op, peer, src, dst, length, slot, value in zip(*columns, strict=True):
        if out and op in (Op.PUT, Op.PUT_SIGNAL):
            last = out[-1]
            if last[0] == Op.PUT and last[1] == peer and last[2] + last[4] == src and last[3] + last[4] == dst:
                last[0], last[4], last[5], last[6] = op, last[4] + length, slot, value
                continue
        out.append([op, peer, src, dst, length, slot, value])
    return [tuple(item) for item in out]


class Proxy:
    """Consumes ``rings`` and posts their descriptors to ``transport``."""

    def __init__(self, rings: list[DescriptorRing], transport: Transport, max_batch: int = 256) -> None:
        self.rings, self.transport, self.max_batch = rings, transport, max_batch
        self.stats = ProxyStats()
        self._stop = threading.Event()

    # ---------------------------------------------------------------- the loop's steps
    def poll_rings(self) -> np.ndarray:
        batches = []
        for ring in self.rings:
            depth = ring.pending()
            self.stats.max_queue_depth = max(self.stats.max_queue_depth, depth)
            if depth:
                batches.append(ring.pop(self.max_batch))
        return np.concatenate(batches) if batches else np.zeros(0, dtype=DESCRIPTOR_DTYPE)

    def post(self, commands: list[tuple[int, ...]]) -> None:
        for op, peer, src, dst, length, slot, value in commands:
            if op == Op.PUT:
                self.transport.put(peer, src, dst, length)
            elif op == Op.PUT_SIGNAL:
                self.transport.put_with_signal(peer, src, dst, length, slot, value)
                self.stats.signals_posted += 1
            elif op == Op.SIGNAL:
                self.transport.put_with_signal(peer, src, dst, 0, slot, value)
                self.stats.signals_posted += 1
                continue
            else:  # FENCE / BARRIER need the control plane's ordering; none is reachable here
                raise ValueError(f"proxy: descriptor opcode {Op(op).name} is not supported by this proxy")
            self.stats.puts_posted += 1
            self.stats.bytes_posted += length
            self.stats.per_peer_bytes[peer] = self.stats.per_peer_bytes.get(peer, 0) + length

    def step(self) -> int:
        """One pass of the loop; returns descriptors taken plus transport messages applied (0: idle)."""
        batch = self.poll_rings()
        if batch.size:
            if (batch["version"] != DESCRIPTOR_VERSION).any():
                raise ValueError(f"proxy: descriptor version {int(batch['version'].max())} in a ring, expected "
                                 f"{DESCRIPTOR_VERSION}")
            commands = coalesce(batch)
            self.stats.descriptors += batch.size
            self.stats.coalesced += batch.size - len(commands)
            self.post(commands)
        return batch.size + self.transport.poll()

    # ---------------------------------------------------------------- running
    def run(self, stop_after_s: float | None = None) -> None:
        """Loop until :meth:`stop` (or ``stop_after_s``), backing off while idle."""
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        idle = 0
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if self.step():
                idle = 0
            else:
                self.stats.idle_polls += 1
                backoff(idle)
                idle += 1

    def stop(self) -> None:
        self._stop.set()
