"""Single-producer / single-consumer descriptor ring in shared memory.

Layout of the segment: ``head`` (written only by the producer) and ``tail`` (written only by the
consumer) are 64-bit counters on separate cache lines, then ``capacity`` 32-byte slots. Slot
``i % capacity`` holds descriptor ``i``. The producer writes the slots before it publishes a new
``head``; the consumer copies them out before it publishes a new ``tail`` — so no descriptor is
lost, overwritten before it is read, or read twice. A full ring makes the producer wait (with
back-off) up to its deadline, then fail naming the ring.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from portep.errors import CommTimeoutError

from .descriptor import DESCRIPTOR_BYTES, DESCRIPTOR_DTYPE

CACHE_LINE = 64
HEAD_OFFSET = 0
TAIL_OFFSET = CACHE_LINE
CAPACITY_OFFSET = 2 * CACHE_LINE
SLOTS_OFFSET = 3 * CACHE_LINE
SEGMENT_PREFIX = "portep-ring"

_names = itertools.count()


def backoff(attempt: int) -> None:
    """Spin for the first few polls, then sleep up to 1 ms: a waiting side must not starve others."""
    if attempt < 64:
        return
    time.sleep(min(1e-3, 1e-6 * 2 ** min(attempt - 64, 10)))


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Open a segment without registering it with the resource tracker: only the owner removes it
    (the tracker, shared with spawned children, would otherwise unlink it when an attacher exits)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def unlink_untracked(segment: shared_memory.SharedMemory) -> None:
    """Remove a segment this process attached without tracking (e.g. a dead rank's), without
    involving a resource tracker."""
    import _posixshmem

    try:
        _posixshmem.shm_unlink("/" + segment.name.lstrip("/"))
    except FileNotFoundError:
        pass


class DescriptorRing:
    """One SPSC ring. Create it with :meth:`create` (owner) or :meth:`attach` (other side)."""

    def __init__(self, segment: shared_memory.SharedMemory, owner: bool) -> None:
        self.segment, self.owner = segment, owner
        buf = segment.buf
        self._head = np.ndarray((1,), dtype=np.uint64, buffer=buf, offset=HEAD_OFFSET)
        self._tail = np.ndarray((1,), dtype=np.uint64, buffer=buf, offset=TAIL_OFFSET)
        self.capacity = int(np.ndarray((1,), dtype=np.uint64, buffer=buf, offset=CAPACITY_OFFSET)[0])
        self._slots = np.ndarray((self.capacity,), dtype=DESCRIPTOR_DTYPE, buffer=buf, offset=SLOTS_OFFSET)

    @property
    def name(self) -> str:
        return self.segment.name

    @staticmethod
    def segment_bytes(capacity: int) -> int:
        return SLOTS_OFFSET + capacity * DESCRIPTOR_BYTES

    @classmethod
    def create(cls, capacity: int, name: str | None = None) -> DescriptorRing:
        """A new zeroed ring of ``capacity`` (a power of two) descriptors."""
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two, got {capacity}")
        name = name or f"{SEGMENT_PREFIX}-{os.getpid()}-{next(_names)}"
        segment = shared_memory.SharedMemory(name=name, create=True, size=cls.segment_bytes(capacity))
        segment.buf[: SLOTS_OFFSET] = bytes(SLOTS_OFFSET)
        np.ndarray((1,), dtype=np.uint64, buffer=segment.buf, offset=CAPACITY_OFFSET)[0] = capacity
        return cls(segment, owner=True)

    @classmethod
    def attach(cls, name: str) -> DescriptorRing:
        """Open an existing ring by segment name."""
        return cls(_attach_untracked(name), owner=False)

    # ---------------------------------------------------------------- producer side
    def push(self, records: np.ndarray, timeout_s: float, op: str = "ring push") -> None:
        """Append ``records`` (:data:`DESCRIPTOR_DTYPE`), waiting for room up to ``timeout_s``."""
        records = np.atleast_1d(records)
        if records.dtype != DESCRIPTOR_DTYPE:
            raise TypeError(f"{op}: records must have the descriptor dtype, got {records.dtype}")
        deadline = time.monotonic() + timeout_s
        head, done, attempt = int(self._head[0]), 0, 0
        while done < records.size:
            room = self.capacity - (head - int(self._tail[0]))
            if room == 0:
                if time.monotonic() > deadline:
                    raise CommTimeoutError(op, timeout_s, detail=(
                        f"ring {self.name} full ({self.capacity} descriptors), consumer stopped at "
                        f"{int(self._tail[0])}; {records.size - done} descriptor(s) not queued"))
                backoff(attempt)
                attempt += 1
                continue
            attempt = 0
            count = min(room, records.size - done)
            start = head % self.capacity
            first = min(count, self.capacity - start)  # up to the end of the slots, then wrap
            self._slots[start : start + first] = records[done : done + first]
            self._slots[: count - first] = records[done + first : done + count]
            head += count
            done += count
            self._head[0] = head  # publish after the slots are written

    # ---------------------------------------------------------------- consumer side
    def pending(self) -> int:
        return int(self._head[0]) - int(self._tail[0])

    def pop(self, max_records: int | None = None) -> np.ndarray:
        """Take up to ``max_records`` published descriptors (possibly none), in order."""
        tail = int(self._tail[0])
        count = int(self._head[0]) - tail
        if max_records is not None:
            count = min(count, max_records)
        start = tail % self.capacity
        first = min(count, self.capacity - start)
        out = np.concatenate([self._slots[start : start + first], self._slots[: count - first]])
        self._tail[0] = tail + count  # release the slots after copying them out
        return out

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Detach; the owner also removes the segment."""
        self._head = self._tail = self._slots = None
        self.segment.close()
        if self.owner:
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> DescriptorRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
