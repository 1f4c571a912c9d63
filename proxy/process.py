"""Starting, watching and stopping a rank's proxy process (see :mod:`portep.proxy.worker`)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import Any

from portep.errors import CommTimeoutError, TransportError

from .ring import DescriptorRing
from .window import Control, ProxyState, Window

STOP_GRACE_S = 5.0


class ProxyProcess:
    """The proxy of one rank: a child process that serves ``rings`` with ``transport``."""

    def __init__(self, rank: int, world_size: int, window: Window, rings: list[DescriptorRing], transport: str,
                 timeout_s: float) -> None:
        self.rank, self.window, self.timeout_s = rank, window, timeout_s
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "portep.proxy.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)
        self._send({"rank": rank, "world_size": world_size, "window": window.name, "num_signals": window.num_signals,
                    "data_bytes": window.data_bytes, "rings": [r.name for r in rings], "transport": transport,
                    "timeout_s": timeout_s, "parent_pid": os.getpid()})
        hello = self._receive("proxy start-up")
        self.address: bytes = bytes.fromhex(hello["address"])
        self.transport_name: str = hello["transport"]

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise TransportError("proxy start-up", f"rank {self.rank}'s proxy exited ({self.describe_exit()})") from exc

    def _receive(self, op: str) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.kill()
            raise CommTimeoutError(op, self.timeout_s, detail=f"rank {self.rank}'s proxy did not answer")
        line = self.proc.stdout.readline()
        message = json.loads(line) if line else {"error": f"exited ({self.describe_exit()})"}
        if "error" in message:
            self.kill()
            raise TransportError(op, f"rank {self.rank}'s proxy: {message['error']}")
        return message

    def connect(self, addresses: dict[int, bytes]) -> None:
        """Give the proxy its peers' addresses and wait until it is connected and serving."""
        self._send({"peers": {str(p): a.hex() for p, a in addresses.items()}})
        self._receive("proxy connect")

    def wake(self) -> None:
        """Wake the proxy if it sleeps (it does after a while without work)."""
        if self.window.control[Control.SLEEPING]:
            try:
                os.write(self.proc.stdin.fileno(), b"w")
            except (BlockingIOError, BrokenPipeError, ValueError, OSError):
                pass  # a full pipe wakes it anyway; a dead proxy is reported by check()

    # ------------------------------------------------------------------ health
    def describe_exit(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def check(self, op: str) -> None:
        """Raise if the proxy is gone or failed."""
        if self.proc.poll() is not None or self.window.control[Control.STATE] == ProxyState.FAILED:
            detail = ""
            if self.proc.poll() is not None:
                line = self.proc.stdout.readline() if self.proc.stdout else ""
                detail = json.loads(line).get("error", "") if line.startswith("{") else ""
            raise TransportError(op, f"rank {self.rank}'s proxy process failed ({self.describe_exit()})"
                                     + (f": {detail}" if detail else ""))

    def stats(self) -> dict[str, int]:
        """The proxy's live counters (read from the window's control block)."""
        c = self.window.control
        return {name.lower(): int(c[word]) for name, word in Control.__members__.items()
                if word not in (Control.STOP, Control.STATE, Control.PID, Control.SLEEPING)}

    # ------------------------------------------------------------------ stopping
    def stop(self) -> None:
        """Ask the proxy to exit; kill it if it does not within a few seconds."""
        if self.proc.poll() is None:
            self.window.control[Control.STOP] = 1
            self.wake()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            deadline = time.monotonic() + STOP_GRACE_S
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass
