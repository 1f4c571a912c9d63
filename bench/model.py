"""``portep model``: the cost model of :mod:`portep.costmodel` for given parameters, and a what-if table.

The defaults are the worked example of the Wide-EP notes (2-node, 16-GPU H100 cluster serving
DeepSeek-V3 in FP8): LL ``L = 35 us, BW = 22 GB/s``, HT ``L = 120 us, BW = 44 GB/s``,
``c_tok = 1.8 us``, ``gamma = 1.1``, ``P = 16, k = 8, d = 7168, s = 1``. The notes state
``V* ~ 3.7 MB`` and ``B >~ 291 tokens``. Exactly, ``V* = 85 us * 44e9 B/s = 3.74e6 B`` (decimal MB;
3.57 MiB) and ``B = 480 us / (1.98 - 0.3258) us = 290.2``: the notes round ``2ds/BW`` to 0.33 us
first (``480 / 1.65 = 290.9``). Both use one-way bandwidth and decimal units. Their formula also
prices the combine at FP8 (``2 d s`` with ``s = 1``); with DeepEP's BF16 combine the minimum is
``480 / (1.98 - 0.489) = 322`` tokens (printed as well). The notes' table of "operational" batch
targets (72k-160k tokens) is not an output of this formula and is not reproduced.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from portep.costmodel import (
    LinkFit,
    compute_time,
    crossover,
    min_overlap_batch,
    overlap_problems,
    payload_per_rank,
    round_trip_time,
)

from .report import verdict

WORKED_EXAMPLE = {
    "l_ll_us": 35.0, "l_ht_us": 120.0, "bw_ll_gbps": 22.0, "bw_ht_gbps": 44.0, "c_tok_us": 1.8, "gamma": 1.1,
    "ranks": 16, "topk": 8, "hidden": 7168, "bytes_per_elem": 1.0, "batch": 8192,
}


@dataclass(frozen=True)
class Stack:
    """A hardware stack for the what-if table: published scale-out line rate and assumed effective BW."""

    name: str
    nic: str
    line_rate_gbit: float  # per GPU, per direction, as published
    bw_ht_gbps: float  # effective HT bandwidth (GB/s per direction)
    bw_ll_gbps: float  # effective LL bandwidth (GB/s per direction)


# Line rates (per GPU, per direction):
# - H100 + InfiniBand NDR: NVIDIA ConnectX-7, up to 400 Gb/s per port (ConnectX-7 product brief).
#   DeepEP's README measures 43 GB/s (EP16) to 58 GB/s (EP32) for its normal internode kernels on
#   H800 + CX7 400 Gb/s (~50 GB/s max), consistent with the HT figure below.
# - MI300X + RoCE: 400 GbE NICs per GPU (Broadcom Thor2 / BCM957608 class, AMD Instinct MI300X
#   platform reference designs use one 400G NIC per GPU).
# - AWS P5 + EFA: p5.48xlarge has 3200 Gbps of EFAv2 for 8 H100 GPUs, i.e. 400 Gb/s per GPU
#   (AWS EC2 P5 instance page).
# Effective HT bandwidth: midpoint of the Wide-EP notes' realized-BW ranges for these stacks
# (36-41, 32-38, 26-34 GB/s); LL at half of HT, the LL/HT ratio of the worked example (22/44).
STACKS = (
    Stack("H100 + InfiniBand NDR", "ConnectX-7", 400.0, 38.5, 19.25),
    Stack("MI300X + RoCE", "400G RoCE (Thor2)", 400.0, 35.0, 17.5),
    Stack("P5 (H100) + EFA", "EFAv2 3200G/8 GPUs", 400.0, 30.0, 15.0),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``portep model`` (defaults: the worked example)."""
    ex = WORKED_EXAMPLE
    parser.add_argument("--l-ll-us", type=float, default=ex["l_ll_us"], help="LL latency L (us)")
    parser.add_argument("--l-ht-us", type=float, default=ex["l_ht_us"], help="HT latency L (us)")
    parser.add_argument("--bw-ll-gbps", type=float, default=ex["bw_ll_gbps"], help="LL bandwidth (GB/s, one way)")
    parser.add_argument("--bw-ht-gbps", type=float, default=ex["bw_ht_gbps"], help="HT bandwidth (GB/s, one way)")
    parser.add_argument("--c-tok-us", type=float, default=ex["c_tok_us"], help="expert compute per routed token (us)")
    parser.add_argument("--gamma", type=float, default=ex["gamma"], help="straggler factor (max/mean rank load)")
    parser.add_argument("--ranks", type=int, default=ex["ranks"], help="EP ranks P")
    parser.add_argument("--topk", type=int, default=ex["topk"], help="experts per token k")
    parser.add_argument("--hidden", type=int, default=ex["hidden"], help="hidden size d")
    parser.add_argument("--bytes-per-elem", type=float, default=ex["bytes_per_elem"],
                        help="bytes per element on the wire s (FP8 = 1, BF16 = 2)")
    parser.add_argument("--combine-bytes-per-elem", type=float, default=None,
                        help="bytes per element of the combine, if it differs from s (DeepEP: 2)")
    parser.add_argument("--batch", type=int, default=ex["batch"], help="global batch B (tokens) to evaluate")


def _batch_value(value: float) -> str:
    if value == float("inf"):
        return "impossible"
    return f"{value:,.1f}" if value >= 1 else f"{value:.2g}"


