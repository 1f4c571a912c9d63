"""The CUDA/HIP kernels against the CPU implementation, and the descriptor writer against a proxy.

On random data each native kernel gives the CPU's result bit for bit: layouts, row movement, FP8
casts (both the hardware and the software e4m3 path) and float32 reductions, which sum in the
CPU's order without fused multiply-adds. Descriptors a kernel writes into a host ring arrive intact
and in order at a consumer in another thread or process and through the compiled proxy, across
wrap-around and with the ring full (the kernel waits); a ring nobody drains makes the kernel stop
at its deadline with an error naming the ring. Skipped without a GPU or without CuPy.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest
import torch

from portep.errors import CommTimeoutError
from portep.native import CPU_KERNELS, Field, RowFormat
from portep.native import cuda as native
from portep.native.engine import Proxy, Ring, Window
from portep.proxy.descriptor import DESCRIPTOR_DTYPE, Op


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no GPU visible to torch"
    reason = native.unavailable_reason()
    return f"native kernels unavailable: {reason}" if reason else None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
DEVICE = "cuda"


@pytest.fixture(scope="module", params=[False, True], ids=["cuda_fp8", "soft_fp8"])
def fp8_kernels(request: pytest.FixtureRequest) -> native.CudaKernels:
    return native.kernels(DEVICE, soft_fp8=request.param)


@pytest.fixture(scope="module")
def kernels() -> native.CudaKernels:
    return native.kernels(DEVICE)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)} vs " \
                                                                f"{want.dtype}{list(want.shape)}"
    if got.dtype in (torch.float8_e4m3fn, torch.bool):
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    same = got == want
    if got.is_floating_point():
        same |= got.isnan() & want.isnan()
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} elements differ"


def _activations(num_tokens: int, hidden: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes, an all-zero group and some outliers."""
    gen = _generator(seed)
    x = torch.randn(num_tokens, hidden, generator=gen) * torch.exp(torch.randn(num_tokens, 1, generator=gen) * 3)
    x[0, :128] = 0
    x[1, 5] = 1e4
    x[2, 200:328] = 1e-6
    return x


# ----------------------------------------------------------------------------- compute kernels
@pytest.mark.parametrize(("num_ranks", "ranks_per_node", "num_experts", "topk"),
                         [(8, 8, 64, 8), (16, 4, 256, 8), (32, 8, 288, 9)])
def test_dispatch_layout(kernels: native.CudaKernels, num_ranks: int, ranks_per_node: int, num_experts: int,
                         topk: int) -> None:
    gen = _generator(num_experts)
    num_tokens = 4096
    topk_idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    topk_idx[torch.rand(num_tokens, topk, generator=gen) < 0.1] = -1
    want = CPU_KERNELS.dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
    got = kernels.dispatch_layout(topk_idx.to(DEVICE), num_experts, num_ranks, ranks_per_node)
    for name, g, w in zip(("per rank", "per node", "per expert", "is_token_in_rank"), got, want, strict=True):
        if w is None:
            assert g is None, name
        else:
            _assert_same(g, w, name)


def test_fp8_hardware_path_is_used() -> None:
    """On CUDA the runtime compiler finds <cuda_fp8.h>, so the hardware conversions run (HIP: software)."""
    path = native.kernels(DEVICE).fp8_path
    if torch.version.hip is None and path != "cuda_fp8":
        pytest.skip("NVRTC could not include <cuda_fp8.h> here: the software e4m3 path runs instead")
    assert path == ("software" if torch.version.hip else "cuda_fp8")


