"""Shared-memory transport: same-host peers write straight into each other's windows.

It stands in for NVLink / xGMI on a CPU: a put is one copy from this rank's window into the
peer's, and a signal is a store into the peer's signal counters made after the copy, so nothing
ever waits on the receiver. Peers are found by the window's segment name (the address).
"""

from __future__ import annotations

import json

import numpy as np

from portep.proxy.window import Window

from .transport import Transport


class ShmTransport(Transport):
    """Puts between windows in ``/dev/shm`` of one host."""

    name = "shm"

    def __init__(self, rank: int, window: Window) -> None:
        super().__init__(rank)
        self.window = window
        self.peers: dict[int, Window] = {}

    def register(self, region: np.ndarray, num_signal_slots: int, signal_values: np.ndarray | None = None) -> None:
        if signal_values is None or region.base is None:
            raise ValueError("shm: the registered region and signals must be the window's own arrays")
        super().register(region, num_signal_slots, signal_values)

    def address(self) -> bytes:
        w = self.window
        return json.dumps({"name": w.name, "num_signals": w.num_signals, "data_bytes": w.data_bytes}).encode()

    def connect(self, peer: int, address: bytes) -> None:
        spec = json.loads(address)
        self.peers[peer] = Window.attach(spec["name"], spec["num_signals"], spec["data_bytes"])

    def _peer(self, peer: int) -> Window:
        try:
            return self.peers[peer]
        except KeyError:
            raise ValueError(f"shm: rank {self.rank} is not connected to rank {peer}") from None

    def put(self, peer: int, src_offset: int, dst_offset: int, length: int) -> None:
        target = self._peer(peer)
        if dst_offset < 0 or dst_offset + length > target.data_bytes:
            raise ValueError(f"shm: put of {length} bytes at {dst_offset} is outside rank {peer}'s "
                             f"{target.data_bytes}-byte window")
        target.data[dst_offset : dst_offset + length] = self.region[src_offset : src_offset + length]

    def put_with_signal(self, peer: int, src_offset: int, dst_offset: int, length: int, slot: int,
                        value: int) -> None:
        self.put(peer, src_offset, dst_offset, length)
        self._peer(peer).signals[slot] += value  # after the bytes: stores stay in order on x86

    def poll(self, max_messages: int | None = None) -> int:
        return 0  # peers write into our window themselves

    def close(self) -> None:
        for window in self.peers.values():
            window.close()
        self.peers.clear()