def _fmt_batch(value: float) -> str:
    """A minimum batch for the what-if table; one below a token is marked as no result."""
    return _batch_value(value) + (" (< 1 token: not a result)" if value < 1 else "")


def input_problems(args: argparse.Namespace) -> list[str]:
    """Inputs outside the model's domain (negative latency, non-positive bandwidth or c_tok)."""
    problems = [f"{name} L = {value:g} us < 0" for name, value in (("LL", args.l_ll_us), ("HT", args.l_ht_us))
                if value < 0]
    problems += [f"{name} BW = {value:g} GB/s <= 0" for name, value in (("LL", args.bw_ll_gbps),
                                                                         ("HT", args.bw_ht_gbps)) if value <= 0]
    if args.c_tok_us <= 0:
        problems.append(f"c_tok = {args.c_tok_us:g} us <= 0")
    return problems


def report(args: argparse.Namespace) -> str:
    """The text of ``portep model`` for parsed ``args`` (pure: no I/O)."""
    ll = LinkFit(args.l_ll_us * 1e-6, args.bw_ll_gbps * 1e9)
    ht = LinkFit(args.l_ht_us * 1e-6, args.bw_ht_gbps * 1e9)
    c_tok, s, d, p, k = args.c_tok_us * 1e-6, args.bytes_per_elem, args.hidden, args.ranks, args.topk
    lines = [
        "portep model: t = 2(L + V/BW) per mode; V* = (L_LL - L_HT) / (1/BW_HT - 1/BW_LL); "
        "B >= 2(P/k)L / (gamma*c_tok - 2ds/BW)",
        f"inputs: LL L={args.l_ll_us:g} us BW={args.bw_ll_gbps:g} GB/s | HT L={args.l_ht_us:g} us "
        f"BW={args.bw_ht_gbps:g} GB/s | c_tok={args.c_tok_us:g} us gamma={args.gamma:g} P={p} k={k} d={d} s={s:g}"
        f"{verdict(input_problems(args))}",
    ]
    cross = crossover(ll, ht)
    if cross.payload_bytes is None:
        lines.append(f"crossover: none ({cross.note})")
    else:
        v = cross.payload_bytes
        lines.append(f"crossover V* = {v / 1e6:.2f} MB ({v / 2**20:.2f} MiB) per rank per direction: {cross.note}")
    v_rank = payload_per_rank(args.batch, p, k, d, s)
    t_ll, t_ht = round_trip_time(v_rank, ll), round_trip_time(v_rank, ht)
    lines.append(f"payload per rank at B={args.batch}: V = {v_rank / 1e6:.2f} MB; round trip LL {t_ll * 1e6:,.0f} us, "
                 f"HT {t_ht * 1e6:,.0f} us -> use {'HT' if t_ht < t_ll else 'LL'}")
    best = ht if t_ht <= t_ll else ll
    variants = [("", args.combine_bytes_per_elem)]
    if args.combine_bytes_per_elem is None and s != 2:
        variants.append((" with a BF16 combine", 2.0))
    for label, s_c in variants:
        ob = min_overlap_batch(best, c_tok, args.gamma, p, k, d, s, s_c)
        lines.append(f"dual-batch overlap{label}: gamma*c_tok = {ob.compute_per_token_s * 1e6:.3f} us/token, "
                     f"wire = {ob.comm_per_token_s * 1e6:.3f} us/token, 2(P/k)L = {ob.numerator_s * 1e6:.0f} us "
                     f"-> B >= {_batch_value(ob.min_batch)} tokens"
                     f"{verdict(overlap_problems(ob, ranks=p))}")
    if all(getattr(args, key) == value for key, value in WORKED_EXAMPLE.items()):
        lines.append("worked example of the notes: V* ~ 3.7 MB, B >~ 291 tokens (they round the wire term to "
                     "0.33 us first: 480 / 1.65 = 290.9)")
    lines += ["", f"what-if at B={args.batch} (published 400 Gb/s per GPU = 50 GB/s one way; L, c_tok, gamma, "
              f"P, k, d, s as above):"]
    header = ("stack", "NIC", "line GB/s", "BW HT", "BW LL", "V* MB", "min B (DBO)", "comm us", "compute us")
    rows = [header]
    for st in STACKS:
        s_ht, s_ll = LinkFit(ht.latency_s, st.bw_ht_gbps * 1e9), LinkFit(ll.latency_s, st.bw_ll_gbps * 1e9)
        cr = crossover(s_ll, s_ht)
        link = s_ht if round_trip_time(v_rank, s_ht) <= round_trip_time(v_rank, s_ll) else s_ll
        ob = min_overlap_batch(link, c_tok, args.gamma, p, k, d, s, args.combine_bytes_per_elem)
        rows.append((st.name, st.nic, f"{st.line_rate_gbit / 8:g}", f"{st.bw_ht_gbps:g}", f"{st.bw_ll_gbps:g}",
                     "none" if cr.payload_bytes is None else f"{cr.payload_bytes / 1e6:.2f}",
                     _fmt_batch(ob.min_batch), f"{round_trip_time(v_rank, link) * 1e6:,.0f}",
                     f"{compute_time(args.batch, p, k, c_tok, args.gamma) * 1e6:,.0f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines += ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths,
              strict=True))) for r in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Print :func:`report`."""
    print(report(args))
    return 0
