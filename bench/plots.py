"""PNG plots of ``portep bench`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from portep.costmodel import LinkFit, crossover, round_trip_time

from .analysis import RoundTrip, series_key

MODE_STYLE = {"LL": ("tab:blue", "o"), "HT": ("tab:orange", "s"), "a2a": ("tab:gray", "^")}
LIMIT_COLOR = "tab:green"


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def time_vs_payload(trips: Sequence[RoundTrip], fitted: dict[tuple[str, str, str], LinkFit], path: Path,
                    title: str) -> Path:
    """Round-trip time against payload per rank, per mode, with the fitted ``2(L + V/BW)`` and ``V*``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    series: dict[tuple[str, str, str], list[RoundTrip]] = defaultdict(list)
    for rt in trips:
        series[series_key(rt)].append(rt)
    keys = sorted({k[:2] for k in series if k[0] != "baseline"})
    for index, (linestyle, key) in enumerate(zip(("-", "--", ":", "-."), keys, strict=False)):
        for mode in ("LL", "HT"):
            _plot_series(ax, series.get((*key, mode), []), fitted.get((*key, mode)), mode,
                         f"{key[0]} {key[1]} {mode}", linestyle, hollow=index % 2 == 1)
        ll, ht = fitted.get((*key, "LL")), fitted.get((*key, "HT"))
        if ll and ht:
            cr = crossover(ll, ht)
            if cr.payload_bytes is not None:
                ax.axvline(cr.payload_bytes / 1e6, color="tab:red", linestyle=linestyle, linewidth=1,
                           label=f"V* = {cr.payload_bytes / 1e6:.2f} MB ({key[1]}): {cr.below} below, {cr.above} above")
    for key, rts in series.items():
        if key[0] == "baseline":
            _plot_series(ax, rts, fitted.get(key), "a2a", "baseline all_to_all_single", "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload V per rank per direction (MB)")
    ax.set_ylabel("dispatch + combine (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_series(ax, rts: Sequence[RoundTrip], fit: LinkFit | None, mode: str, label: str,  # noqa: ANN001
                 linestyle: str, hollow: bool = False) -> None:
    if not rts:
        return
    color, marker = MODE_STYLE[mode]
    rts = sorted(rts, key=lambda rt: rt.payload_bytes)
    xs = [rt.payload_bytes for rt in rts]
    ax.plot([x / 1e6 for x in xs], [rt.time_s * 1e3 for rt in rts], marker, color=color, label=label,
            markerfacecolor="none" if hollow else color)
    if fit is not None:
        lo, hi = min(xs) / 1.5, max(xs) * 1.5
        grid = [lo * (hi / lo) ** (i / 49) for i in range(50)]
        ax.plot([x / 1e6 for x in grid], [round_trip_time(x, fit) * 1e3 for x in grid], linestyle, color=color,
                linewidth=1, label=f"fit L={fit.latency_us:.0f} us, BW={fit.bandwidth_GBps:.2f} GB/s")


def versus_baseline(trips: Sequence[RoundTrip], path: Path, title: str) -> Path:
    """Per mode, round-trip time against tokens per rank: portep (each backend), baseline, machine limit."""
    plt = _pyplot()
    modes = [m for m in ("LL", "HT") if any(rt.mode == m for rt in trips)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), dpi=120, squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        curves: dict[str, list[RoundTrip]] = defaultdict(list)
        for rt in trips:
            if rt.mode == mode:
                curves["baseline all_to_all_single" if rt.impl == "baseline" else f"{rt.impl} {rt.backend}"].append(rt)
        limit: dict[int, float] = {}
        for name, rts in sorted(curves.items()):
            rts.sort(key=lambda rt: rt.tokens)
            gray = name.startswith("baseline")
            ax.plot([rt.tokens for rt in rts], [rt.time_s * 1e3 for rt in rts], "^-" if gray else "o-",
                    color="tab:gray" if gray else None, label=name)
            if not gray:
                limit.update({rt.tokens: rt.limit_s for rt in rts})
        if limit:
            ts = sorted(limit)
            ax.plot(ts, [limit[t] * 1e3 for t in ts], "--", color=LIMIT_COLOR, label="limit: bytes / memcpy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("dispatch + combine (ms, median)")
        ax.set_title(f"{mode}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
