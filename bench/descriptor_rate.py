"""Descriptor throughput of one ring: producer in another process, consumer here.

Prints descriptors/s for (a) the ring alone (the consumer only pops) and (b) ring + proxy +
loopback transport (each descriptor becomes a 64-byte put to a peer, delivered and applied),
side by side, on the same descriptors in the same run.

    python -m bench.descriptor_rate [--count 200000] [--batch 64] [--capacity 4096]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

from portep.backends.loopback import LoopbackFabric
from portep.proxy.descriptor import DESCRIPTOR_DTYPE, Op
from portep.proxy.loop import Proxy
from portep.proxy.ring import DescriptorRing

PUT_BYTES = 64


def make_descriptors(count: int) -> np.ndarray:
    recs = np.zeros(count, dtype=DESCRIPTOR_DTYPE)
    recs["version"], recs["opcode"], recs["dst_rank"], recs["length"] = 1, Op.PUT, 1, PUT_BYTES
    # Alternate destinations so that nothing coalesces: every descriptor is one put.
    recs["src_offset"] = (np.arange(count) % 512) * PUT_BYTES
    recs["dst_offset"] = ((np.arange(count) * 7) % 512) * PUT_BYTES
    return recs


def produce(name: str, count: int, batch: int, start_at: float) -> None:
    ring = DescriptorRing.attach(name)
    recs = make_descriptors(count)
    while time.time() < start_at:
        time.sleep(1e-4)
    for i in range(0, count, batch):
        ring.push(recs[i : i + batch], timeout_s=60)
    ring.close()


def measure(count: int, batch: int, capacity: int, with_proxy: bool) -> float:
    ctx = mp.get_context("spawn")
    with DescriptorRing.create(capacity) as ring:
        start_at = time.time() + 1.5  # let the producer import and attach first
        proc = ctx.Process(target=produce, args=(ring.name, count, batch, start_at))
        proc.start()
        proxy = None
        if with_proxy:
            fabric = LoopbackFabric()
            ends = [fabric.endpoint(r) for r in range(2)]
            for end in ends:
                end.register(np.zeros(512 * PUT_BYTES, dtype=np.uint8), num_signal_slots=1)
                for peer in ends:
                    end.connect(peer.rank, peer.address())
            proxy = Proxy([ring], ends[0], max_batch=1024)
        got, began = 0, None
        deadline = time.monotonic() + 120
        while got < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumer got {got} of {count} descriptors")
            if proxy is not None:
                before = proxy.stats.descriptors
                proxy.step()
                ends[1].poll()
                n = proxy.stats.descriptors - before
            else:
                n = ring.pop(1024).size
            if n and began is None:
                began = time.perf_counter()
            got += n
        elapsed = time.perf_counter() - began
        proc.join(timeout=30)
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=64, help="descriptors per producer push")
    parser.add_argument("--capacity", type=int, default=4096)
    args = parser.parse_args()
    ring_rate = measure(args.count, args.batch, args.capacity, with_proxy=False)
    proxy_rate = measure(args.count, args.batch, args.capacity, with_proxy=True)
    print(f"{args.count} descriptors, producer batches of {args.batch}, ring of {args.capacity}")
    print(f"{'path':<40}{'descriptors/s':>16}")
    print(f"{'ring only (pop)':<40}{ring_rate:>16,.0f}")
    print(f"{'ring + proxy + loopback put (64 B)':<40}{proxy_rate:>16,.0f}")
    print(f"proxy path / ring alone: {proxy_rate / ring_rate:.2f}")


if __name__ == "__main__":
    main()
