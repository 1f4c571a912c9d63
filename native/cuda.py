"""CUDA/HIP kernels: loaded at run time with CuPy (NVRTC on CUDA, hiprtc on ROCm).

The sources are ``native/kernels/*.cu``; :func:`kernel_source` inlines portep's own headers into
one text and :func:`compile_options` gives the flags, so what the runtime compiler sees is exactly
what ``tests/test_native_compile.py`` compiles with nvcc/hipcc. CuPy is imported only when a
kernel is first needed; without CuPy or without a GPU, :func:`unavailable_reason` says why and
:func:`portep.native.kernels_for` falls back to the torch implementation.

Tensors are torch tensors throughout: kernels get their raw device pointers and run on torch's
current stream, so they order with the surrounding torch work.
"""

from __future__ import annotations

import functools
import mmap
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portep.deadlines import default_timeout_s
from portep.errors import CommTimeoutError, PortepError

from .cpu import FP8_GROUP, CpuKernels, RowFormat

NATIVE_DIR = Path(__file__).resolve().parent
KERNEL_DIR = NATIVE_DIR / "kernels"
KERNEL_MODULES = ("layout", "fp8", "rows", "descriptors")
RTC_OPTIONS = ("-std=c++17", "-DPORTEP_RTC=1")
SOFT_FP8_OPTION = "-DPORTEP_SOFT_FP8=1"

RING_OK, RING_TIMEOUT = 0, 1
_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED = 1, 2  # same values for cudaHostRegister and hipHostRegister
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


class NativeUnavailableError(PortepError):
    """The native GPU kernels cannot run here (no CuPy, no GPU, or a kernel failed to compile)."""


# ----------------------------------------------------------------------------- sources
def kernel_source(name: str) -> str:
    """``kernels/<name>.cu`` with the ``#include "..."`` of portep's headers inlined (each once)."""
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        seen.add(path)

        def include(match: re.Match[str]) -> str:
            for folder in (path.parent, NATIVE_DIR):
                header = (folder / match.group(1)).resolve()
                if header.is_file():
                    break
            else:
                raise FileNotFoundError(f"{path.name}: included header {match.group(1)!r} not found")
            if header in seen:
                return ""
            return f'#line 1 "{header.name}"\n{expand(header)}\n#line {line_after(match)} "{path.name}"'

        text = _PRAGMA_ONCE.sub("", path.read_text())

        def line_after(match: re.Match[str]) -> int:
            return text.count("\n", 0, match.end()) + 2

        return _INCLUDE.sub(include, text)

    path = (KERNEL_DIR / f"{name}.cu").resolve()
    return f'#line 1 "{path.name}"\n{expand(path)}'


def compile_options(soft_fp8: bool = False) -> tuple[str, ...]:
    """Flags for the runtime compiler (``soft_fp8``: e4m3 conversions without ``<cuda_fp8.h>``)."""
    return RTC_OPTIONS + ((SOFT_FP8_OPTION,) if soft_fp8 else ())


# ----------------------------------------------------------------------------- CuPy and the device
@functools.cache
def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise NativeUnavailableError(
            "CuPy is not installed (pip install cupy-cuda12x, cupy-cuda13x or cupy-rocm-6-0)") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its runtime's own error types
        raise NativeUnavailableError(f"CuPy sees no GPU: {exc}") from exc
    if count == 0:
        raise NativeUnavailableError("CuPy sees no GPU")
    return cupy


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here, or None when they can."""
    try:
        _cupy()
    except NativeUnavailableError as exc:
        return str(exc)
    return None


def available() -> bool:
    return unavailable_reason() is None


def _index(device: torch.device | str | int | None) -> int:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if device.type != "cuda":
        raise ValueError(f"native kernels run on GPU tensors, got device {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


_soft_fp8_fallback: set[tuple[str, int]] = set()


@functools.cache
def module(name: str, device_index: int = 0, soft_fp8: bool = False) -> Any:
    """The compiled ``kernels/<name>.cu`` (a ``cupy.RawModule``) for one device.

    Without ``<cuda_fp8.h>`` where the runtime compiler looks, FP8 conversions fall back to software.
    """
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        try:
            raw = cupy.RawModule(code=kernel_source(name), options=compile_options(soft_fp8))
            raw.compile()
        except cupy.cuda.compiler.CompileException as exc:
            if not soft_fp8 and "cuda_fp8" in str(exc):
                _soft_fp8_fallback.add((name, device_index))
                return module(name, device_index, soft_fp8=True)
            raise NativeUnavailableError(f"kernels/{name}.cu failed to compile: {exc}") from exc
    return raw


def _hip() -> bool:
    return torch.version.hip is not None


@functools.cache
def device_attributes(device_index: int) -> tuple[int, int]:
    """(warp size, multiprocessor count) of a device."""
    attributes = _cupy().cuda.Device(device_index).attributes
    return int(attributes["WarpSize"]), int(attributes["MultiProcessorCount"])


@functools.cache
def _external_stream(handle: int, device_index: int) -> Any:
    """CuPy's view of a torch stream (created once per stream)."""
    with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external, which older CuPy lacks
        warnings.simplefilter("ignore", DeprecationWarning)
        return _cupy().cuda.ExternalStream(handle, device_index)


