"""Two emulated hosts on one machine: network namespaces joined by a veth pair.

Each host is a network namespace with its own address on a private /24; commands started on a
host also get their own UTS, IPC and mount namespaces, in which the host sets its host name,
mounts a private tmpfs on ``/dev/shm``, bind-mounts an ``/etc/hosts`` that maps every host name
to its veth address (so that ``gethostbyname(gethostname())`` is the host's address, as on a real
cluster) and its own ``/proc/sys/kernel/random/boot_id``. The boot id and the IPC namespace
matter: UCX takes two processes with the same boot id for processes of one machine and would
move their data through shared memory (System V segments, cross-memory attach) instead of the
network. The file system is otherwise shared. Needs root; :func:`unavailable_reason` says why
not where the machine does not allow it.

Every mount happens inside the command's own mount namespace (made recursively private first):
the machine's ``/dev/shm`` and ``/etc/hosts`` are never touched.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SUBNET = "10.213.7"  # a private /24 that exists only between the two namespaces
PREFIX_LEN = 24
_TOOLS = ("ip", "unshare", "mount", "hostname", "sh")
BOOT_ID = "/proc/sys/kernel/random/boot_id"
_TERM_GRACE_S = 3.0  # launchers stop their workers on SIGTERM
_KILL_WAIT_S = 10.0

# Run inside the new mount, UTS and IPC namespaces of a host, then exec the command ("$@").
_HOST_SETUP = """set -e
mount --make-rprivate /
hostname {hostname}
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind {hosts_file} /etc/hosts
mount --bind {boot_id_file} {boot_id}
exec "$@"
"""


@dataclass(frozen=True)
class Host:
    """One emulated host: its host name, network namespace, veth interface and address."""

    hostname: str
    netns: str
    ifname: str
    address: str


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def _check(argv: Sequence[str]) -> None:
    """Run ``argv``; raise RuntimeError with its output if it fails."""
    proc = _run(argv)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise RuntimeError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {output}")


def host_wrapper(host: Host, hosts_file: Path, boot_id_file: Path) -> list[str]:
    """The argv prefix that runs a command (appended to it) on ``host``: ``hosts_file`` becomes its
    ``/etc/hosts``, ``boot_id_file`` its boot id."""
    script = _HOST_SETUP.format(hostname=shlex.quote(host.hostname), hosts_file=shlex.quote(str(hosts_file)),
                                boot_id_file=shlex.quote(str(boot_id_file)), boot_id=BOOT_ID)
    return ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--ipc", "sh", "-c", script, "sh"]


@functools.cache
def unavailable_reason() -> str | None:
    """Why two hosts cannot be emulated here (None: they can). Tries every step once."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and mounts)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tool(s): {', '.join(missing)}"
    workdir = Path(tempfile.mkdtemp(prefix="portep-netns-probe-"))
    probe = TwoHosts(workdir, tag=f"probe{os.getpid()}")
    try:
        try:
            _check(["ip", "netns", "list"])
        except RuntimeError as exc:
            return f"`ip netns` is unavailable: {exc}"
        try:
            probe.create_network()
        except RuntimeError as exc:
            return f"cannot create network namespaces joined by a veth pair: {exc}"
        probe.write_files()
        try:
            _check([*probe.wrapper(probe.hosts[0]), "true"])
        except RuntimeError as exc:
            return (f"cannot start a command with its own mount, UTS and IPC namespaces, host name, "
                    f"/dev/shm, /etc/hosts and boot id: {exc}")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run the namespace tools: {exc}"
    finally:
        probe.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    return None


class TwoHosts:
    """Context manager: two hosts (``hostA``, ``hostB``) in namespaces joined by a veth pair.

    ``workdir`` (on the shared file system) receives the ``hosts`` file and the hosts' boot ids.
    On exit every process in either namespace is killed and the namespaces (with the veth pair)
    are deleted, whatever happened inside.
    """

    def __init__(self, workdir: Path, tag: str | None = None) -> None:
        tag = tag or f"{os.getpid()}"
        self.workdir = workdir
        self.hosts_file = workdir / "hosts"
        self.hosts = [
            Host(hostname=f"host{letter.upper()}", netns=f"portep-{tag}-{letter}",
                 ifname=f"pep{tag}{letter}"[-15:], address=f"{SUBNET}.{index + 1}")
            for index, letter in enumerate("ab")
        ]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._created: list[str] = []

    # ------------------------------------------------------------------------------ setup
    def create_network(self) -> None:
        """Namespaces, veth pair with one end in each, addresses, links and loopback up."""
        for host in self.hosts:
            _check(["ip", "netns", "add", host.netns])
            self._created.append(host.netns)
        a, b = self.hosts
        _check(["ip", "link", "add", a.ifname, "netns", a.netns, "type", "veth",
                "peer", "name", b.ifname, "netns", b.netns])
        for host in self.hosts:
            _check(["ip", "-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", host.ifname])
            _check(["ip", "-n", host.netns, "link", "set", host.ifname, "up"])
            _check(["ip", "-n", host.netns, "link", "set", "lo", "up"])

    def write_files(self) -> None:
        """The ``/etc/hosts`` every host sees (loopback, then each host name at its veth address)
        and a fresh boot id per host."""
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{host.address} {host.hostname}" for host in self.hosts]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        for host in self.hosts:
            self.boot_id_file(host).write_text(f"{uuid.uuid4()}\n")

    def boot_id_file(self, host: Host) -> Path:
        """The file ``host`` sees as its boot id."""
        return self.workdir / f"boot_id.{host.hostname}"

    def wrapper(self, host: Host) -> list[str]:
        """The argv prefix that runs a command on ``host``."""
        return host_wrapper(host, self.hosts_file, self.boot_id_file(host))

    def __enter__(self) -> TwoHosts:
        try:
            self.create_network()
            self.write_files()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()

    # ------------------------------------------------------------------------------ processes
    def start(self, host: Host, argv: Sequence[str], env: Mapping[str, str], log: Path,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host`` with ``env``; its stdout and stderr go to ``log``."""
        with open(log, "wb") as out:
            proc = subprocess.Popen([*self.wrapper(host), *argv], env=dict(env), cwd=cwd,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait(self, timeout_s: float) -> list[int | None]:
        """Wait until every started process exits or ``timeout_s`` passes; their exit codes
        (None for a process still running)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        return [p.poll() for p in self.procs]

    def _pids_in(self, netns: str) -> list[int]:
        try:
            proc = _run(["ip", "netns", "pids", netns], timeout=10)
        except (OSError, subprocess.SubprocessError):
            return []
        return [int(pid) for pid in proc.stdout.split() if pid.isdigit()] if proc.returncode == 0 else []

    def _kill_all(self) -> None:
        """SIGTERM the started processes, then SIGKILL whatever still runs in the namespaces."""
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        grace = time.monotonic() + _TERM_GRACE_S
        while running and time.monotonic() < grace and any(proc.poll() is None for proc in running):
            time.sleep(0.1)
        deadline = time.monotonic() + _KILL_WAIT_S
        while True:
            pids = [pid for netns in self._created for pid in self._pids_in(netns)]
            pids = [pid for pid in pids if pid != os.getpid()]
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def teardown(self) -> None:
        """Kill every process on the hosts, delete the veth pair and the namespaces (best effort,
        idempotent)."""
        self._kill_all()
        if self._created:
            a = self.hosts[0]
            if a.netns in self._created:
                _run(["ip", "-n", a.netns, "link", "del", a.ifname], timeout=10)
        while self._created:
            _run(["ip", "netns", "del", self._created.pop()], timeout=10)
