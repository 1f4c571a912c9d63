"""The job registry behind ``portep status``: job files of running servers, and the stats table.

A running :class:`~portep.proxy.control.ControlServer` leaves one JSON job file in :func:`run_dir`
(its name, pid, host, address, world size and start time); :func:`list_jobs` finds them and drops
those whose server process is gone, and :func:`format_stats` prints a server's stats.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "PORTEP_RUN_DIR"
JOB_ENV = "PORTEP_JOB"


def run_dir() -> Path:
    """Where running servers leave their job files: ``$PORTEP_RUN_DIR`` or ``<tmp>/portep-<user>/jobs``."""
    value = os.environ.get(RUN_DIR_ENV)
    if value:
        return Path(value)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"portep-{user}" / "jobs"


# ---------------------------------------------------------------------------------------------- job files
def job_name(job: str | None, port: int | None) -> str:
    """A job file's name: ``job``, else ``$PORTEP_JOB``, else ``<hostname>-<pid>-<port>``, made file-safe."""
    name = job or os.environ.get(JOB_ENV) or f"{socket.gethostname()}-{os.getpid()}-{port}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def write_job_file(name: str, address: str, world_size: int, start_time: float) -> Path:
    """Atomically write this process's job file ``<run_dir>/<name>.json``; returns its path."""
    directory = run_dir()
    directory.mkdir(parents=True, exist_ok=True)
    info = {"job": name, "pid": os.getpid(), "host": socket.gethostname(), "address": address,
            "world_size": world_size, "start_time": start_time}
    path = directory / f"{name}.json"
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
    return path


def remove_job_file(path: Path, address: str) -> None:
    """Remove the job file at ``path`` if it still names ``address`` (not another job's of the same name)."""
    try:
        if json.loads(path.read_text()).get("address") == address:
            path.unlink()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------- discovery and display
def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def list_jobs(directory: Path | None = None, clean: bool = True) -> list[dict[str, Any]]:
    """Job files of running servers, oldest first; files whose server process is gone are removed (``clean``)."""
    directory = run_dir() if directory is None else directory
    jobs = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            info = json.loads(path.read_text())
            pid, host = int(info["pid"]), info.get("host")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(info.get("address"), str):
            continue
        if host == socket.gethostname() and not _pid_alive(pid):
            if clean:
                path.unlink(missing_ok=True)
            continue
        info["path"] = str(path)
        jobs.append(info)
    return sorted(jobs, key=lambda info: info.get("start_time", 0))


def _human_bytes(value: Any) -> str:
    """``value`` bytes in B / KiB / MiB / GiB, or ``-`` if it is not a number."""
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _first(stats: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` present in ``stats``, else None."""
    for name in names:
        if name in stats:
            return stats[name]
    return None


def format_stats(stats: Mapping[str, Any]) -> str:
    """A ``portep status`` table: one row per proxy, then rank states and dead ranks.

    Columns come from the reported dicts: ``descriptors``; ``bytes`` (or ``transport_bytes``,
    ``bytes_posted``); ``queue_depth`` (or ``max_queue_depth``); ``stalls`` (or
    ``transport_stalls``). Missing values print as ``-``.
    """
    columns = ("rank", "proxy", "descriptors", "bytes", "queue depth", "stalls", "age (s)")
    rows = []
    for rank, proxies in sorted(stats["proxies"].items()):
        for proxy, entry in sorted(proxies.items()):
            values = entry["stats"]
            cells = [_first(values, "descriptors"),
                     _human_bytes(_first(values, "bytes", "transport_bytes", "bytes_posted")),
                     _first(values, "queue_depth", "max_queue_depth"), _first(values, "stalls", "transport_stalls")]
            rows.append([str(rank), str(proxy), *("-" if v is None else str(v) for v in cells),
                         f"{entry['age_s']:.1f}"])
    lines = []
    if rows:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows)
    else:
        lines.append("no proxy stats reported yet")
    by_state: dict[str, list[int]] = {}
    for rank, entry in sorted(stats["ranks"].items()):
        by_state.setdefault(entry["state"], []).append(rank)
    lines.append("ranks: " + ", ".join(f"{state} {ranks}" for state, ranks in sorted(by_state.items())))
    if stats["dead"]:
        lines.append("dead ranks:")
        lines.extend(f"  rank {rank}: {how}" for rank, how in sorted(stats["dead"].items()))
    else:
        lines.append("dead ranks: none")
    return "\n".join(lines)
