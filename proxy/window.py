"""A rank's window: the shared-memory segment peers and the rank's proxy write into.

Layout (every offset a multiple of 4 KiB so each area starts on its own cache lines):

* a control block of int64 words: the proxy's state and live stats (written by the proxy) and
  the stop request (written by the rank);
* ``num_signals`` int64 signal counters. Each counter has exactly one writer: a same-node peer
  that stores it directly, or this rank's proxy that applies it when the bytes it guards landed;
* the data area: the receive slots peers write into and the staging slots this rank's proxy
  reads from. Descriptor offsets are relative to the start of the data area.

On a GPU the data area is device memory mapped to peers (NVLink / xGMI IPC); on CPU it is
``/dev/shm``, and same-node peers map each other's windows.
"""

from __future__ import annotations

import itertools
import os
from enum import IntEnum
from multiprocessing import shared_memory

import numpy as np

from .ring import _attach_untracked

PAGE = 4096
CONTROL_WORDS = 64
SEGMENT_PREFIX = "portep-win"

_names = itertools.count()


class Control(IntEnum):
    """Words of the control block."""

    STOP = 0  # rank → proxy: 1 asks the proxy to exit
    STATE = 1  # proxy → rank: see ProxyState
    PID = 2
    STEPS = 3  # loop passes (a heartbeat: it moves while the proxy lives)
    DESCRIPTORS = 4
    PUTS = 5
    BYTES = 6
    SIGNALS = 7
    COALESCED = 8
    MAX_QUEUE_DEPTH = 9
    IDLE_POLLS = 10
    MESSAGES_IN = 11
    STALLS = 12  # times the proxy found a peer's in-flight window full
    SLEEPING = 13  # proxy → rank: 1 while the proxy blocks waiting for a wake-up byte
    WAKEUPS = 14


class ProxyState(IntEnum):
    STARTING = 0
    READY = 1
    STOPPED = 2
    FAILED = 3


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


class Window:
    """One rank's shared-memory window. :meth:`create` it on the rank, :meth:`attach` elsewhere."""

    def __init__(self, segment: shared_memory.SharedMemory, num_signals: int, data_bytes: int, owner: bool) -> None:
        self.segment, self.owner = segment, owner
        self.num_signals, self.data_bytes = num_signals, data_bytes
        buf = segment.buf
        signals_offset = _round_up(CONTROL_WORDS * 8)
        self.data_offset = signals_offset + _round_up(num_signals * 8)
        self.control = np.ndarray((CONTROL_WORDS,), dtype=np.int64, buffer=buf, offset=0)
        self.signals = np.ndarray((num_signals,), dtype=np.int64, buffer=buf, offset=signals_offset)
        self.data = np.ndarray((data_bytes,), dtype=np.uint8, buffer=buf, offset=self.data_offset)

    @property
    def name(self) -> str:
        return self.segment.name

    @staticmethod
    def segment_bytes(num_signals: int, data_bytes: int) -> int:
        return _round_up(CONTROL_WORDS * 8) + _round_up(num_signals * 8) + _round_up(max(data_bytes, 1))

    @classmethod
    def create(cls, num_signals: int, data_bytes: int, tag: str = "") -> Window:
        """A new zeroed window (pages are touched lazily, so a large data area costs nothing until used)."""
        name = f"{SEGMENT_PREFIX}-{os.getpid()}-{tag}{next(_names)}"
        segment = shared_memory.SharedMemory(name=name, create=True, size=cls.segment_bytes(num_signals, data_bytes))
        window = cls(segment, num_signals, data_bytes, owner=True)
        window.control[:] = 0
        window.signals[:] = 0
        return window

    @classmethod
    def attach(cls, name: str, num_signals: int, data_bytes: int) -> Window:
        """Map a peer's window (not registered with the resource tracker: only the owner removes it)."""
        return cls(_attach_untracked(name), num_signals, data_bytes, owner=False)

    def close(self) -> None:
        """Unmap; the owner also removes the segment."""
        self.control = self.signals = self.data = None  # type: ignore[assignment]
        try:
            self.segment.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass
        if self.owner:
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass
