"""The per-rank side of ``portep bench``: time HT and LL dispatch/combine and the baseline, check each once.

Every timed call starts after a barrier, so the time of one iteration is the slowest rank's; the
parent takes the maximum over ranks per iteration. The first call of every mode and size is
checked against :mod:`portep.reference` (and fails the run if wrong) and sets the number of timed
iterations (within ``[min_iters, max_iters]``, about ``point_budget_s`` per point); the last timed
combine must still give the checked result. Sizes are swept in increasing order and the larger
ones are skipped when they would not fit in ``time_budget_s``.

A barrier before every op puts its exit skew (how much later the last rank leaves it than the
first) into every sample; on an oversubscribed CPU that is a millisecond or two, as long as a small
op itself. So each point is also timed as nccl-tests and DeepEP's tests do: round trips (dispatch
then combine) back to back, a barrier only before each run of them, the time per round trip of the
slowest rank (op ``B2B``).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import baseline, checks
from .analysis import B2B
from .workload import (
    Inputs,
    Shape,
    ht_combine_bytes,
    ht_dispatch_bytes,
    ll_combine_bytes,
    ll_dispatch_bytes,
    rank_inputs,
    tokens_per_rank,
)


@dataclass(frozen=True)
class JobSpec:
    """What one launch of ranks measures (picklable: it travels to spawned ranks)."""

    impl: str  # name in the results: "portep" or the compared module
    module: str  # module providing a DeepEP-compatible ``Buffer``
    shape: Shape
    ll_tokens: tuple[int, ...]
    ht_tokens: tuple[int, ...]
    with_baseline: bool = True
    min_iters: int = 5
    max_iters: int = 50
    point_budget_s: float = 4.0
    time_budget_s: float = 150.0  # per launch, half for each mode; larger sizes are skipped past it
    progress: bool = True
    device: str = "cpu"


@dataclass
class Context:
    """Per-rank state shared by the measurements."""

    spec: JobSpec
    rank: int
    world: int
    group: Any
    device: torch.device
    bar: Any
    points: list[dict] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run ``fn`` after a barrier; return its result and its seconds on this rank."""
        self.sync()
        dist.barrier(group=self.group)
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def agree(self, value: float) -> float:
        """The largest ``value`` over the ranks (so that every rank takes the same decision)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def iterations(self, first_s: float) -> int:
        """Timed iterations for a point whose checked round trip took ``first_s`` here (same on every rank)."""
        spec = self.spec
        return int(min(spec.max_iters, max(spec.min_iters, spec.point_budget_s // max(self.agree(first_s), 1e-6))))

    def record(self, impl: str, mode: str, tokens: int, op: str, samples: list[float], nbytes: int,
               check: checks.Check) -> None:
        self.points.append({"impl": impl, "mode": mode, "tokens": tokens, "op": op, "samples_s": samples,
                            "bytes": nbytes, "check": check.as_dict()})

    def inputs(self, rank: int, tokens: int) -> Inputs:
        i = rank_inputs(self.spec.shape, rank, tokens)
        return Inputs(i.x.to(self.device), i.topk_idx.to(self.device), i.topk_weights.to(self.device))

    def everyone(self, tokens: int) -> list[Inputs]:
        return [rank_inputs(self.spec.shape, r, tokens) for r in range(self.world)]


B2B_REPEATS = 5


def back_to_back(ctx: Context, round_trip: Callable[[], Any], timed_iters: int) -> tuple[list[float], Any]:
    """Seconds per round trip of ``B2B_REPEATS`` runs of back-to-back round trips (a barrier before each run
    only; about half as many round trips in all as ``timed_iters``), and the last round trip's result."""
    per_run = max(2, timed_iters // (2 * B2B_REPEATS))
    samples, last = [], None
    for _ in range(B2B_REPEATS):
        def run() -> Any:
            out = None
            for _ in range(per_run):
                out = round_trip()
            return out
        last, t = ctx.timed(run)
        samples.append(t / per_run)
    return samples, last


def _checked_back_to_back(ctx: Context, round_trip: Callable[[], torch.Tensor], timed_iters: int,
                          expected: torch.Tensor, tolerance: float, what: str) -> list[float]:
    """:func:`back_to_back` of ``round_trip`` (returning the combined tensor), whose last result must
    still be ``expected``; its samples."""
    samples, combined = back_to_back(ctx, round_trip, timed_iters)
    _require(checks.check_repeat(combined, expected, tolerance, f"{what} back to back"),
             f"{what} back to back, rank {ctx.rank}")
    return samples


def _record_round_trip(ctx: Context, impl: str, mode: str, tokens: int, samples: tuple[list[float], ...],
                       d_bytes: int, c_bytes: int, check: checks.Check) -> None:
    """Record a point's dispatch, combine and back-to-back samples (``samples`` in that order)."""
    for op, op_samples, nbytes in zip(("dispatch", "combine", B2B), samples, (d_bytes, c_bytes, d_bytes + c_bytes),
                                      strict=True):
        ctx.record(impl, mode, tokens, op, op_samples, nbytes, check)


def _to(x: Any, device: torch.device) -> Any:
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


def _require(check: checks.Check, what: str) -> None:
    if not check.ok:
        raise AssertionError(f"{what}: result differs from portep.reference: {check.detail}")


def bench_ht(ctx: Context, buffer: Any, tokens: int) -> None:
    """HT dispatch and combine of ``tokens`` per rank: check once, then time."""
    shape, impl = ctx.spec.shape, ctx.spec.impl
    everyone = ctx.everyone(tokens)
    mine = ctx.inputs(ctx.rank, tokens)
    x_in = _to(checks.dispatch_input(shape, everyone[ctx.rank]), ctx.device)
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, shape.num_experts)

    def dispatch() -> tuple:
        return buffer.dispatch(x_in, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                               is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=mine.topk_idx,
                               topk_weights=mine.topk_weights)

    (recv_x, recv_idx, recv_w, counts, handle, _), t_d = ctx.timed(dispatch)
    y = checks.dequantised(shape, recv_x)
    (combined, _, _), t_c = ctx.timed(lambda: buffer.combine(y, handle))
    ref = checks.ht_reference(shape, everyone, ctx.rank)
    copies = tokens_per_rank(everyone[ctx.rank].topk_idx, shape.num_experts, ctx.world).sum(1)
    check = checks.check_ht(shape, ref, recv_x, recv_idx, recv_w, counts, combined, everyone[ctx.rank], copies)
    _require(check, f"{impl} HT dispatch/combine, {tokens} tokens, rank {ctx.rank}")
    d_samples, c_samples = [], []
    iters = ctx.iterations(t_d + t_c)
    for _ in range(iters):
        out, t = ctx.timed(dispatch)
        d_samples.append(t)
        (combined, _, _), t = ctx.timed(lambda out=out: buffer.combine(y, out[4]))
        c_samples.append(t)
    expected = checks.ht_expected(shape, everyone[ctx.rank], copies)
    _require(checks.check_repeat(combined, expected, checks.HT_TOLERANCE, "HT"),
             f"{impl} HT, {tokens} tokens, rank {ctx.rank}")
    b2b = _checked_back_to_back(ctx, lambda: buffer.combine(y, dispatch()[4])[0], iters, expected,
                                checks.HT_TOLERANCE, f"{impl} HT, {tokens} tokens")
    rows = int(y.size(0))
    _record_round_trip(ctx, impl, "HT", tokens, (d_samples, c_samples, b2b),
                       ht_dispatch_bytes(rows, shape.hidden, shape.fp8_dispatch), ht_combine_bytes(rows, shape.hidden),
                       check)


