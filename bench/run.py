"""``portep bench``: HT and LL dispatch/combine on local ranks, beside the all_to_all_single baseline and the
machine's copy limit, with the cost model fitted to the sweep; writes JSON and PNG plots.

    portep bench [--backend NAME]... [--compare MODULE] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import analysis, report

if TYPE_CHECKING:
    from .machine import Measured
    from .workload import Shape

LL_TOKENS = (8, 16, 32, 64, 128)
HT_TOKENS = (64, 128, 256, 512, 1024)
QUICK_LL_TOKENS = (8, 16)
QUICK_HT_TOKENS = (16, 32)
MEMORY_SHARE = 0.5  # of MemAvailable the LL buffers of all ranks may take
EXPERT_FFN = 2048  # DeepSeek-V3 moe_intermediate_size


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from exc
    if any(v < 1 for v in sizes):
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``portep bench``."""
    parser.add_argument("--ranks", type=int, default=4, help="local ranks (default 4)")
    parser.add_argument("--ranks-per-node", type=int, default=2, help="ranks per virtual node (default 2)")
    parser.add_argument("--backend", action="append", default=None, metavar="NAME",
                        help="portep backend to run (repeatable; default: Buffer's and the collective fallback)")
    parser.add_argument("--compare", action="append", default=[], metavar="MODULE",
                        help="also run a DeepEP-compatible module (e.g. deep_ep) on the same data")
    parser.add_argument("--ll-tokens", type=_sizes, default=None, help=f"LL tokens per rank (default {LL_TOKENS})")
    parser.add_argument("--ht-tokens", type=_sizes, default=None, help=f"HT tokens per rank (default {HT_TOKENS})")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--bf16", action="store_true", help="dispatch in BF16 (default: FP8, as DeepEP's tests)")
    parser.add_argument("--min-iters", type=int, default=None, help="timed iterations per point, at least")
    parser.add_argument("--max-iters", type=int, default=None, help="timed iterations per point, at most")
    parser.add_argument("--point-budget-s", type=float, default=None, help="seconds of timing per point (about)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="seconds per backend (half per mode); larger sizes past it are skipped (default 150)")
    parser.add_argument("--gamma", type=float, default=1.1, help="straggler factor for the overlap model")
    parser.add_argument("--c-tok-us", type=float, default=None,
                        help="expert compute per routed token (us); default: measured here")
    parser.add_argument("--ffn", type=int, default=EXPERT_FFN, help="expert MLP width for measuring c_tok")
    parser.add_argument("--c-tok-threads", type=int, default=None,
                        help="torch threads for measuring c_tok (default: a rank's share, CPUs // ranks)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the compared modules")
    parser.add_argument("--quick", action="store_true", help="small sizes and few iterations (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="deadline of each launch of ranks")


def _fail(message: str) -> int:
    print(f"portep bench: {message}", file=sys.stderr)
    return 2


def _cap_ll_sizes(sizes: tuple[int, ...], shape: Shape, ranks: int) -> tuple[tuple[int, ...], str]:
    """Drop LL sizes whose buffers (all ranks) would take more than MEMORY_SHARE of the available memory."""
    from portep.ll_layout import low_latency_rdma_size_hint

    from . import machine

    avail = machine.available_memory()
    if avail is None:
        return sizes, ""
    budget = MEMORY_SHARE * avail
    kept = tuple(n for n in sizes
                 if ranks * low_latency_rdma_size_hint(n, shape.hidden, ranks, shape.num_experts) <= budget)
    note = ""
    if kept != sizes:
        note = (f"LL sizes above {max(kept, default=0)} tokens per rank skipped: their buffers would exceed "
                f"{MEMORY_SHARE:.0%} of the {avail / 2**30:.1f} GiB available")
    return kept, note


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; 0 when every result matched the reference."""
    from portep import backends
    from portep.errors import PortepError
    from portep.launch import run_local

    from . import machine, plots
    from .ranks import JobSpec
    from .workload import Shape

    # Default: the backend Buffer uses, side by side with the collective fallback.
    names = args.backend or list(dict.fromkeys([backends.default_backend_name(), "collective"]))
    unknown = [n for n in names if n not in backends.available()]
    if unknown:
        return _fail(f"unknown backend(s) {unknown}; registered: {backends.available()}")
    missing = [m for m in args.compare if importlib.util.find_spec(m) is None]
    if missing:
        return _fail(f"cannot compare with {', '.join(missing)}: not installed (pip install it, e.g. DeepEP from "
                     "https://github.com/deepseek-ai/DeepEP, then rerun)")
    if args.ranks < 1 or args.ranks_per_node < 1 or args.ranks % args.ranks_per_node:
        return _fail(f"--ranks-per-node {args.ranks_per_node} must divide --ranks {args.ranks}")
    if args.experts % args.ranks:
        return _fail(f"--experts {args.experts} must be a multiple of --ranks {args.ranks}")
    shape = Shape(hidden=args.hidden, topk=args.topk, num_experts=args.experts, fp8_dispatch=not args.bf16)
    quick = args.quick
    ll_tokens = args.ll_tokens or (QUICK_LL_TOKENS if quick else LL_TOKENS)
    ht_tokens = args.ht_tokens or (QUICK_HT_TOKENS if quick else HT_TOKENS)
    ll_tokens, note = _cap_ll_sizes(ll_tokens, shape, args.ranks)
    spec = JobSpec("portep", "portep", shape, ll_tokens, ht_tokens,
                   min_iters=args.min_iters or (3 if quick else 5), max_iters=args.max_iters or (5 if quick else 50),
                   point_budget_s=args.point_budget_s or (0.3 if quick else 3.0),
                   time_budget_s=args.time_budget_s or (60.0 if quick else 150.0), progress=not args.no_progress,
                   device="cpu")
    started = time.time()
    print(f"portep bench: {args.ranks} ranks ({args.ranks // args.ranks_per_node} nodes x {args.ranks_per_node}), "
          f"hidden {shape.hidden}, top-{shape.topk} of {shape.num_experts} experts, "
          f"{'FP8' if shape.fp8_dispatch else 'BF16'} dispatch, BF16 combine; LL {list(ll_tokens)}, "
          f"HT {list(ht_tokens)} tokens per rank; backends {names}")
    if note:
        print(f"note: {note}")
    copy = machine.copy_bandwidth(64 << 20 if quick else 256 << 20)
    print(f"machine limit: memory copy {copy.value / 1e9:.2f} GB/s{report.verdict(copy.problems)} (largest of "
          f"{len(copy.samples_s)} copies of {copy.params['bytes'] >> 20} MiB)")

    jobs = [(spec, {"PORTEP_BACKEND": name}) for name in names]
    jobs += [(replace(spec, impl=m, module=m, device=args.device), {}) for m in args.compare]
    points: list[analysis.Point] = []
    failures: list[dict] = []
    skipped: list[str] = []
    for job, env in jobs:
        # The baseline runs once, with the first launch that succeeds.
        job = replace(job, with_baseline=not any(p.impl == "baseline" for p in points))
        label = f"{job.impl} {env.get('PORTEP_BACKEND', '')}".strip()
        try:
            results = run_local(_rank_entry(), args.ranks, (job,), ranks_per_node=args.ranks_per_node,
                                timeout_s=args.timeout_s, env=env)
        except PortepError as exc:
            print(f"portep bench: {label} failed: {exc}", file=sys.stderr)
            failures.append({"run": label, "error": str(exc)})
            continue
        points += analysis.merge_ranks(results, copy.value)
        for mode, sizes in results[0]["skipped"].items():
            if sizes:
                skipped.append(f"{label} {mode} {sizes} tokens per rank (time budget)")
    if skipped:
        print(f"skipped: {'; '.join(skipped)}")
    if not points:
        return 1

    c_tok, source = _expert_cost(args, shape.hidden)
    trips = analysis.round_trips(points)
    fitted = analysis.fits(trips)
    summary = analysis.model_summary(fitted, c_tok.value, args.gamma, args.ranks, shape.topk, shape.hidden,
                                     shape.fp8_dispatch, c_tok.problems)
    c_tok_info = {**asdict(c_tok), "source": source}
    model_text = report.model_lines(summary, c_tok_info, args.gamma, args.ranks, shape.topk)

    print()
    print("\n".join(report.results_table(points)))
    print()
    print("\n".join(report.fits_table(fitted)))
    print("\n".join(model_text))
    flagged = sum("not a result:" in line for line in [*report.fits_table(fitted)[1:], *model_text])
    if flagged:
        print(f"note: {flagged} line(s) above hold figures marked \"not a result\": they failed the checks "
              "(fit R^2 and points, c_tok repeats and FLOP rate, batch of at least 1 token per rank)")

    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"portep bench: {args.ranks} ranks ({args.ranks // args.ranks_per_node}x{args.ranks_per_node}), "
             f"d={shape.hidden}, top-{shape.topk}/{shape.num_experts}, {machine.describe()['machine']['cpu']}")
    figures = [plots.time_vs_payload(trips, fitted, args.out / "time_vs_payload.png", title),
               plots.versus_baseline(trips, args.out / "vs_baseline.png", title)]
    doc = {
        "schema": "portep-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "command": ["portep", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv,
        **machine.describe(),
        "parameters": {"ranks": args.ranks, "ranks_per_node": args.ranks_per_node, "backends": names,
                       "compare": args.compare, "shape": asdict(shape), "ll_tokens": list(ll_tokens),
                       "ht_tokens": list(ht_tokens), "min_iters": spec.min_iters, "max_iters": spec.max_iters,
                       "point_budget_s": spec.point_budget_s, "time_budget_s": spec.time_budget_s,
                       "gamma": args.gamma, "note": note, "skipped": skipped,
                       "fit": "t = 2(L + V/BW) per series, least squares on relative error with L >= 0; V = mean "
                              "of dispatch and combine bytes per rank, t = median dispatch + median combine",
                       "byte_counting": "DeepEP: LL per selection (FP8 hidden+hidden/128*4+16, BF16 2*hidden); "
                                        "HT per received token copy (BF16 2*hidden, FP8 x (1+4/128)/2)"},
        "limit": {"what": "memory copy (torch Tensor.copy_)", **asdict(copy)},
        "expert_mlp": c_tok_info,
        "validation": analysis.validation_rules(),
        "points": [p.as_dict() for p in points],
        "round_trips": [asdict(rt) for rt in trips],
        "fits": [analysis.fit_record(k, f) for k, f in fitted.items()],
        "model": summary,
        "figures": [str(f) for f in figures],
        "failures": failures,
    }
    out_json = args.out / "bench.json"
    out_json.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    out_md = args.out / "summary.md"
    out_md.write_text(report.markdown_summary(points, fitted, model_text))
    written = ", ".join(str(f) for f in (out_json, out_md, *figures))
    print(f"\nwrote {written} ({time.time() - started:.0f} s)")
    if failures:
        print(f"portep bench: {len(failures)} run(s) failed: {', '.join(f['run'] for f in failures)}", file=sys.stderr)
    return 1 if failures else 0


def _expert_cost(args: argparse.Namespace, hidden: int) -> tuple[Measured, str]:
    """``c_tok``: given by ``--c-tok-us`` (checked only for sign), or measured with a rank's share of the CPUs."""
    from . import machine

    if args.c_tok_us is not None:
        problems = [] if args.c_tok_us > 0 else [f"given c_tok {args.c_tok_us:g} us is not positive"]
        return machine.Measured(args.c_tok_us * 1e-6, "s/token", [], {"hidden": hidden, "ffn": args.ffn,
                                                                       "dtype": "given"}, problems), "given"
    threads = args.c_tok_threads or max(1, (os.cpu_count() or 1) // args.ranks)
    return machine.expert_cost_per_token(hidden, args.ffn, threads=threads), "measured"


def _rank_entry():  # noqa: ANN202 - a module-level function the spawned ranks can import
    from portep.bench.ranks import run_rank

    return run_rank
