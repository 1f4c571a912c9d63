"""The ``portep`` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="portep", description="Portable expert-parallel communication")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run one HT and one LL dispatch/combine on local ranks")
    demo.add_argument("--ranks", type=int, default=4, help="number of local ranks (default 4)")
    demo.add_argument("--ranks-per-node", type=int, default=2, help="ranks per virtual node (default 2)")
    status = sub.add_parser("status", help="live per-proxy stats and dead ranks of running jobs")
    status.add_argument("--address", help="HOST:PORT of one control server (default: every job file found)")
    status.add_argument("--run-dir", help="where job files are (default $PORTEP_RUN_DIR or /tmp/portep-$USER/jobs)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each server (default 5)")
    status.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    server = sub.add_parser("control-server", help="run a job's control plane (rendezvous, heartbeats, stats)")
    server.add_argument("--world-size", type=int, required=True, help="number of ranks in the job")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    server.add_argument("--heartbeat-timeout-s", type=float, default=None,
                        help="heartbeat silence before a rank is dead (default $PORTEP_HEARTBEAT_TIMEOUT_S or 5)")
    server.add_argument("--job", default=None, help="job name for `portep status` (default $PORTEP_JOB)")
    bench = sub.add_parser("bench", help="benchmark HT and LL dispatch/combine beside a baseline and the machine limit")
    model = sub.add_parser("model", help="evaluate the LL/HT crossover and dual-batch-overlap cost model")
    from portep.bench import model as bench_model
    from portep.bench import run as bench_run

    bench_run.add_arguments(bench)
    bench_model.add_arguments(model)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_run.main(args)
    if args.command == "model":
        return bench_model.main(args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args.ranks, args.ranks_per_node)
    if args.command == "status":
        return _status(args)
    if args.command == "control-server":
        return _control_server(args)
    return 2


def _status(args: argparse.Namespace) -> int:
    """Print each running job's (or ``--address``'s) per-proxy stats and dead ranks."""
    from pathlib import Path

    from portep.proxy.control import fetch_stats, format_stats, list_jobs, run_dir

    from .errors import PortepError

    if args.address:
        jobs: list[dict[str, Any]] = [{"job": args.address, "address": args.address}]
    else:
        directory = Path(args.run_dir) if args.run_dir else run_dir()
        jobs = list_jobs(directory)
        if not jobs:
            print(f"no running portep job found in {directory}")
            return 0
    failed = 0
    report = []
    for job in jobs:
        try:
            stats = fetch_stats(job["address"], args.timeout)
        except (PortepError, ValueError) as exc:
            failed += 1
            report.append({**job, "error": str(exc)})
            if not args.json:
                print(f"job {job['job']} at {job['address']}: unreachable: {exc}\n")
            continue
        report.append({**job, "stats": stats})
        if not args.json:
            pid = f", pid {job['pid']}" if "pid" in job else ""
            print(f"job {job['job']} at {job['address']} (world size {stats['world_size']}{pid}, "
                  f"up {stats['uptime_s']:.0f} s, heartbeat timeout {stats['heartbeat_timeout_s']:g} s)")
            print(format_stats(stats) + "\n")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 1 if failed and args.address else 0


def _control_server(args: argparse.Namespace) -> int:
    """Serve a job's control plane until SIGINT or SIGTERM."""
    from portep.proxy.control import ControlServer

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = ControlServer(args.world_size, args.host, args.port, args.heartbeat_timeout_s, job=args.job).start()
    where = f", job file {server.job_path}" if server.job_path else ""
    print(f"portep control plane listening on {server.address} (world size {args.world_size}{where})", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
