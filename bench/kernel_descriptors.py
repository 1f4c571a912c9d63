"""Kernel -> proxy descriptor channel: latency and rate of descriptors a GPU kernel writes into a
host-memory descriptor ring, next to what UCCL-EP reports for its GPU -> CPU command channel.

What is measured (on the GPU's clocks, so no host/device clock alignment is involved):

* **round trip** (µs): one kernel thread stamps the clock into a descriptor, publishes it (slot
  write, system-scope fence, release store of the head), then polls the ring's tail (acquire loads
  over PCIe) until the consumer has taken it. Round trip = time from the stamp until the GPU sees
  the tail past that descriptor: GPU -> host write, the consumer noticing and popping it, its tail
  store, and the GPU's read of the tail. One descriptor in flight at a time. Times come from the
  multiprocessor's cycle counter, converted to ns with the rate the device clock gives over the run.
  **one-way** = round trip / 2 (an estimate: the two directions are not separated). ``host read``
  is the cost of one GPU load from host memory, measured alone.
* **rate** (M descriptors/s): W warps (one per ring) each push N generated PUT descriptors, publishing
  the head every B descriptors (B = 1: every descriptor on its own, as a per-token signal would be);
  rate = W * N / (last warp's end - first warp's start), device clock. The ring has C slots, so
  the kernel waits whenever the consumer lags; with consumer ``none`` the ring holds all N and is
  checked after the run (the producer's ceiling).
* **fence**: ``fence+release`` is the production writer (every lane fences at system scope, then
  lane 0's release store of the head); ``release`` leaves the fence out and relies on the warp
  barrier and the release store alone: what the explicit fence costs.

Consumers: ``pop`` (the engine's compiled pop loop, ``Ring.consume``, one thread per ring: it copies
each batch out and stores the tail), ``proxy`` (the compiled proxy thread with the shm transport:
pop, coalesce, post each descriptor as a 64-byte put or a signal into a window).

    python -m bench.kernel_descriptors [--quick] [--out bench/results/kernel_descriptors.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portep.native import cuda as native
from portep.native import engine

RESULTS = Path(__file__).resolve().parent / "results"
# UCCL-EP (uccl-project/uccl, ep/): its GPU -> CPU command channel, as its authors report it.
UCCL_EP = {"rate_M_per_s": "> 8", "mean_us": "~3", "p99_us": "< 8"}
PUT_BYTES = 64


def _ns_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy().astype(np.float64)


def _check(status: torch.Tensor, what: str) -> None:
    codes = status.view(-1, 2).cpu().tolist()
    bad = [i for i, (_, code) in enumerate(codes) if code != native.RING_OK]
    if bad:
        raise RuntimeError(f"{what}: ring(s) {bad} timed out (status {codes})")


class Consumer:
    """Drains rings while a kernel runs; ``run`` returns when ``total`` descriptors are taken."""

    def __init__(self, kind: str, rings: list[engine.Ring], total: int) -> None:
        self.kind, self.rings, self.total = kind, rings, total
        self.threads: list[threading.Thread] = []
        self.taken: list[int] = [0] * len(rings)
        self.proxy: engine.Proxy | None = None
        if kind == "pop":
            share = [total // len(rings) + (i < total % len(rings)) for i in range(len(rings))]
            for i, ring in enumerate(rings):
                thread = threading.Thread(target=self._pop, args=(i, ring, share[i]), daemon=True)
                thread.start()
                self.threads.append(thread)
        elif kind == "proxy":
            per_ring = -(-total // len(rings))
            self.window = engine.Window.create(1, PUT_BYTES * (per_ring + 1))
            self.proxy = engine.Proxy("shm", stay_awake_us=2000)
            peer = self.proxy.connect(self.proxy.address())
            self.endpoints = []
            for ring in rings:
                endpoint, key = self.proxy.add_endpoint(ring, self.window, len(rings))
                for rank in range(len(rings)):
                    self.proxy.set_rank(endpoint, rank, peer, key)
                self.endpoints.append(endpoint)

    def _pop(self, i: int, ring: engine.Ring, count: int) -> None:
        self.taken[i] = ring.consume(count, 120)[0]

    def run(self, deadline_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + deadline_s
        if self.kind == "pop":
            for thread in self.threads:
                thread.join(deadline_s)
            if sum(self.taken) < self.total:
                raise TimeoutError(f"the compiled pop loops took {sum(self.taken)} of {self.total}")
            return {}
        if self.kind == "proxy":
            try:
                while (stats := self.proxy.stats())["descriptors"] < self.total:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"proxy took {stats['descriptors']} of {self.total}")
                    time.sleep(1e-4)
                return {"coalesced": stats["coalesced"]}
            finally:
                for endpoint in self.endpoints:
                    self.proxy.remove_endpoint(endpoint, 5.0)
                self.proxy.destroy()
                self.window.close()
        return {}


def _mapped(capacity: int, count: int, device: int) -> tuple[list[engine.Ring], list[native.DeviceRing]]:
    rings = [engine.Ring.create(capacity) for _ in range(count)]
    return rings, [native.DeviceRing(ring, device) for ring in rings]


def _close(rings: list[engine.Ring], mapped: list[native.DeviceRing]) -> None:
    for device_ring, ring in zip(mapped, rings, strict=True):
        device_ring.close()
        ring.close()


def host_read_ns(device: int, iterations: int = 10_000) -> float:
    rings, mapped = _mapped(64, 1, device)
    try:
        out = torch.zeros(2, dtype=torch.int64, device=f"cuda:{device}")
        native.launch("descriptors", "portep_host_read_latency", device, 1, 1,
                      (np.uint64(mapped[0].device_ptr), np.int32(iterations), native.pointer(out)))
        torch.cuda.synchronize(device)
        return float(out[0].item()) / iterations
    finally:
        _close(rings, mapped)


def latency(kind: str, iterations: int, device: int, fence: bool = True) -> dict[str, Any]:
    """Round trips of one descriptor at a time through a ring drained by ``kind``."""
    rings, mapped = _mapped(4096, 1, device)
    try:
        dev = f"cuda:{device}"
        round_trip = torch.zeros(2 * iterations, dtype=torch.int64, device=dev)
        totals = torch.zeros(2, dtype=torch.int64, device=dev)
        status = torch.zeros(2, dtype=torch.int64, device=dev)
        consumer = Consumer(kind, rings, iterations)
        native.launch("descriptors", "portep_ring_bench_latency", device, 1, 1,
                      (np.uint64(mapped[0].device_ptr), np.int32(iterations), np.uint64(30 * 10**9),
                       np.int32(fence), native.pointer(round_trip), native.pointer(totals), native.pointer(status)))
        consumer.run()
        torch.cuda.synchronize(device)
        _check(status, f"latency ({kind})")
    finally:
        _close(rings, mapped)
    pairs = _ns_array(round_trip).reshape(iterations, 2)
    total_ns, total_cycles = _ns_array(totals)
    ns = pairs[:, 1] * (total_ns / total_cycles)
    ns = ns[min(100, iterations // 10):] / 1e3  # µs, without the first (warm-up) round trips
    return {"consumer": kind, "fence": _fence_name(fence), "iterations": iterations, "median_us": float(np.median(ns)),
            "p99_us": float(np.percentile(ns, 99)), "mean_us": float(ns.mean()), "min_us": float(ns.min()),
            "one_way_median_us": float(np.median(ns)) / 2,
            "median_us_globaltimer": float(np.median(pairs[min(100, iterations // 10):, 0])) / 1e3,
            "sm_clock_GHz": total_cycles / total_ns}


def rate(kind: str, num_rings: int, per_ring: int, batch: int, capacity: int, device: int,
         fence: bool = True) -> dict[str, Any]:
    """Descriptors/s of ``num_rings`` warps pushing ``per_ring`` each, drained by ``kind``."""
    capacity = max(capacity, 1 << (per_ring - 1).bit_length()) if kind == "none" else capacity
    rings, mapped = _mapped(capacity, num_rings, device)
    try:
        dev = f"cuda:{device}"
        ptrs = torch.tensor([m.device_ptr for m in mapped], dtype=torch.int64).to(dev)
        times = torch.zeros(2 * num_rings, dtype=torch.int64, device=dev)
        status = torch.zeros(2 * num_rings, dtype=torch.int64, device=dev)
        consumer = Consumer(kind, rings, num_rings * per_ring)
        warp, _ = native.device_attributes(device)
        native.launch("descriptors", "portep_ring_bench_rate", device, num_rings, warp,
                      (native.pointer(ptrs), np.uint64(per_ring), np.uint64(batch), np.uint64(60 * 10**9),
                       np.int32(fence), native.pointer(times), native.pointer(status)))
        extra = consumer.run()
        torch.cuda.synchronize(device)
        _check(status, f"rate ({kind})")
        if kind == "none":
            for r, ring in enumerate(rings):
                got = ring.pop(per_ring + 1)
                if got.size != per_ring or not np.array_equal(got["src_offset"], np.arange(per_ring)) or \
                        (got["dst_rank"] != r).any():
                    raise RuntimeError(f"ring {r}: descriptors missing or out of order")
    finally:
        _close(rings, mapped)
    t = _ns_array(times).reshape(num_rings, 2)
    elapsed_s = (t[:, 1].max() - t[:, 0].min()) / 1e9
    total = num_rings * per_ring
    return {"consumer": kind, "fence": _fence_name(fence), "rings": num_rings, "batch": batch, "capacity": capacity,
            "descriptors": total, "seconds": elapsed_s, "rate_M_per_s": total / elapsed_s / 1e6, **extra}


def _fence_name(fence: bool) -> str:
    return "fence+release" if fence else "release"


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(key, "")) for _, key in columns) + " |" for row in rows]
    return lines


def report(results: dict[str, Any]) -> str:
    """The latency and rate tables, with UCCL-EP's reported figures as the last row of each."""
    lines = [f"GPU: {results['device']}; one GPU load from host memory: {results['host_read_us']:.2f} µs", "",
             "Latency, one descriptor in flight (round trip on the GPU clock):", ""]
    uccl_latency = {"consumer": "UCCL-EP (reported)", "mean_us": UCCL_EP["mean_us"], "p99_us": UCCL_EP["p99_us"]}
    lines += _table([*results["latency"], uccl_latency],
                    [("consumer", "consumer"), ("fence", "fence"), ("median µs", "median_us"), ("p99 µs", "p99_us"),
                     ("mean µs", "mean_us"), ("one-way median µs (round trip / 2)", "one_way_median_us")])
    lines += ["", "Rate (M descriptors/s on the device clock):", ""]
    uccl_rate = {"consumer": "UCCL-EP (reported)", "rate_M_per_s": UCCL_EP["rate_M_per_s"]}
    lines += _table([*results["rate"], uccl_rate],
                    [("consumer", "consumer"), ("fence", "fence"), ("rings (warps)", "rings"), ("batch", "batch"),
                     ("ring slots", "capacity"), ("descriptors", "descriptors"), ("M desc/s", "rate_M_per_s")])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer descriptors and configurations")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_descriptors.json")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not native.available():
        sys.exit(f"kernel_descriptors needs a GPU and CuPy: {native.unavailable_reason() or 'no GPU visible to torch'}")
    import cupy

    device = args.device
    scale = 10 if args.quick else 1
    native.module("descriptors", device)  # compile before timing

    consumers = ["pop", "proxy"]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device), "command": "python -m bench.kernel_descriptors "
        + " ".join(argv if argv is not None else sys.argv[1:]), "host": platform.node(),
        "torch": torch.__version__, "cupy": cupy.__version__, "uccl_ep_reported": UCCL_EP,
        "host_read_us": host_read_ns(device) / 1e3, "latency": [], "rate": []}
    rate("pop", 1, 10_000, 32, 4096, device)  # warm-up
    for kind in consumers:
        results["latency"].append(latency(kind, 50_000 // scale, device))
    results["latency"].append(latency("pop", 50_000 // scale, device, fence=False))
    total = (1 << 20) // scale
    configs: list[tuple[str, int, int, bool]] = []  # consumer, rings, batch, fence
    configs += [("none", rings, batch, True) for rings in (1, 8, 32) for batch in (1, 32)]
    configs += [("none", rings, batch, False) for rings in (1, 32) for batch in (1, 32)]
    configs += [("pop", rings, batch, True) for rings in (1, 4, 8, 32) for batch in (1, 32)]
    configs += [("pop", rings, batch, False) for rings, batch in ((1, 1), (8, 32), (32, 1))]
    configs += [("proxy", rings, batch, True) for rings, batch in ((1, 32), (4, 32), (8, 1))]
    for kind, rings, batch, fence in configs:
        results["rate"].append(rate(kind, rings, total // rings, batch, 4096, device, fence))
        row = results["rate"][-1]
        print(f"  {kind:6s} {row['fence']:13s} rings={rings:2d} batch={batch:3d}: {row['rate_M_per_s']:.2f} M/s",
              flush=True)

    text = report(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(f"# Kernel -> proxy descriptors\n\n`{results['command']}`\n\n{text}\n")
    return results


if __name__ == "__main__":
    main()