@pytest.mark.parametrize("round_scale", [False, True], ids=["scale", "round_scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_fp8_cast(fp8_kernels: native.CudaKernels, dtype: torch.dtype, round_scale: bool) -> None:
    x = _activations(512, 7168, seed=1).to(dtype)
    want_q, want_s = CPU_KERNELS.fp8_cast(x, round_scale)
    got_q, got_s = fp8_kernels.fp8_cast(x.to(DEVICE), round_scale)
    _assert_same(got_s, want_s, "scales")
    _assert_same(got_q, want_q, "e4m3 values")


@pytest.mark.parametrize("ue8m0", [False, True], ids=["f32_scales", "ue8m0_scales"])
def test_fp8_cast_back(fp8_kernels: native.CudaKernels, ue8m0: bool) -> None:
    x = _activations(256, 4096, seed=2).to(torch.bfloat16)
    q, scales = CPU_KERNELS.fp8_cast(x, round_scale=ue8m0)
    if ue8m0:
        scales = CPU_KERNELS.pack_ue8m0(scales)
    want = CPU_KERNELS.fp8_cast_back(q, scales)
    got = fp8_kernels.fp8_cast_back(q.to(DEVICE), scales.to(DEVICE))
    _assert_same(got, want, "cast back")
    assert (want - x.float()).abs().max() <= x.float().abs().max() * 2**-3, "e4m3 keeps 3 mantissa bits"


@pytest.mark.parametrize("indexed", [False, True], ids=["all_rows", "index"])
def test_pack_and_unpack_rows(kernels: native.CudaKernels, indexed: bool) -> None:
    gen = _generator(3)
    n = 1000
    tensors = {
        "x": torch.randn(n, 7168, generator=gen).to(torch.bfloat16),
        "scales": torch.randn(56, n, generator=gen).t(),  # column-major, as grouped GEMMs store scales
        "src_token": torch.arange(n, dtype=torch.int32).unsqueeze(1),
        "ranks_in_node": torch.rand(n, 3, generator=gen) < 0.5,  # 3 bytes: unaligned fields after it
        "topk_idx": torch.randint(-1, 256, (n, 8), generator=gen),
    }
    fmt = RowFormat([Field(name, value.dtype, value.size(1)) for name, value in tensors.items()])
    index = torch.randint(0, n, (3 * n,), generator=gen) if indexed else None
    want = CPU_KERNELS.pack_rows(fmt, tensors, index)
    got = kernels.pack_rows(fmt, {k: v.to(DEVICE) for k, v in tensors.items()},
                            index.to(DEVICE) if indexed else None)
    _assert_same(got, want, "packed rows")
    for name, value in kernels.unpack_rows(fmt, got).items():
        _assert_same(value, CPU_KERNELS.unpack_rows(fmt, want)[name], f"unpacked {name}")


def test_scatter_rows_expert_major(kernels: native.CudaKernels) -> None:
    """LL dispatch receive: rows into `[local_experts, ranks * T, ...]`, scales stored transposed."""
    gen = _generator(4)
    local_experts, num_ranks, max_tokens, hidden = 4, 8, 128, 2048
    slots = num_ranks * max_tokens
    recv_counts = torch.randint(0, max_tokens // 2, (num_ranks, local_experts), generator=gen)
    expert, slot, _ = CPU_KERNELS.ll_recv_slots(recv_counts)
    rows = expert.numel()
    received = {
        "x": torch.randint(0, 256, (rows, hidden), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn),
        "scales": torch.rand(rows, hidden // 128, generator=gen),
        "src_info": torch.randint(0, max_tokens, (rows,), dtype=torch.int32, generator=gen),
    }
    outputs = {
        "x": lambda device: torch.zeros(local_experts, slots, hidden, dtype=torch.uint8, device=device)
        .view(torch.float8_e4m3fn),
        "scales": lambda device: torch.zeros(local_experts, hidden // 128, slots, device=device).transpose(1, 2),
        "src_info": lambda device: torch.full((local_experts, slots), -1, dtype=torch.int32, device=device),
    }
    for name, make in outputs.items():
        want, got = make("cpu"), make(DEVICE)
        CPU_KERNELS.scatter_rows(want, expert, slot, received[name])
        kernels.scatter_rows(got, expert.to(DEVICE), slot.to(DEVICE), received[name].to(DEVICE))
        _assert_same(got, want, name)


@pytest.mark.parametrize("weighted", [False, True], ids=["sum", "weighted"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_reduce_rows(kernels: native.CudaKernels, dtype: torch.dtype, weighted: bool) -> None:
    """HT combine (sum of copies) and LL combine (weighted sum), float32, same bits as the CPU."""
    gen = _generator(5)
    rows, num_out, hidden = 6000, 1024, 7168
    values = torch.randn(rows, hidden, generator=gen).to(dtype)
    index = torch.randint(0, num_out, (rows,), generator=gen)
    index[:50] = 7  # one destination with many contributions
    weights = torch.rand(rows, 1, generator=gen) if weighted else None
    want = CPU_KERNELS.reduce_rows(values, index, num_out, weights)
    got = kernels.reduce_rows(values.to(DEVICE), index.to(DEVICE), num_out,
                              weights.to(DEVICE) if weighted else None)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    _assert_same(got, want, "sums")


def test_kernels_for_picks_the_native_kernels() -> None:
    from portep.native import kernels_for

    assert kernels_for(torch.device(DEVICE)).name == "cuda"
    assert kernels_for("cpu") is CPU_KERNELS


# ----------------------------------------------------------------------------- the descriptor writer
def _records(count: int, seed: int, dst_rank: int | None = None) -> np.ndarray:
    """Valid descriptors with random fields; src_offset is the sequence number."""
    rng = np.random.default_rng(seed)
    recs = np.zeros(count, dtype=DESCRIPTOR_DTYPE)
    recs["version"] = 1
    recs["opcode"] = rng.integers(Op.PUT, Op.SIGNAL + 1, count)
    recs["signal_slot"] = rng.integers(0, 2**16, count)
    recs["dst_rank"] = dst_rank if dst_rank is not None else rng.integers(0, 2**32, count, dtype=np.uint64)
    recs["src_offset"] = np.arange(count)
    recs["dst_offset"] = rng.integers(0, 2**63, count)
    recs["length"] = rng.integers(0, 2**32, count, dtype=np.uint64)
    recs["signal_value"] = rng.integers(-(2**31), 2**31, count)
    return recs


def _on_device(recs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(recs.view(np.uint8).reshape(-1, 32).copy()).to(DEVICE)


def _drain(rings: list[Ring], counts: list[int], timeout_s: float = 60) -> list[np.ndarray]:
    """Pop every ring until it has given ``counts[i]`` descriptors."""
    got: list[list[np.ndarray]] = [[] for _ in rings]
    have = [0] * len(rings)
    deadline = time.monotonic() + timeout_s
    while have != list(counts):
        assert time.monotonic() < deadline, f"consumer got {have} of {counts} descriptors"
        for i, ring in enumerate(rings):
            if ring.pending():
                batch = ring.pop(ring.capacity)
                got[i].append(batch)
                have[i] += batch.size
    return [np.concatenate(parts) if parts else np.zeros(0, DESCRIPTOR_DTYPE) for parts in got]


@pytest.mark.timeout(120)
def test_descriptors_arrive_intact_through_a_full_ring() -> None:
    """100k descriptors through 64 slots: wrap-around; the consumer starts late, so the kernel waits."""
    count, capacity = 100_000, 64
    recs = _records(count, seed=6)
    with Ring.create(capacity) as ring, native.DeviceRing(ring) as device_ring:
        push = native.push_descriptors([device_ring], _on_device(recs), [count], max_batch=32, timeout_s=30)
        time.sleep(0.3)
        assert ring.pending() == capacity, "the kernel should have filled the ring and be waiting"
        (got,) = _drain([ring], [count])
        push.wait()
        assert ring.pending() == 0
    np.testing.assert_array_equal(got, recs)


@pytest.mark.timeout(120)
def test_one_kernel_feeds_several_rings_drained_by_another_thread() -> None:
    counts, capacity = [50_000, 1, 0, 20_000], 128
    recs = [_records(n, seed=7 + i, dst_rank=i) for i, n in enumerate(counts)]
    rings = [Ring.create(capacity) for _ in counts]
    device_rings = [native.DeviceRing(ring) for ring in rings]
    result: list[list[np.ndarray]] = []
    try:
        consumer = threading.Thread(target=lambda: result.append(_drain(rings, counts)))
        consumer.start()
        push = native.push_descriptors(device_rings, _on_device(np.concatenate(recs)), counts, max_batch=7)
        consumer.join(timeout=90)
        push.wait()
        assert result, "consumer thread failed"
    finally:
        for device_ring, ring in zip(device_rings, rings, strict=True):
            device_ring.close()
            ring.close()
    for got, want in zip(result[0], recs, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.timeout(120)
def test_kernel_descriptors_drive_the_proxy() -> None:
    """PUT / PUT_SIGNAL descriptors from a kernel, posted by the compiled proxy (shm transport)."""
    num_tokens, token_bytes = 4096, 64
    rng = np.random.default_rng(11)
    t = np.arange(num_tokens)
    recs = np.zeros(num_tokens, dtype=DESCRIPTOR_DTYPE)
    signal = t % 8 == 7
    recs["version"], recs["dst_rank"], recs["length"] = 1, 1, token_bytes
    recs["opcode"] = np.where(signal, Op.PUT_SIGNAL, Op.PUT)
    recs["src_offset"] = t * token_bytes
    recs["dst_offset"] = (num_tokens - 1 - t) * token_bytes  # reversed: nothing coalesces
    recs["signal_value"] = signal.astype(np.int32)
    windows = [Window.create(4, num_tokens * token_bytes) for _ in range(2)]
    windows[0].data[:] = rng.integers(0, 256, windows[0].data.size, dtype=np.uint8)
    proxy = Proxy("shm", stay_awake_us=2000)
    ring = Ring.create(32)
    device_ring = native.DeviceRing(ring)
    endpoint, _ = proxy.add_endpoint(ring, windows[0], 2)
    try:
        peer = proxy.connect(proxy.address())
        for rank, window in enumerate(windows):
            proxy.set_rank(endpoint, rank, peer, window.name.encode())
        push = native.push_descriptors([device_ring], _on_device(recs), [num_tokens], max_batch=8, timeout_s=30)
        deadline = time.monotonic() + 60
        while windows[1].signals[0] < num_tokens // 8:
            assert time.monotonic() < deadline, f"{int(windows[1].signals[0])} of {num_tokens // 8} signals"
            time.sleep(0.001)
        push.wait()
        want = windows[0].data.reshape(num_tokens, token_bytes)[::-1]
        np.testing.assert_array_equal(windows[1].data.reshape(num_tokens, token_bytes), want)
    finally:
        proxy.remove_endpoint(endpoint, 5.0)
        proxy.destroy()
        device_ring.close()
        ring.close()
        for window in windows:
            window.close()


def _push_from_process(name: str, rank: int, count: int) -> None:
    """One rank: its own CUDA context and kernel on the shared GPU, writing into its own ring."""
    ring = Ring.attach(name)
    try:
        with native.DeviceRing(ring) as device_ring:
            push = native.push_descriptors([device_ring], _on_device(_records(count, seed=rank, dst_rank=rank)),
                                           [count], max_batch=16, timeout_s=60)
            push.wait()
    finally:
        ring.close()


@pytest.mark.timeout(180)
def test_two_ranks_share_the_gpu_each_with_its_kernel_and_ring() -> None:
    count, capacity = 200_000, 256
    ctx = mp.get_context("spawn")
    rings = [Ring.create(capacity) for _ in range(2)]
    procs = [ctx.Process(target=_push_from_process, args=(ring.name, rank, count)) for rank, ring in enumerate(rings)]
    try:
        for proc in procs:
            proc.start()
        got = _drain(rings, [count, count], timeout_s=150)
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        for ring in rings:
            ring.close()
    for rank in range(2):
        np.testing.assert_array_equal(got[rank], _records(count, seed=rank, dst_rank=rank))


def test_a_ring_nobody_drains_stops_the_kernel_at_its_deadline() -> None:
    capacity = 8
    with Ring.create(capacity) as ring, native.DeviceRing(ring) as device_ring:
        started = time.monotonic()
        push = native.push_descriptors([device_ring], _on_device(_records(100, seed=9)), [100], timeout_s=0.2,
                                       op="test push")
        with pytest.raises(CommTimeoutError, match=ring.name) as raised:
            push.wait()
        assert time.monotonic() - started < 10
        assert "8 of 100" in str(raised.value) and raised.value.op == "test push"
        assert ring.pending() == capacity
        ring.pop(capacity)
