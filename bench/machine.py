"""What this machine can do, measured in the run: memory-copy bandwidth and expert compute per token.

Each measurement carries the reasons it is not credible (``problems``), for the report to print next to it.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# Plausible rates of the expert MLP: at least 1 GFLOP/s on the whole machine (slower than any CPU core of
# the last decade, even in emulated BF16), at most 4 TFLOP/s per thread (above a core's AMX BF16 peak).
MIN_FLOPS = 1e9
MAX_FLOPS_PER_THREAD = 4e12
MAX_SPREAD = 2.0  # slowest over fastest repeat
MIN_REPEATS = 3
# Memory copy: slower than 0.1 GB/s or faster than 10 TB/s is a broken measurement, not a machine.
COPY_BOUNDS_BPS = (1e8, 1e13)


@dataclass
class Measured:
    """Samples (seconds) of one measurement, the figure derived from them and why it is not credible.

    ``problems`` is empty when the figure passed its checks.
    """

    value: float
    unit: str
    samples_s: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def plausible(self) -> bool:
        """The figure passed its checks."""
        return not self.problems


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
    value = nbytes / min(samples)
    lo, hi = COPY_BOUNDS_BPS
    problems = [] if lo <= value <= hi else [f"{value / 1e9:.3g} GB/s outside {lo / 1e9:g}-{hi / 1e9:g} GB/s"]
    return Measured(value, "B/s", samples, {"bytes": nbytes, "repeats": repeats, "threads": torch.get_num_threads()},
                    problems)


def expert_flops_per_token(hidden: int, ffn: int) -> float:
    """FLOPs of the expert MLP ``hidden -> ffn -> hidden`` per token: two GEMMs of ``2 hidden ffn`` each."""
    return 4.0 * hidden * ffn


def check_expert_cost(samples_s: Sequence[float], tokens: int, hidden: int, ffn: int, threads: int,
                      max_spread: float = MAX_SPREAD, min_flops: float = MIN_FLOPS,
                      max_flops_per_thread: float = MAX_FLOPS_PER_THREAD) -> list[str]:
    """Why the per-call times ``samples_s`` of ``tokens`` tokens do not give a credible ``c_tok`` (empty if they do).

    Checks: enough repeats, repeats within ``max_spread`` of each other, and an implied rate
    (FLOPs per token over the median seconds per token) between ``min_flops`` and
    ``threads * max_flops_per_thread``.
    """
    if not samples_s or min(samples_s) <= 0:
        return ["no positive timing"]
    problems = []
    if len(samples_s) < MIN_REPEATS:
        problems.append(f"{len(samples_s)} repeats < {MIN_REPEATS}")
    spread = max(samples_s) / min(samples_s)
    if spread > max_spread:
        problems.append(f"repeats disagree by {spread:.1f}x > {max_spread:g}x "
                        f"({min(samples_s) / tokens * 1e6:,.1f}-{max(samples_s) / tokens * 1e6:,.1f} us per token)")
    rate = expert_flops_per_token(hidden, ffn) / (statistics.median(samples_s) / tokens)
    max_flops = threads * max_flops_per_thread
    if rate < min_flops:
        problems.append(f"implies {rate / 1e9:.3g} GFLOP/s < {min_flops / 1e9:g} GFLOP/s")
    elif rate > max_flops:
        problems.append(f"implies {rate / 1e9:,.0f} GFLOP/s > {max_flops / 1e9:,.0f} GFLOP/s of {threads} thread(s)")
    return problems


def expert_cost_per_token(hidden: int, ffn: int, tokens: int = 128, repeats: int = 7, warmup: int = 2,
                          threads: int | None = None, attempts: int = 2, dtype: torch.dtype = torch.bfloat16,
                          timer: Callable[[], float] = time.perf_counter) -> Measured:
    """Seconds per routed token of a reference expert MLP ``hidden -> ffn -> hidden`` with SiLU.

    ``warmup`` untimed calls, then the median of ``repeats`` timed calls of ``tokens`` tokens, with
    ``threads`` torch threads (default: the current setting; restored afterwards). When the repeats
    fail :func:`check_expert_cost` (e.g. a burst of contention), the measurement is taken again, up to
    ``attempts`` times in all; the last attempt's problems are kept in :attr:`Measured.problems`.
    """
    previous = torch.get_num_threads()
    threads = threads or previous
    gen = torch.Generator().manual_seed(0)
    w1 = (torch.randn(hidden, ffn, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(ffn, hidden, generator=gen) / ffn**0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)

    def expert() -> torch.Tensor:
        return torch.nn.functional.silu(x @ w1) @ w2

    def measure() -> list[float]:
        samples = []
        for _ in range(repeats):
            t0 = timer()
            expert()
            samples.append(timer() - t0)
        return samples

    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            expert()
        done = 1
        samples = measure()
        problems = check_expert_cost(samples, tokens, hidden, ffn, threads)
        while problems and done < attempts:
            done += 1
            samples = measure()
            problems = check_expert_cost(samples, tokens, hidden, ffn, threads)
    finally:
        torch.set_num_threads(previous)
    flops = expert_flops_per_token(hidden, ffn)
    value = statistics.median(samples) / tokens if samples else math.nan
    positive = bool(samples) and min(samples) > 0
    return Measured(value, "s/token", samples,
                    {"hidden": hidden, "ffn": ffn, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
                     "threads": threads, "warmup": warmup, "repeats": repeats, "attempts": done,
                     "statistic": "median", "spread": max(samples) / min(samples) if positive else None,
                     "flops_per_token": flops, "flops_per_s": flops / value if positive else None},
                    problems)


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
