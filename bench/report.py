"""Text output of ``portep bench``: the results table, the fits, and the model's conclusions.

A figure that failed its checks is printed with ``[not a result: ...]`` beside it, never on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from portep.costmodel import LinkFit, fit_problems

from .analysis import B2B, Point


def verdict(problems: Sequence[str]) -> str:
    """``""`` for a result, else `` [not a result: a; b]`` to print right after the figure."""
    return f" [not a result: {'; '.join(problems)}]" if problems else ""


def fit_status(fit: LinkFit) -> str:
    """``ok`` or ``not a result: ...``, with the bound the fit rests on."""
    problems = fit_problems(fit)
    status = f"not a result: {'; '.join(problems)}" if problems else "ok"
    return f"{status} (bound {fit.constraint})" if fit.constraint else status


def _table(rows: Sequence[Sequence[str]], right_from: int = 3, right_to: int | None = None) -> list[str]:
    """Aligned columns: right-justified from ``right_from`` up to (not including) ``right_to``."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    end = len(widths) if right_to is None else right_to
    return ["  ".join(c.rjust(w) if right_from <= i < end else c.ljust(w) for i, (c, w) in
                      enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]


def results_table(points: Sequence[Point]) -> list[str]:
    """One row per implementation, backend, mode, size and op, with the baseline and limit beside it."""
    base = {(p.mode, p.tokens, p.op): p for p in points if p.impl == "baseline"}
    header = ("impl", "backend", "mode", "tokens", "op", "median ms", "p99 ms", "GB/s", "iters",
              "baseline ms", "x baseline", "limit ms", "of limit")
    rows = [header]
    order = {"LL": 0, "HT": 1}
    op_order = {"dispatch": 0, "combine": 1}
    for p in sorted((p for p in points if p.impl != "baseline"),
                    key=lambda p: (p.impl, p.backend, order.get(p.mode, 2), p.tokens, op_order.get(p.op, 2))):
        b = base.get((p.mode, p.tokens, p.op))
        rows.append((p.impl, p.backend, p.mode, str(p.tokens), p.op, f"{p.median_s * 1e3:.3f}", f"{p.p99_s * 1e3:.3f}",
                     f"{p.bandwidth_Bps / 1e9:.2f}", str(len(p.samples_s)),
                     f"{b.median_s * 1e3:.3f}" if b else "-", f"{b.median_s / p.median_s:.2f}x" if b else "-",
                     f"{p.limit_s * 1e3:.3f}", f"{p.limit_s / p.median_s:.1%}"))
    return _table(rows, right_from=3)


def fits_table(fitted: dict[tuple[str, str, str], LinkFit]) -> list[str]:
    """``L``, ``BW``, R^2 and status of every fitted series."""
    rows = [("fit t = 2(L + V/BW) (relative LSQ, L >= 0)", "series", "L us", "BW GB/s", "R^2", "points", "status")]
    for (impl, backend, mode), f in sorted(fitted.items()):
        bw = "inf" if math.isinf(f.bandwidth_Bps) else f"{f.bandwidth_GBps:.2f}"
        rows.append((f"{impl} {backend}", mode, f"{f.latency_us:.0f}", bw, f"{f.r2:.3f}", str(f.samples),
                     fit_status(f)))
    return _table(rows, right_from=2, right_to=6)


def c_tok_line(c_tok: dict, gamma: float, ranks: int, topk: int) -> str:
    """The expert-compute figure, how it was obtained, and whether it is a result."""
    params = c_tok["params"]
    how = c_tok["source"]
    if c_tok["source"] == "measured":
        how = (f"median of {len(c_tok['samples_s'])} repeats of {params['tokens']} tokens after {params['warmup']} "
               f"warm-up, {params['threads']} thread(s)")
        if params.get("spread"):
            how += f", spread {params['spread']:.2f}x"
        if params.get("flops_per_s"):
            how += f", {params['flops_per_s'] / 1e9:,.0f} GFLOP/s"
    return (f"expert MLP {params['hidden']}->{params['ffn']}->{params['hidden']} ({params['dtype']}, {how}): "
            f"c_tok = {c_tok['value'] * 1e6:,.1f} us per routed token{verdict(c_tok.get('problems', []))}; "
            f"gamma = {gamma:g}, P = {ranks}, k = {topk}")


def model_lines(summary: Sequence[dict], c_tok: dict, gamma: float, ranks: int, topk: int) -> list[str]:
    """Crossover and minimum batch for overlap, per implementation and backend, each flagged when not a result."""
    lines = [c_tok_line(c_tok, gamma, ranks, topk)]
    for s in summary:
        name = f"{s['impl']} {s['backend']}"
        cr = s.get("crossover")
        if cr is not None:
            flag = verdict(cr.get("problems", []))
            if cr["payload_bytes"] is None:
                lines.append(f"{name}: LL/HT crossover: none{flag} ({cr['note']})")
            else:
                lines.append(f"{name}: LL/HT crossover V* = {cr['payload_bytes'] / 1e6:.2f} MB per rank per direction"
                             f"{flag} ({cr['note']})")
        for mode in ("LL", "HT"):
            ob = s.get(f"overlap_{mode}")
            if ob is None:
                continue
            value = "impossible (wire time per token exceeds compute)" if not ob["feasible"] else \
                f"B >= {ob['min_batch']:,.0f} tokens" if ob["min_batch"] >= 10 else f"B >= {ob['min_batch']:.2g} tokens"
            lines.append(f"{name}: dual-batch overlap with {mode}: {value}{verdict(ob.get('problems', []))} "
                         f"(gamma*c_tok {ob['compute_per_token_s'] * 1e6:,.1f} us vs wire "
                         f"{ob['comm_per_token_s'] * 1e6:.2f} us per token)")
    return lines


def markdown_summary(points: Sequence[Point], fitted: dict[tuple[str, str, str], LinkFit],
                     model: Sequence[str] = ()) -> str:
    """Round trips per mode and size (median and p99 of each op, beside the baseline and the limit; then the
    back-to-back round trip beside the baseline's), the fits with their status, then the ``model`` lines (see
    :func:`model_lines`), flags included."""
    by_size: dict[tuple, dict[str, Point]] = {}
    for p in points:
        by_size.setdefault((p.impl, p.backend, p.mode, p.tokens), {})[p.op] = p
    lines = ["| impl | mode | tokens/rank | dispatch median / p99 ms | GB/s | combine median / p99 ms | GB/s "
             "| baseline round trip ms | x baseline | of limit | back to back ms | baseline back to back ms "
             "| x baseline |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"LL": 0, "HT": 1}
    for (impl, backend, mode, tokens), ops in sorted(by_size.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                     order.get(kv[0][2], 2), kv[0][3])):
        if impl == "baseline" or not {"dispatch", "combine"} <= ops.keys():
            continue
        d, c = ops["dispatch"], ops["combine"]
        base = by_size.get(("baseline", "all_to_all_single", mode, tokens), {})
        rt = d.median_s + c.median_s
        base_rt = base["dispatch"].median_s + base["combine"].median_s if {"dispatch", "combine"} <= base.keys() \
            else None
        b2b, base_b2b = ops.get(B2B), base.get(B2B)
        lines.append(f"| {impl} {backend} | {mode} | {tokens} | {d.median_s * 1e3:.2f} / {d.p99_s * 1e3:.2f} "
                     f"| {d.bandwidth_Bps / 1e9:.2f} | {c.median_s * 1e3:.2f} / {c.p99_s * 1e3:.2f} "
                     f"| {c.bandwidth_Bps / 1e9:.2f} | {f'{base_rt * 1e3:.2f}' if base_rt else '-'} "
                     f"| {f'{base_rt / rt:.2f}x' if base_rt else '-'} | {(d.limit_s + c.limit_s) / rt:.1%} "
                     f"| {f'{b2b.median_s * 1e3:.2f}' if b2b else '-'} "
                     f"| {f'{base_b2b.median_s * 1e3:.2f}' if base_b2b else '-'} "
                     f"| {f'{base_b2b.median_s / b2b.median_s:.2f}x' if b2b and base_b2b else '-'} |")
    lines += ["", "| fit t = 2(L + V/BW), L >= 0 | series | L (us) | BW (GB/s) | R^2 | points | status |",
              "|---|---|---:|---:|---:|---:|---|"]
    for (impl, backend, mode), f in sorted(fitted.items()):
        bw = "inf" if math.isinf(f.bandwidth_Bps) else f"{f.bandwidth_GBps:.2f}"
        lines.append(f"| {impl} {backend} | {mode} | {f.latency_us:.0f} | {bw} | {f.r2:.3f} | {f.samples} "
                     f"| {fit_status(f)} |")
    if model:
        lines += ["", "Model (a figure marked \"not a result\" failed its checks):", ""]
        lines += [f"* {line}" for line in model]
    return "\n".join(lines) + "\n"
