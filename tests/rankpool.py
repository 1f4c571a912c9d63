"""A pool of long-lived worker processes, one per rank, that run test tasks collectively.

Each worker initialises ``torch.distributed`` (gloo on 127.0.0.1) once, then loops: it receives a
task ``(module_name, function_name, kwargs)``, imports the module, calls
``fn(rank, world_size, **kwargs)`` and sends back the result or the formatted traceback.
Starting torch costs seconds, so a pool lives for the whole test session.

Robustness:

* :meth:`RankPool.run` waits at most ``timeout`` seconds; on timeout it kills every worker
  (SIGKILL), removes the ``/dev/shm`` segments they had mapped, and raises naming the ranks that
  did not answer. The next ``run`` starts a fresh pool.
* Workers die with the parent: a watchdog thread polls ``os.getppid()`` and the task pipe.
* Tasks may cache objects (e.g. ``portep.Buffer``) in :func:`worker_cache`; the cache is cleared
  and garbage-collected before a worker exits, so destructors release shared memory.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from portep.launch import free_port

STARTUP_TIMEOUT_S = 120.0
# Once a rank has failed, how long the others may stay silent (e.g. blocked in a collective
# the failed rank never joined) before the pool is declared stuck.
FAILURE_GRACE_S = 15.0
GLOO_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 20.0
SHM_DIR = "/dev/shm"

_CACHE: dict[Any, Any] = {}


def worker_cache() -> dict[Any, Any]:
    """A dict that lives as long as the worker process (empty in the parent)."""
    return _CACHE


def clear_worker_cache() -> None:
    """Drop every cached object (destroying those that need it) and collect garbage."""
    values = list(_CACHE.values())
    _CACHE.clear()
    for value in values:
        if getattr(value, "explicitly_destroy", False) and hasattr(value, "destroy"):
            try:
                value.destroy()
            except Exception:  # noqa: BLE001 - best effort during teardown
                traceback.print_exc()
    del values
    gc.collect()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(3)


def _worker_main(rank: int, world_size: int, port: int, parent_pid: int, conn: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
        )
        conn.send(("ready", os.getpid()))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
        return

    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                break  # the parent went away
            if task is None:
                break
            module_name, function_name, kwargs = task
            try:
                fn: Callable[..., Any] = getattr(importlib.import_module(module_name), function_name)
                result = fn(rank, world_size, **kwargs)
                conn.send(("ok", result))
            except BaseException:  # noqa: BLE001 - report anything to the parent
                conn.send(("error", traceback.format_exc()))
    finally:
        clear_worker_cache()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        conn.close()


def _shm_segments_of(pid: int) -> set[str]:
    """Paths under /dev/shm that process ``pid`` has open or mapped."""
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
                if path.startswith(SHM_DIR + "/"):
                    found.add(path.removesuffix(" (deleted)"))
    except OSError:
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(SHM_DIR + "/"):
                found.add(target.removesuffix(" (deleted)"))
    except OSError:
        pass
    return found


class RankPool:
    """``world_size`` worker processes that run module-level functions collectively.

    Arguments:
        world_size: number of ranks.
        env: environment variables set in every worker before torch is imported.
    """

    def __init__(self, world_size: int, env: dict[str, str] | None = None) -> None:
        self.world_size = world_size
        self.env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self.all_pids: list[int] = []  # every worker ever started, for leak checks

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return bool(self._procs)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs, conns = [], []
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, port, os.getpid(), child_conn, self.env),
                name=f"rankpool-{self.world_size}-r{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            procs.append(proc)
            conns.append(parent_conn)
            self.all_pids.append(proc.pid)
        self._procs, self._conns = procs, conns
        replies = self._collect(STARTUP_TIMEOUT_S, "start-up")
        errors = {r: payload for r, (status, payload) in replies.items() if status != "ready"}
        if errors:
            self.kill()
            raise RuntimeError("rank pool failed to start:\n" + "\n".join(f"[rank {r}] {e}" for r, e in errors.items()))

    def _collect(self, timeout: float, what: str) -> dict[int, tuple[str, Any]]:
        """Wait for one reply from every rank; on timeout kill the pool and raise."""
        __tracebackhide__ = True
        start = time.monotonic()
        deadline = start + timeout
        replies: dict[int, tuple[str, Any]] = {}
        failed_at = 0.0
        while len(replies) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in replies]
            waitables = [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending]
            mp_connection.wait(waitables, timeout=max(min(deadline - time.monotonic(), 1.0), 0.0))
            for rank in pending:
                conn, proc = self._conns[rank], self._procs[rank]
                try:
                    if conn.poll(0):
                        replies[rank] = conn.recv()
                        continue
                except (EOFError, OSError):
                    pass
                else:
                    if proc.is_alive():
                        continue
                proc.join(timeout=1)
                replies[rank] = ("error", f"worker died (exit code {proc.exitcode})")
            if len(replies) == self.world_size:
                break
            if not failed_at and any(status == "error" for status, _ in replies.values()):
                failed_at = time.monotonic()
                deadline = min(deadline, failed_at + FAILURE_GRACE_S)
            if time.monotonic() >= deadline:
                missing = [r for r in range(self.world_size) if r not in replies]
                failed = {r: p for r, (s, p) in replies.items() if s == "error"}
                self.kill()
                detail = "".join(f"\n----- rank {r} -----\n{p}" for r, p in failed.items())
                raise AssertionError(
                    f"{what}: rank(s) {missing} did not answer within {time.monotonic() - start:.0f} s "
                    f"(pool of {self.world_size} killed){detail}"
                )
        return replies

    def kill(self) -> None:
        """SIGKILL every worker, join them and unlink the shared memory they had mapped."""
        segments: set[str] = set()
        for proc in self._procs:
            if proc.pid is not None:
                segments |= _shm_segments_of(proc.pid)
        for proc in self._procs:
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        for path in segments:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._procs, self._conns = [], []

    def close(self) -> None:
        """Ask the workers to clean up and exit; kill those that do not."""
        if not self._procs:
            return
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for proc in self._procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.1))
        self.kill()  # no-op for workers that exited

    # -- tasks ---------------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], timeout: float = 60.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(rank, world_size, **kwargs)`` on every rank; return the results by rank.

        ``fn`` must be a module-level function (workers import it by name). Raises an
        AssertionError with the traceback of every failing rank, or naming the ranks that did not
        answer within ``timeout`` seconds (the pool is then killed and restarted on next use).
        """
        __tracebackhide__ = True  # pytest: show the test and the ranks' tracebacks, not this frame
        module_name, function_name = fn.__module__, fn.__qualname__
        if module_name == "__main__" or "." in function_name:
            raise ValueError(f"{fn!r} must be a module-level function of an importable module")
        if not self._procs:
            self._start()
        task = (module_name, function_name, kwargs)
        try:
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send(task)
                except OSError as exc:
                    raise AssertionError(f"{function_name}: cannot reach rank {rank}: {exc}") from exc
            replies = self._collect(timeout, function_name)
        except BaseException:
            # Timeout, interruption (e.g. pytest-timeout) or a dead worker: the pool is unusable.
            self.kill()
            raise
        failures = {r: payload for r, (status, payload) in sorted(replies.items()) if status != "ok"}
        if failures:
            if any("worker died" in str(p) for p in failures.values()):
                self.kill()
            raise AssertionError(
                f"{function_name} failed on rank(s) {sorted(failures)}:\n"
                + "\n".join(f"----- rank {r} -----\n{p}" for r, p in failures.items())
            )
        return [replies[r][1] for r in range(self.world_size)]


def live_pids(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still exist (not zombies)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    sys.exit("import this module from the tests")
