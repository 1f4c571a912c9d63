"""Descriptor throughput of one ring: producer in another process, consumer here.

Prints descriptors/s, side by side on the same descriptors in the same run, for (a) the ring alone
(a compiled loop only pops) and (b) ring + the compiled proxy thread + the shm transport (each
descriptor becomes a 64-byte put into a window, copied and applied). The producer pushes from
Python in batches; it is fast enough not to be the limit (its own rate is printed too).

    python -m bench.descriptor_rate [--count 2000000] [--batch 256] [--capacity 4096]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

from portep.native import engine
from portep.proxy.descriptor import DESCRIPTOR_DTYPE, Op

PUT_BYTES = 64
SLOTS = 512  # distinct 64-byte places puts go to


def make_descriptors(count: int) -> np.ndarray:
    recs = np.zeros(count, dtype=DESCRIPTOR_DTYPE)
    recs["version"], recs["opcode"], recs["dst_rank"], recs["length"] = 1, Op.PUT, 0, PUT_BYTES
    # Scattered destinations, so that nothing coalesces: every descriptor is one put.
    recs["src_offset"] = (np.arange(count) % SLOTS) * PUT_BYTES
    recs["dst_offset"] = (SLOTS + (np.arange(count) * 7) % SLOTS) * PUT_BYTES
    return recs


def produce(name: str, count: int, batch: int, start_at: float, rates: mp.Queue) -> None:
    ring = engine.Ring.attach(name)
    recs = make_descriptors(count)
    while time.time() < start_at:
        time.sleep(1e-4)
    began = time.perf_counter()
    done = 0
    while done < count:
        pushed = ring.push(recs[done : done + batch])
        done += pushed
        if not pushed:
            time.sleep(0)  # the ring is full: let the consumer run
    rates.put(count / (time.perf_counter() - began))
    ring.close()


def measure(count: int, batch: int, capacity: int, with_proxy: bool) -> tuple[float, float]:
    """(consumer descriptors/s, producer descriptors/s)."""
    ctx = mp.get_context("spawn")
    rates = ctx.Queue()
    with engine.Ring.create(capacity) as ring:
        start_at = time.time() + 1.5  # let the producer import and attach first
        proc = ctx.Process(target=produce, args=(ring.name, count, batch, start_at, rates))
        proc.start()
        if with_proxy:
            window = engine.Window.create(4, 2 * SLOTS * PUT_BYTES)
            proxy = engine.Proxy("shm", stay_awake_us=2000)
            endpoint, key = proxy.add_endpoint(ring, window, 1)
            proxy.set_rank(endpoint, 0, proxy.connect(proxy.address()), key)
            try:
                first = None
                deadline = time.monotonic() + 120
                while True:
                    taken = proxy.stats()["descriptors"]
                    now = time.perf_counter()
                    if taken and first is None:
                        first = (taken, now)
                    if taken >= count or time.monotonic() > deadline:
                        break
                    time.sleep(2e-4)
                if taken < count:
                    raise TimeoutError(f"the proxy took {taken} of {count} descriptors")
                rate = (taken - first[0]) / (now - first[1])
            finally:
                proxy.remove_endpoint(endpoint, 5.0)
                proxy.destroy()
                window.close()
        else:
            taken, seconds = ring.consume(count, 120)
            if taken < count:
                raise TimeoutError(f"the consumer took {taken} of {count} descriptors")
            rate = taken / seconds
        proc.join(timeout=60)
        return rate, rates.get(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2_000_000)
    parser.add_argument("--batch", type=int, default=256, help="descriptors per producer push")
    parser.add_argument("--capacity", type=int, default=4096)
    args = parser.parse_args()
    ring_rate, ring_producer = measure(args.count, args.batch, args.capacity, with_proxy=False)
    proxy_rate, proxy_producer = measure(args.count, args.batch, args.capacity, with_proxy=True)
    print(f"{args.count} descriptors, producer batches of {args.batch}, ring of {args.capacity}")
    print(f"{'path':<48}{'descriptors/s':>16}{'producer/s':>16}")
    print(f"{'ring only (compiled pop loop)':<48}{ring_rate:>16,.0f}{ring_producer:>16,.0f}")
    print(f"{'ring + compiled proxy + shm put (64 B)':<48}{proxy_rate:>16,.0f}{proxy_producer:>16,.0f}")
    print(f"proxy path / ring alone: {proxy_rate / ring_rate:.2f}")


if __name__ == "__main__":
    main()
