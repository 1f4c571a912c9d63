"""Host memory helpers: the recycling pool and the zeroed buffers that cost nothing until written."""

from __future__ import annotations

import gc

import torch

from portep.memory import SMALL_BYTES, HostPool, ZeroedBytes


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_pool_recycles_a_block_once_its_tensors_are_gone() -> None:
    pool = HostPool()
    first = pool.empty((SMALL_BYTES,), torch.uint8)
    first.fill_(3)
    address = first.data_ptr()
    del first
    gc.collect()
    second = pool.empty((SMALL_BYTES // 4,), torch.float32)
    assert second.data_ptr() == address and pool.reused == 1 and pool.allocated == 1
    third = pool.empty((SMALL_BYTES,), torch.uint8)  # the block is taken: a new one
    assert third.data_ptr() != address and pool.allocated == 2


def test_zeroed_bytes_are_not_resident_until_written_and_clear_to_zeros() -> None:
    size = 256 << 20
    before = _resident_bytes()
    zeroed = ZeroedBytes(size)
    assert zeroed.tensor.numel() == size and zeroed.tensor.dtype == torch.uint8
    assert _resident_bytes() - before < size // 8  # not paged in by creating it
    zeroed.tensor[:: 1 << 20] = 7
    assert int(zeroed.tensor.sum()) == 7 * 256
    zeroed.clear()
    assert int(zeroed.tensor.count_nonzero()) == 0
    assert _resident_bytes() - before < size // 8  # the written pages went back to the kernel


def test_zeroed_bytes_of_size_zero() -> None:
    zeroed = ZeroedBytes(0)
    zeroed.clear()
    assert zeroed.tensor.numel() == 0