def bench_ll(ctx: Context, buffer: Any, tokens: int, num_max_tokens: int) -> None:
    """LL dispatch and combine of ``tokens`` per rank (buffer sized for ``num_max_tokens``): check once, then time."""
    shape, impl = ctx.spec.shape, ctx.spec.impl
    everyone = ctx.everyone(tokens)
    mine = ctx.inputs(ctx.rank, tokens)

    def dispatch() -> tuple:
        return buffer.low_latency_dispatch(mine.x, mine.topk_idx, num_max_tokens, shape.num_experts,
                                           use_fp8=shape.fp8_dispatch)

    (recv_x, recv_count, handle, _, _), t_d = ctx.timed(dispatch)
    data = recv_x[0] if shape.fp8_dispatch else recv_x
    expert_out = torch.empty(data.shape, dtype=torch.bfloat16, device=ctx.device)
    for e, n in enumerate(recv_count.tolist()):  # identity expert on the valid rows only
        part = (recv_x[0][e, :n], recv_x[1][e, :n]) if shape.fp8_dispatch else recv_x[e, :n]
        expert_out[e, :n] = checks.dequantised(shape, part)

    def combine(h: Any) -> tuple:
        return buffer.low_latency_combine(expert_out, mine.topk_idx, mine.topk_weights, h)

    (combined, _, _), t_c = ctx.timed(lambda: combine(handle))
    check = checks.check_ll(shape, everyone, ctx.rank, num_max_tokens, recv_x, recv_count, handle, combined)
    _require(check, f"{impl} LL dispatch/combine, {tokens} tokens, rank {ctx.rank}")
    d_samples, c_samples = [], []
    iters = ctx.iterations(t_d + t_c)
    for _ in range(iters):
        out, t = ctx.timed(dispatch)
        d_samples.append(t)
        (combined, _, _), t = ctx.timed(lambda out=out: combine(out[2]))
        c_samples.append(t)
    expected = checks.ll_expected(shape, everyone[ctx.rank])
    _require(checks.check_repeat(combined, expected, checks.LL_TOLERANCE, "LL"),
             f"{impl} LL, {tokens} tokens, rank {ctx.rank}")
    b2b = _checked_back_to_back(ctx, lambda: combine(dispatch()[2])[0], iters, expected, checks.LL_TOLERANCE,
                                f"{impl} LL, {tokens} tokens")
    _record_round_trip(ctx, impl, "LL", tokens, (d_samples, c_samples, b2b),
                       ll_dispatch_bytes(mine.topk_idx, shape.hidden, shape.fp8_dispatch),
                       ll_combine_bytes(mine.topk_idx, shape.hidden), check)


