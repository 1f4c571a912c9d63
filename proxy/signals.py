"""Receive-side signals that are safe on unordered transports.

A put-with-signal to slot ``s`` travels as data messages tagged with ``(source, s)`` and one signal
message carrying the value to add and ``cumulative_bytes``: every byte the source has sent to
that slot so far, this put included. The receiver adds the value only once that many bytes have
landed for ``(source, s)``. Data and signals may arrive in any order (EFA SRD does not keep
order), yet a signal is never visible before the bytes it guards, and each is applied once —
provided a producer has at most one put in flight per ``(source, s)``: bytes are counted, not
named, so a second put's early bytes could otherwise stand in for the first's late ones. The
stream protocol (:mod:`portep.proxy.streams`) keeps one counter per receive slot for that reason.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np


class SignalTable:
    """Signal counters of one rank (int64 `[num_slots]`), fed by data and signal arrivals."""

    def __init__(self, num_slots: int, values: np.ndarray | None = None) -> None:
        """``values``: where the counters live (e.g. int64 words in a shared-memory window the
        rank polls); a private zeroed array when None."""
        if values is not None and (values.dtype != np.int64 or values.shape != (num_slots,)):
            raise TypeError(f"signal values must be int64 [{num_slots}], got {values.dtype} {values.shape}")
        self.values = np.zeros(num_slots, dtype=np.int64) if values is None else values
        self._landed: dict[tuple[int, int], int] = defaultdict(int)
        self._waiting: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
        self._order = 0  # tie-break so the heap never compares values

    def on_data(self, source: int, slot: int, nbytes: int) -> int:
        """Bytes for ``(source, slot)`` have landed; returns how many signals became applicable."""
        self._landed[(source, slot)] += nbytes
        return self._release(source, slot)

    def on_signal(self, source: int, slot: int, value: int, cumulative_bytes: int) -> int:
        """A signal arrived; it is applied now if its bytes are all here, else when they are."""
        self._order += 1
        heapq.heappush(self._waiting[(source, slot)], (cumulative_bytes, self._order, value))
        return self._release(source, slot)

    def _release(self, source: int, slot: int) -> int:
        waiting, landed = self._waiting.get((source, slot)), self._landed[(source, slot)]
        applied = 0
        while waiting and waiting[0][0] <= landed:
            _, _, value = heapq.heappop(waiting)
            self.values[slot] += value
            applied += 1
        return applied

    def pending_signals(self) -> int:
        """Signals received whose bytes have not all landed yet."""
        return sum(len(w) for w in self._waiting.values())

    def missing_bytes(self) -> dict[tuple[int, int], int]:
        """For each ``(source, slot)`` with a waiting signal: bytes still to land before it applies."""
        return {key: waiting[0][0] - self._landed[key] for key, waiting in self._waiting.items() if waiting}
