"""What this machine can do, measured in the run: memory-copy bandwidth and expert compute per token."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Measured:
    """Samples (seconds) of one measurement and the figure derived from them."""

    value: float
    unit: str
    samples_s: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> Measured:
    """Bytes/s of one large ``Tensor.copy_`` (best of ``repeats``): the machine's limit for moving bytes.

    Every byte a dispatch or combine delivers must be written at least once into its receiver's
    memory, so ``bytes / copy_bandwidth`` bounds the time from below on a shared-memory machine.
    """
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - t0)
    return Measured(nbytes / min(samples), "B/s", samples,
                    {"bytes": nbytes, "repeats": repeats, "threads": torch.get_num_threads()})


def expert_cost_per_token(hidden: int, ffn: int, tokens: int = 128, repeats: int = 3,
                          dtype: torch.dtype = torch.bfloat16) -> Measured:
    """Seconds per routed token of a reference expert MLP ``hidden -> ffn -> hidden`` with SiLU (best of repeats)."""
    gen = torch.Generator().manual_seed(0)
    w1 = (torch.randn(hidden, ffn, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(ffn, hidden, generator=gen) / ffn**0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)

    def expert() -> torch.Tensor:
        return torch.nn.functional.silu(x @ w1) @ w2

    expert()  # warm up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        expert()
        samples.append(time.perf_counter() - t0)
    return Measured(min(samples) / tokens, "s/token", samples,
                    {"hidden": hidden, "ffn": ffn, "tokens": tokens, "dtype": str(dtype).removeprefix("torch.")})


def describe() -> dict:
    """Machine and software versions, for the results file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal")), None)
    except OSError:
        pass
    import numpy

    import portep

    return {
        "machine": {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu,
                    "cpus": os.cpu_count(), "memory_bytes": mem},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                     "portep": portep.__version__},
    }


def available_memory() -> int | None:
    """``MemAvailable`` in bytes, or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable")), None)
    except OSError:
        return None