def bench_baseline(ctx: Context, mode: str, tokens: int) -> None:
    """The all_to_all_single baseline on the same inputs as ``mode`` at ``tokens``: check once, then time."""
    shape = ctx.spec.shape
    everyone = ctx.everyone(tokens)
    mine = ctx.inputs(ctx.rank, tokens)
    x_in = _to(checks.dispatch_input(shape, everyone[ctx.rank]), ctx.device)

    def dispatch() -> tuple[baseline.BaselineRecv, baseline.BaselineHandle]:
        rows, handle = baseline.dispatch(baseline.pack_rows(x_in, mine.topk_idx, mine.topk_weights), mine.topk_idx,
                                         shape.num_experts, ctx.group)
        return baseline.unpack_rows(rows, shape.hidden, shape.topk, shape.fp8_dispatch), handle

    (recv, handle), t_d = ctx.timed(dispatch)
    x = (recv.x, recv.scales) if shape.fp8_dispatch else recv.x
    y = checks.dequantised(shape, x)
    combined, t_c = ctx.timed(lambda: baseline.combine(y, handle, ctx.group))
    ref = checks.ht_reference(shape, everyone, ctx.rank)
    copies = tokens_per_rank(everyone[ctx.rank].topk_idx, shape.num_experts, ctx.world).sum(1)
    check = checks.check_ht(shape, ref, x, None, None, None, combined, everyone[ctx.rank], copies)
    sent_idx = [everyone[src].topk_idx[t] for src, t in ref.recv_src]
    expected_idx = torch.stack(sent_idx) if sent_idx else torch.empty(0, shape.topk, dtype=torch.int64)
    if not torch.equal(recv.topk_idx.cpu().long(), expected_idx):
        check = checks.Check(False, check.diff, "recv topk_idx")
    _require(check, f"baseline ({mode} sizes), {tokens} tokens, rank {ctx.rank}")
    d_samples, c_samples = [], []
    iters = ctx.iterations(t_d + t_c)
    for _ in range(iters):
        (_, h), t = ctx.timed(dispatch)
        d_samples.append(t)
        combined, t = ctx.timed(lambda h=h: baseline.combine(y, h, ctx.group))
        c_samples.append(t)
    expected = checks.ht_expected(shape, everyone[ctx.rank], copies)
    _require(checks.check_repeat(combined, expected, checks.HT_TOLERANCE, "baseline"),
             f"baseline, {tokens} tokens, rank {ctx.rank}")
    b2b = _checked_back_to_back(ctx, lambda: baseline.combine(y, dispatch()[1], ctx.group), iters, expected,
                                checks.HT_TOLERANCE, f"baseline, {tokens} tokens")
    rows = int(y.size(0))
    _record_round_trip(ctx, "baseline", mode, tokens, (d_samples, c_samples, b2b),
                       ht_dispatch_bytes(rows, shape.hidden, shape.fp8_dispatch), ht_combine_bytes(rows, shape.hidden),
                       check)


