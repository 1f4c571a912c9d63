"""The proxy process: one per NIC, serving the descriptor rings of the rank that started it.

It runs apart from the rank so the two never share a GIL. Start-up is a short conversation on
stdin/stdout (JSON lines) with :class:`~portep.proxy.process.ProxyProcess`:

1. the rank sends its configuration (window, rings, transport, deadline);
2. the proxy opens the transport and answers with its address;
3. the rank sends every peer's address (gathered by the control plane); the proxy connects and
   answers ``ready``.

Then it loops — drain rings, post, progress, publish stats into the window's control block —
until the rank asks it to stop, or the rank's process is gone (so no proxy outlives its rank).
It imports neither torch nor the rank's Python state, so it starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
import traceback
from typing import Any

from portep.backends.faults import FAULTS_ENV, Faults
from portep.backends.transport import MessageTransport
from portep.errors import PortepError

from .loop import Proxy
from .ring import DescriptorRing, backoff, unlink_untracked
from .window import Control, ProxyState, Window

STATS_PERIOD_S = 0.02
# After this long without work the proxy stops polling and blocks until its rank wakes it (or
# SLEEP_S passes, to watch for stop requests and a dead rank): idle proxies of many Buffers must
# not starve the ranks they share cores with.
DEEP_IDLE_S = 0.2
SLEEP_S = 0.05
# On a stop request the proxy first posts what its rings still hold and waits (this long at most)
# for its transport to finish sending, so the rank's last message is not cut off.
STOP_DRAIN_S = 2.0


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _receive() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)  # the rank went away during start-up
    return json.loads(line)


def publish(proxy: Proxy, window: Window, steps: int) -> None:
    """Copy the proxy's counters into the window, where the rank (and ``portep status``) reads them."""
    s, c = proxy.stats, window.control
    c[Control.STEPS] = steps
    c[Control.DESCRIPTORS] = s.descriptors
    c[Control.PUTS] = s.puts_posted
    c[Control.BYTES] = s.bytes_posted
    c[Control.SIGNALS] = s.signals_posted
    c[Control.COALESCED] = s.coalesced
    c[Control.MAX_QUEUE_DEPTH] = s.max_queue_depth
    c[Control.IDLE_POLLS] = s.idle_polls
    c[Control.MESSAGES_IN] = getattr(proxy.transport, "messages_in", 0)
    c[Control.STALLS] = getattr(proxy.transport, "stalls", 0)


def sleep_until_woken(proxy: Proxy, window: Window, wake_fd: int) -> bool:
    """Block until the rank writes to ``wake_fd`` or :data:`SLEEP_S` passes; False if the rank is gone."""
    window.control[Control.SLEEPING] = 1
    try:
        if any(ring.pending() for ring in proxy.rings):  # pushed before it saw SLEEPING: no lost wake-up
            return True
        readable, _, _ = select.select([wake_fd], [], [], SLEEP_S)
        if readable:
            window.control[Control.WAKEUPS] += 1
            return bool(os.read(wake_fd, 4096))  # EOF: the rank closed the pipe (it exited)
        return True
    finally:
        window.control[Control.SLEEPING] = 0


def serve(proxy: Proxy, window: Window, parent_pid: int, wake_fd: int) -> bool:
    """The loop: step, back off when idle (then sleep until woken), publish stats, watch for stop
    and for a dead rank. Returns False when the rank died."""
    steps = idle = 0
    last = last_work = time.monotonic()
    while True:
        steps += 1
        if proxy.step():
            idle = 0
            last_work = time.monotonic()
        else:
            proxy.stats.idle_polls += 1
            if time.monotonic() - last_work > DEEP_IDLE_S:
                if not sleep_until_woken(proxy, window, wake_fd):
                    return os.getppid() == parent_pid
            else:
                backoff(idle)
            idle += 1
        now = time.monotonic()
        if now - last >= STATS_PERIOD_S:
            last = now
            publish(proxy, window, steps)
            if os.getppid() != parent_pid:
                return False
            if window.control[Control.STOP]:
                drain(proxy, STOP_DRAIN_S)
                return True


def drain(proxy: Proxy, timeout_s: float) -> None:
    """Post every descriptor left in the rings, then wait up to ``timeout_s`` for the transport to
    complete its sends. Best effort: a peer that is gone must not keep the proxy from exiting."""
    deadline = time.monotonic() + timeout_s
    while any(ring.pending() for ring in proxy.rings) and time.monotonic() < deadline:
        proxy.step()
    try:
        proxy.transport.flush(max(deadline - time.monotonic(), 0.0))
    except PortepError:
        pass


def main() -> int:
    config = _receive()
    from portep.backends.transports import create_transport

    window = Window.attach(config["window"], config["num_signals"], config["data_bytes"])
    rings = [DescriptorRing.attach(name) for name in config["rings"]]
    transport = None
    try:
        transport = create_transport(config["transport"], config["rank"], world_size=config["world_size"],
                                     window=window, timeout_s=config["timeout_s"])
        transport.register(window.data, window.num_signals, window.signals)
        faults = Faults.from_env()
        if faults is not None:
            if not isinstance(transport, MessageTransport):
                raise ValueError(f"{FAULTS_ENV} needs a message transport; {transport.name} writes memory directly")
            transport.inject_faults(faults)
        _send({"address": transport.address().hex(), "transport": transport.name})
        peers = _receive()["peers"]
        for peer, address in peers.items():
            transport.connect(int(peer), bytes.fromhex(address))
        window.control[Control.PID] = os.getpid()
        window.control[Control.STATE] = ProxyState.READY
        _send({"ready": True})
        rank_alive = serve(Proxy(rings, transport), window, config["parent_pid"], sys.stdin.fileno())
        window.control[Control.STATE] = ProxyState.STOPPED
        if not rank_alive:  # its rank was killed: remove the rank's segments, nobody else will
            for segment in [window.segment, *(ring.segment for ring in rings)]:
                unlink_untracked(segment)
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the rank, then the process exits
        if isinstance(exc, SystemExit):
            raise
        window.control[Control.STATE] = ProxyState.FAILED
        detail = f"{type(exc).__name__}: {exc}"
        _send({"error": detail})
        traceback.print_exc(file=sys.stderr)
        return 1
    finally:
        if transport is not None:
            transport.close()
        for ring in rings:
            ring.close()
        window.close()


if __name__ == "__main__":
    sys.exit(main())