def launch(name: str, kernel: str, device_index: int, grid: int | tuple[int, ...], block: int,
           args: tuple[Any, ...], shared_mem: int = 0, soft_fp8: bool = False) -> None:
    """Launch ``kernel`` of ``kernels/<name>.cu`` on torch's current stream of the device."""
    cupy = _cupy()
    function = module(name, device_index, soft_fp8).get_function(kernel)
    stream = _external_stream(torch.cuda.current_stream(device_index).cuda_stream, device_index)
    with cupy.cuda.Device(device_index), stream:
        function(grid if isinstance(grid, tuple) else (grid,), (block,), args, shared_mem=shared_mem)


def pointer(tensor: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel argument (None: a null pointer)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def _blocks(work: int, per_block: int, device_index: int, waves: int = 8) -> int:
    """Blocks for ``work`` items of ``per_block`` each, capped at ``waves`` per multiprocessor
    (kernels loop grid-stride over the rest)."""
    _, sms = device_attributes(device_index)
    return max(1, min(-(-work // per_block), sms * waves))


# ----------------------------------------------------------------------------- the kernels
class CudaKernels(CpuKernels):
    """Native kernels for one GPU; what has no native kernel runs as torch ops on the GPU.

    ``soft_fp8`` selects the software e4m3 conversion (the HIP path) on CUDA too, to test it there.
    """

    name = "cuda"

    def __init__(self, device_index: int, soft_fp8: bool = False) -> None:
        self.index, self.soft_fp8 = device_index, soft_fp8
        self.warp_size, _ = device_attributes(device_index)

    @property
    def fp8_path(self) -> str:
        """``"cuda_fp8"`` (hardware conversions) or ``"software"``, as compiled for this device."""
        if self.soft_fp8 or _hip():
            return "software"
        module("fp8", self.index)
        return "software" if ("fp8", self.index) in _soft_fp8_fallback else "cuda_fp8"

    def _launch(self, name: str, kernel: str, grid: int | tuple[int, ...], block: int, args: tuple[Any, ...],
                shared_mem: int = 0) -> None:
        launch(name, kernel, self.index, grid, block, args, shared_mem, self.soft_fp8)

    # ---------------------------------------------------------------- layout
    def dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        num_nodes = num_ranks // ranks_per_node
        shared = 4 * (num_experts + num_ranks + num_nodes)
        if topk_idx.dtype != torch.int64 or shared > 48 * 1024:
            return super().dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
        topk_idx = topk_idx.contiguous()
        num_tokens, num_topk = topk_idx.shape
        device = topk_idx.device
        per_rank = torch.zeros(num_ranks, dtype=torch.int32, device=device)
        per_node = torch.zeros(num_nodes, dtype=torch.int32, device=device)
        per_expert = torch.zeros(num_experts, dtype=torch.int32, device=device)
        in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)
        self._launch("layout", "portep_dispatch_layout", _blocks(num_tokens, 256, self.index, waves=1), 256,
                     (pointer(topk_idx), np.int32(num_tokens), np.int32(num_topk), np.int32(num_experts),
                      np.int32(num_ranks), np.int32(ranks_per_node), pointer(per_rank), pointer(per_node),
                      pointer(per_expert), pointer(in_rank)), shared_mem=shared)
        return per_rank, per_node if num_nodes > 1 else None, per_expert, in_rank

    # ---------------------------------------------------------------- FP8
    def fp8_cast(self, x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = {torch.bfloat16: "portep_fp8_cast_bf16", torch.float32: "portep_fp8_cast_f32"}.get(x.dtype)
        if kernel is None or x.dim() != 2 or x.size(1) % FP8_GROUP:
            return super().fp8_cast(x, round_scale)
        x = x.contiguous()
        n, hidden = x.shape
        out = torch.empty(n, hidden, dtype=torch.uint8, device=x.device)
        scales = torch.empty(n, hidden // FP8_GROUP, dtype=torch.float32, device=x.device)
        groups = n * hidden // FP8_GROUP
        if groups:
            block = 256
            self._launch("fp8", kernel, _blocks(groups, block // self.warp_size, self.index), block,
                         (pointer(x), np.int64(groups), np.int32(round_scale), pointer(out), pointer(scales)))
        return out.view(torch.float8_e4m3fn), scales

    def fp8_cast_back(self, x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if scales.dtype == torch.int32:
            scales = self.unpack_ue8m0(scales)
        if x_fp8.dim() != 2 or scales.dtype != torch.float32 or x_fp8.size(1) % scales.size(1):
            return super().fp8_cast_back(x_fp8, scales)
        x_bytes = x_fp8.contiguous().view(torch.uint8)
        scales = scales.contiguous()
        n, hidden = x_bytes.shape
        out = torch.empty(n, hidden, dtype=torch.float32, device=x_fp8.device)
        if out.numel():
            self._launch("fp8", "portep_fp8_cast_back", _blocks(out.numel(), 256, self.index), 256,
                         (pointer(x_bytes), pointer(scales), np.int64(out.numel()), np.int32(hidden),
                          np.int32(scales.size(1)), pointer(out)))
        return out

    # ---------------------------------------------------------------- row movement
    def pack_rows(self, fmt: RowFormat, tensors: dict[str, torch.Tensor], index: torch.Tensor | None = None
                  ) -> torch.Tensor:
        if not fmt.fields:
            return super().pack_rows(fmt, tensors, index)
        table, keep = [], []
        offset = 0
        for field in fmt.fields:
            value = tensors[field.name]
            value = value.reshape(value.size(0), field.width)
            if field.width > 1 and value.stride(1) != 1:
                value = value.contiguous()
            keep.append(value)
            table += [value.data_ptr(), value.stride(0) * value.element_size(), field.nbytes, offset]
            offset += field.nbytes
        device = keep[0].device
        if any(value.device != device for value in keep) or (index is not None and index.device != device):
            return super().pack_rows(fmt, tensors, index)
        rows = keep[0].size(0) if index is None else index.numel()
        out = torch.empty(rows, fmt.row_bytes, dtype=torch.uint8, device=device)
        if rows and fmt.row_bytes:
            if index is not None:
                index = index.to(device=device, dtype=torch.int64).contiguous()
            fields = torch.tensor(table, dtype=torch.int64).to(device)
            self._launch("rows", "portep_pack_rows", _blocks(rows, 1, self.index), 256,
                         (pointer(fields), np.int32(len(fmt.fields)), pointer(index), np.int64(rows),
                          np.int64(fmt.row_bytes), pointer(out)))
        return out

    def scatter_rows(self, out: torch.Tensor, expert: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor) -> None:
        if rows.dtype != out.dtype or out.dim() not in (2, 3) or rows.dim() != out.dim() - 1:
            return super().scatter_rows(out, expert, slot, rows)
        rows = rows.contiguous()
        n = rows.size(0)
        if n == 0:
            return None
        width = rows.size(1) if rows.dim() == 2 else 1
        stride_col = out.stride(2) if out.dim() == 3 else 1
        expert = expert.to(torch.int64).contiguous()
        slot = slot.to(torch.int64).contiguous()
        self._launch("rows", "portep_scatter_rows", _blocks(n, 1, self.index), 128,
                     (pointer(rows), np.int64(n), np.int64(width), np.int32(out.element_size()), pointer(expert),
                      pointer(slot), pointer(out), np.int64(out.stride(0)), np.int64(out.stride(1)),
                      np.int64(stride_col)))
        return None

    def reduce_rows(self, values: torch.Tensor, index: torch.Tensor, num_out: int,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
        kernel = {torch.bfloat16: "portep_reduce_rows_bf16", torch.float32: "portep_reduce_rows_f32"}.get(values.dtype)
        if kernel is None or values.dim() != 2 or (weights is not None and weights.numel() != values.size(0)):
            return super().reduce_rows(values, index, num_out, weights)
        values = values.contiguous()
        width = values.size(1)
        out = torch.empty(num_out, width, dtype=torch.float32, device=values.device)
        if out.numel() == 0:
            return out
        index = index.to(torch.int64)
        order = torch.argsort(index, stable=True)
        offsets = torch.zeros(num_out + 1, dtype=torch.int64, device=values.device)
        torch.cumsum(torch.bincount(index, minlength=num_out), 0, out=offsets[1:])
        if weights is not None:
            weights = weights.to(torch.float32).contiguous()
        block = 256
        column_tiles = min(-(-width // block), 65535)
        self._launch("rows", kernel, (min(num_out, 2**31 - 1), column_tiles), block,
                     (pointer(values), np.int64(width), pointer(order), pointer(offsets), pointer(weights),
                      np.int64(num_out), pointer(out)))
        return out


@functools.cache
def _kernels(device_index: int, soft_fp8: bool) -> CudaKernels:
    return CudaKernels(device_index, soft_fp8)


def kernels(device: torch.device | str | int | None = None, soft_fp8: bool = False) -> CudaKernels:
    """The native kernels of a GPU (raises :class:`NativeUnavailableError` when they cannot run)."""
    _cupy()
    return _kernels(_index(device), soft_fp8)


# ----------------------------------------------------------------------------- the descriptor writer
class DeviceRing:
    """A descriptor ring (:class:`portep.native.engine.Ring`) mapped into a GPU's address space, so
    that kernels can push descriptors into it (its host memory is registered with the mapped flag)."""

    def __init__(self, ring: Any, device: torch.device | str | int | None = None) -> None:
        cupy = _cupy()
        self.ring, self.index = ring, _index(device)
        self.host_ptr = int(ring.address)
        self.nbytes = -(-ring.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        with cupy.cuda.Device(self.index):
            cupy.cuda.runtime.hostRegister(self.host_ptr, self.nbytes, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED)
            self.device_ptr = int(cupy.cuda.runtime.pointerGetAttributes(self.host_ptr).devicePointer)
        self.registered = True

    @property
    def name(self) -> str:
        return self.ring.name

    def close(self) -> None:
        """Unregister (the ring itself stays open)."""
        if self.registered:
            with _cupy().cuda.Device(self.index):
                _cupy().cuda.runtime.hostUnregister(self.host_ptr)
            self.registered = False

    def __enter__(self) -> DeviceRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingPush:
    """A descriptor push in flight; :meth:`wait` completes it and reports rings that stayed full."""

    def __init__(self, rings: Sequence[DeviceRing], counts: Sequence[int], status: torch.Tensor, timeout_s: float,
                 op: str, keep: tuple[torch.Tensor, ...]) -> None:
        self.rings, self.counts, self.status, self.timeout_s, self.op = list(rings), list(counts), status, timeout_s, op
        self._keep = keep
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(rings[0].index))

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        """Block until the kernel ends; raise :class:`CommTimeoutError` naming each ring that stayed full."""
        self.event.synchronize()
        status = self.status.view(-1, 2).cpu().tolist()
        stuck = [(ring, pushed, count) for ring, (pushed, code), count in zip(self.rings, status, self.counts,
                                                                                strict=True) if code != RING_OK]
        if stuck:
            detail = "; ".join(f"ring {ring.name} full ({ring.ring.capacity} descriptors, {ring.ring.pending()} not "
                               f"taken by its consumer), {pushed} of {count} descriptor(s) pushed"
                               for ring, pushed, count in stuck)
            raise CommTimeoutError(self.op, self.timeout_s, detail=detail)


def push_descriptors(rings: Sequence[DeviceRing], records: torch.Tensor, counts: Sequence[int], *,
                     max_batch: int = 32, timeout_s: float | None = None, op: str = "descriptor push") -> RingPush:
    """Launch the descriptor writer: ``counts[b]`` consecutive records of ``records`` (uint8
    `[N, 32]` on the GPU, :data:`~portep.proxy.descriptor.DESCRIPTOR_DTYPE` bytes) go to ``rings[b]``,
    one warp per ring, publishing the head every ``max_batch`` descriptors or fewer. Returns at once."""
    if len(rings) != len(counts) or not rings:
        raise ValueError(f"{op}: {len(rings)} ring(s) but {len(counts)} count(s)")
    if len({ring.name for ring in rings}) != len(rings):
        raise ValueError(f"{op}: a ring may have only one producer, got the same ring twice")
    if records.dtype != torch.uint8 or records.dim() != 2 or records.size(1) != 32 or records.size(0) != sum(counts):
        raise ValueError(f"{op}: records must be uint8 [sum(counts)={sum(counts)}, 32], got {records.dtype} "
                         f"{list(records.shape)}")
    timeout_s = default_timeout_s() if timeout_s is None else timeout_s
    index = rings[0].index
    device = torch.device("cuda", index)
    records = records.to(device).contiguous()
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)).to(device)
    ring_ptrs = torch.tensor([ring.device_ptr for ring in rings], dtype=torch.int64).to(device)
    status = torch.zeros(2 * len(rings), dtype=torch.int64, device=device)
    warp_size, _ = device_attributes(index)
    launch("descriptors", "portep_ring_push", index, len(rings), warp_size,
           (pointer(ring_ptrs), pointer(records), pointer(offsets), np.uint64(max_batch),
            np.uint64(int(timeout_s * 1e9)), pointer(status)))
    return RingPush(rings, counts, status, timeout_s, op, (records, offsets, ring_ptrs))