def _group(spec: JobSpec, rank: int) -> tuple[Any, torch.device]:
    if spec.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return dist.new_group(backend="nccl"), torch.device("cuda", torch.cuda.current_device())
    return dist.group.WORLD, torch.device("cpu")


def _sweep(ctx: Context, mode: str, sizes: tuple[int, ...], measure: Callable[[int], None]) -> list[int]:
    """Measure ``sizes`` in order (and the baseline beside each) within half the time budget; return the sizes
    skipped because the next one, projected from the last (linearly in tokens), would not fit."""
    spec, began = ctx.spec, time.monotonic()
    budget = spec.time_budget_s / 2
    last: tuple[int, float] | None = None
    for i, tokens in enumerate(sizes):
        if last is not None and i >= 2:  # two sizes at least, for the fit
            spent = ctx.agree(time.monotonic() - began)
            if spent + last[1] * tokens / last[0] > budget:
                ctx.bar.update((len(sizes) - i) * (2 if spec.with_baseline else 1))
                return list(sizes[i:])
        t0 = time.monotonic()
        ctx.bar.set_postfix_str(f"{mode} {tokens} tokens")
        measure(tokens)
        ctx.bar.update()
        if spec.with_baseline:
            bench_baseline(ctx, mode, tokens)
            ctx.bar.update()
        last = (tokens, ctx.agree(time.monotonic() - t0))
    return []


def run_rank(rank: int, world: int, spec: JobSpec) -> dict:
    """Entry point of one spawned rank (see :func:`portep.launch.run_local`)."""
    from tqdm import tqdm

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    module = importlib.import_module(spec.module)
    group, device = _group(spec, rank)
    shape = spec.shape
    total = (len(spec.ht_tokens) + len(spec.ll_tokens)) * (2 if spec.with_baseline else 1)
    bar = tqdm(total=total, desc=f"{spec.impl}", unit="point", disable=rank != 0 or not spec.progress,
               dynamic_ncols=True, leave=False)
    ctx = Context(spec, rank, world, group, device, bar)
    backend, skipped = spec.module, {}
    if spec.ht_tokens:
        hidden_bytes = shape.hidden * 2
        nvl = module.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(hidden_bytes, world)
        rdma = module.Buffer.get_dispatch_config(world).get_rdma_buffer_size_hint(hidden_bytes, world)
        buffer = module.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma)
        backend = getattr(buffer, "backend_name", backend)
        skipped["HT"] = _sweep(ctx, "HT", spec.ht_tokens, lambda n: bench_ht(ctx, buffer, n))
        del buffer
    if spec.ll_tokens:
        num_max = max(spec.ll_tokens)
        rdma = module.Buffer.get_low_latency_rdma_size_hint(num_max, shape.hidden, world, shape.num_experts)
        buffer = module.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True,
                               num_qps_per_rank=max(1, shape.num_experts // world))
        backend = getattr(buffer, "backend_name", backend)
        buffer.clean_low_latency_buffer(num_max, shape.hidden, shape.num_experts)
        skipped["LL"] = _sweep(ctx, "LL", spec.ll_tokens, lambda n: bench_ll(ctx, buffer, n, num_max))
        del buffer
    bar.close()
    return {"rank": rank, "impl": spec.impl, "backend": backend, "points": ctx.points, "skipped": skipped}
