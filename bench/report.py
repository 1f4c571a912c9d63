"""Text output of ``portep bench``: the results table, the fits, and the model's conclusions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from portep.costmodel import LinkFit

from .analysis import Point


def _table(rows: Sequence[Sequence[str]], right_from: int = 3) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in
                      enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]


def results_table(points: Sequence[Point]) -> list[str]:
    """One row per implementation, backend, mode, size and op, with the baseline and limit beside it."""
    base = {(p.mode, p.tokens, p.op): p for p in points if p.impl == "baseline"}
    header = ("impl", "backend", "mode", "tokens", "op", "median ms", "p99 ms", "GB/s", "iters",
              "baseline ms", "x baseline", "limit ms", "of limit")
    rows = [header]
    order = {"LL": 0, "HT": 1}
    for p in sorted((p for p in points if p.impl != "baseline"),
                    key=lambda p: (p.impl, p.backend, order.get(p.mode, 2), p.tokens, p.op != "dispatch")):
        b = base.get((p.mode, p.tokens, p.op))
        rows.append((p.impl, p.backend, p.mode, str(p.tokens), p.op, f"{p.median_s * 1e3:.3f}", f"{p.p99_s * 1e3:.3f}",
                     f"{p.bandwidth_Bps / 1e9:.2f}", str(len(p.samples_s)),
                     f"{b.median_s * 1e3:.3f}" if b else "-", f"{b.median_s / p.median_s:.2f}x" if b else "-",
                     f"{p.limit_s * 1e3:.3f}", f"{p.limit_s / p.median_s:.1%}"))
    return _table(rows, right_from=3)


def fits_table(fitted: dict[tuple[str, str, str], LinkFit]) -> list[str]:
    """``L``, ``BW`` and R^2 of every fitted series."""
    rows = [("fit t = 2(L + V/BW) (relative LSQ)", "series", "L us", "BW GB/s", "R^2", "points")]
    for (impl, backend, mode), f in sorted(fitted.items()):
        bw = "inf" if math.isinf(f.bandwidth_Bps) else f"{f.bandwidth_GBps:.2f}"
        rows.append((f"{impl} {backend}", mode, f"{f.latency_us:.0f}", bw, f"{f.r2:.3f}", str(f.samples)))
    return _table(rows, right_from=2)


def model_lines(summary: Sequence[dict], c_tok: dict, gamma: float, ranks: int, topk: int) -> list[str]:
    """Crossover and minimum batch for overlap, per implementation and backend."""
    params = c_tok["params"]
    lines = [f"expert MLP {params['hidden']}->{params['ffn']}->{params['hidden']} ({params['dtype']}, "
             f"{c_tok['source']}): c_tok = {c_tok['value'] * 1e6:.1f} us per routed token; "
             f"gamma = {gamma:g}, P = {ranks}, k = {topk}"]
    for s in summary:
        name = f"{s['impl']} {s['backend']}"
        cr = s.get("crossover")
        if cr is not None:
            if cr["payload_bytes"] is None:
                lines.append(f"{name}: LL/HT crossover: none ({cr['note']})")
            else:
                lines.append(f"{name}: LL/HT crossover V* = {cr['payload_bytes'] / 1e6:.2f} MB per rank per direction "
                             f"({cr['note']})")
        for mode in ("LL", "HT"):
            ob = s.get(f"overlap_{mode}")
            if ob is None:
                continue
            value = "impossible (wire time per token exceeds compute)" if not ob["feasible"] else \
                f"B >= {ob['min_batch']:,.0f} tokens" if ob["min_batch"] >= 10 else f"B >= {ob['min_batch']:.2g} tokens"
            lines.append(f"{name}: dual-batch overlap with {mode}: {value} "
                         f"(gamma*c_tok {ob['compute_per_token_s'] * 1e6:.1f} us vs wire "
                         f"{ob['comm_per_token_s'] * 1e6:.2f} us per token)")
    return lines


def markdown_summary(points: Sequence[Point], fitted: dict[tuple[str, str, str], LinkFit]) -> str:
    """Round trips per mode and size (median and p99 of each op, beside the baseline and the limit), then the fits."""
    by_size: dict[tuple, dict[str, Point]] = {}
    for p in points:
        by_size.setdefault((p.impl, p.backend, p.mode, p.tokens), {})[p.op] = p
    lines = ["| impl | mode | tokens/rank | dispatch median / p99 ms | GB/s | combine median / p99 ms | GB/s "
             "| baseline round trip ms | x baseline | of limit |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"LL": 0, "HT": 1}
    for (impl, backend, mode, tokens), ops in sorted(by_size.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                     order.get(kv[0][2], 2), kv[0][3])):
        if impl == "baseline" or set(ops) != {"dispatch", "combine"}:
            continue
        d, c = ops["dispatch"], ops["combine"]
        base = by_size.get(("baseline", "all_to_all_single", mode, tokens), {})
        rt = d.median_s + c.median_s
        base_rt = sum(p.median_s for p in base.values()) if len(base) == 2 else None
        lines.append(f"| {impl} {backend} | {mode} | {tokens} | {d.median_s * 1e3:.2f} / {d.p99_s * 1e3:.2f} "
                     f"| {d.bandwidth_Bps / 1e9:.2f} | {c.median_s * 1e3:.2f} / {c.p99_s * 1e3:.2f} "
                     f"| {c.bandwidth_Bps / 1e9:.2f} | {f'{base_rt * 1e3:.2f}' if base_rt else '-'} "
                     f"| {f'{base_rt / rt:.2f}x' if base_rt else '-'} | {(d.limit_s + c.limit_s) / rt:.1%} |")
    lines += ["", "| fit t = 2(L + V/BW) | series | L (us) | BW (GB/s) | R^2 |", "|---|---|---:|---:|---:|"]
    for (impl, backend, mode), f in sorted(fitted.items()):
        bw = "inf" if math.isinf(f.bandwidth_Bps) else f"{f.bandwidth_GBps:.2f}"
        lines.append(f"| {impl} {backend} | {mode} | {f.latency_us:.0f} | {bw} | {f.r2:.3f} |")
    return "\n".join(lines) + "\n"
