"""Host memory that stays warm: large output and scratch tensors recycled between calls.

A page the process touches for the first time costs far more than a copy into it (the kernel
zeroes it, and on a virtual machine the hypervisor may have to back it first): on the development
VM, 1.3 GB/s against 15+ GB/s for memory already touched. A dispatch or combine that wrote into
freshly allocated tensors every call would pay that on every byte. :class:`HostPool` hands out
CPU tensors carved from blocks it keeps; when the last tensor using a block is gone (the caller
dropped its result, and every view of it), the block goes back to the pool for the next call, as
a GPU caching allocator does. Small tensors and other devices use the plain allocator.

Blocks are anonymous mappings with ordinary 4 KiB pages: outputs such as the LL dispatch's
expert-major `[experts, ranks * T, hidden]` tensor are large and written sparsely, and a huge page
(numpy asks for them on its large arrays) would make each first touch zero 2 MiB.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
import weakref

import numpy as np
import torch

SMALL_BYTES = 256 << 10  # below this, plain torch allocations (cheap, and served warm by malloc)
KEEP_BYTES = 4 << 30  # free blocks kept at most; beyond, the oldest are released


def _size_class(nbytes: int) -> int:
    """Round up to one of 8 sizes per power of two (at most 12.5 % unused)."""
    step = 1 << max(12, int(math.log2(nbytes)) - 3)
    return -(-nbytes // step) * step


class HostPool:
    """Recycled CPU tensors (see the module docstring)."""

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.allocated = self.reused = 0

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised tensor, like ``torch.empty``."""
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if torch.device(device).type != "cpu" or nbytes < SMALL_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        size = _size_class(nbytes)
        with self._lock:
            blocks = self._free.get(size)
            block = blocks.pop() if blocks else None
            if block is not None:
                self._free_bytes -= size
                self.reused += 1
            else:
                self.allocated += 1
        if block is None:
            block = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
        view = block[:nbytes]
        weakref.finalize(view, self._give_back, block)
        return torch.from_numpy(view).view(dtype).view(shape)

    def zeros(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """A zeroed tensor, like ``torch.zeros``."""
        return self.empty(shape, dtype, device).zero_()

    def _give_back(self, block: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault(block.size, []).append(block)
            self._free_bytes += block.size
            while self._free_bytes > self.keep_bytes:
                size = max(self._free, key=lambda s: len(self._free[s]) * s)
                self._free[size].pop(0)
                self._free_bytes -= size
                if not self._free[size]:
                    del self._free[size]


#: The process's pool, shared by every Buffer.
POOL = HostPool()


class ZeroedBytes:
    """A uint8 buffer of zeros (``tensor``) that costs nothing until it is written.

    On the CPU it is a private anonymous mapping: its pages read as zeros and become resident only
    when written, and :meth:`clear` hands them back to the kernel instead of writing zeros over
    them. A Buffer's ``num_nvl_bytes`` / ``num_rdma_bytes`` (DeepEP's size hints ask for a few GB)
    then cost neither start-up time nor memory on the paths that never touch them. Elsewhere it is a
    plain ``torch.zeros``.
    """

    def __init__(self, nbytes: int, device: torch.device | str = "cpu") -> None:
        self._mapping: mmap.mmap | None = None
        if torch.device(device).type == "cpu" and nbytes > 0:
            self._mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.tensor = torch.from_numpy(np.frombuffer(self._mapping, dtype=np.uint8))
        else:
            self.tensor = torch.zeros(nbytes, dtype=torch.uint8, device=device)

    def clear(self) -> None:
        """Make every byte zero again."""
        if self._mapping is not None and sys.platform == "linux":
            self._mapping.madvise(mmap.MADV_DONTNEED)  # there, a private anonymous page reads as zeros again
        else:
            self.tensor.zero_()
