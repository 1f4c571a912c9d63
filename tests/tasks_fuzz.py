"""Fuzzing the public calls with hypothesis (run on every rank of a pool, with the same examples).

Each example takes a valid call (layout, HT dispatch / combine, LL dispatch / combine) and breaks
one argument in a way that is invalid by construction: a wrong dtype, a lost or added dimension,
a row-count mismatch with the other arguments, a negative / zero / fractional / textual / missing
number, a tensor on another device. The call must raise ValueError or TypeError naming the call,
without communicating. After the examples, the same Buffers must give correct results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tasks_bad import Ctx

# Dtypes no argument accepts (portep accepts any float dtype for combine inputs, for instance).
TENSOR_DTYPES = [torch.int8, torch.bool, torch.complex64]
BAD_NUMBERS = [-1, 0, 2.5, "8", None, -(2**40)]


def _layout_args(ctx: Ctx) -> dict[str, Any]:
    return {"topk_idx": ctx.topk_idx, "num_experts": ctx.num_experts}


def _dispatch_args(ctx: Ctx) -> dict[str, Any]:
    per_rank, per_rdma, per_expert, in_rank = ctx.layout()
    return {"x": ctx.x, "num_tokens_per_rank": per_rank, "num_tokens_per_rdma_rank": per_rdma,
            "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert, "topk_idx": ctx.topk_idx,
            "topk_weights": ctx.topk_weights}


def _combine_args(ctx: Ctx) -> dict[str, Any]:
    recv_x, _, recv_w, _, handle, _ = ctx.ht_dispatch()
    return {"x": recv_x, "handle": handle, "topk_weights": recv_w}


def _ll_dispatch_args(ctx: Ctx) -> dict[str, Any]:
    return {"x": ctx.x, "topk_idx": ctx.topk_idx, "num_max_dispatch_tokens_per_rank": ctx.x.size(0),
            "num_experts": ctx.num_experts}


def _ll_combine_args(ctx: Ctx) -> dict[str, Any]:
    recv_x, _, handle, _, _ = ctx.ll_dispatch(use_fp8=False)
    return {"x": recv_x, "topk_idx": ctx.topk_idx, "topk_weights": ctx.topk_weights, "handle": handle}


def _clean_args(ctx: Ctx) -> dict[str, Any]:
    return {"num_max_dispatch_tokens_per_rank": ctx.x.size(0), "hidden": ctx.x.size(1), "num_experts": ctx.num_experts}


def _local_tensor_args(ctx: Ctx) -> dict[str, Any]:
    return {"dtype": torch.bfloat16, "size": (4, 4), "offset": 64}


CALLS: dict[str, tuple[Callable[[Ctx], dict[str, Any]], Callable[[Ctx], Callable[..., Any]]]] = {
    "get_dispatch_layout": (_layout_args, lambda ctx: ctx.ht.get_dispatch_layout),
    "dispatch": (_dispatch_args, lambda ctx: ctx.ht.dispatch),
    "combine": (_combine_args, lambda ctx: ctx.ht.combine),
    "low_latency_dispatch": (_ll_dispatch_args, lambda ctx: ctx.ll.low_latency_dispatch),
    "low_latency_combine": (_ll_combine_args, lambda ctx: ctx.ll.low_latency_combine),
    "clean_low_latency_buffer": (_clean_args, lambda ctx: ctx.ll.clean_low_latency_buffer),
    "get_local_buffer_tensor": (_local_tensor_args, lambda ctx: ctx.ht.get_local_buffer_tensor),
}


def _other_dtype(tensor: torch.Tensor, data: st.DataObject) -> torch.Tensor:
    dtype = data.draw(st.sampled_from([d for d in TENSOR_DTYPES if d != tensor.dtype]), label="dtype")
    return tensor.to(dtype)


# Arguments whose rows must match the other arguments' (a row fewer is certainly invalid). Only
# arguments with the same number of rows on every rank, so every rank draws the same examples.
ROW_MATCHED = {
    "dispatch": ("x", "topk_idx", "topk_weights", "is_token_in_rank"),
    "low_latency_dispatch": ("x", "topk_idx"),
    "low_latency_combine": ("topk_idx", "topk_weights"),
}


def _corruptions(call: str, name: str, value: Any) -> list[str]:
    """The ways argument ``name`` of ``call`` can be broken so that the call is certainly invalid."""
    if isinstance(value, torch.Tensor):
        return ["dtype", "extra_dim", "device"] + (["fewer_rows"] if name in ROW_MATCHED.get(call, ()) else [])
    if isinstance(value, int) and not isinstance(value, bool):
        return ["number"]
    return []


def _corrupt(value: Any, kind: str, data: st.DataObject, name: str = "") -> Any:
    if kind == "dtype":
        return _other_dtype(value, data)
    if kind == "extra_dim":
        return value.unsqueeze(0)
    if kind == "device":
        return torch.empty_like(value, device="meta")
    if kind == "fewer_rows":
        return value[:-1]
    numbers = [n for n in BAD_NUMBERS if not (name == "offset" and n == 0)]  # offset 0 is valid
    return data.draw(st.sampled_from(numbers), label="number")


def fuzz_public_calls(rank: int, world_size: int, *, examples: int, seed: int = 31) -> int:
    """Hypothesis examples of broken calls (the same on every rank); returns how many were run."""
    ctx = Ctx(rank, world_size, seed)
    ran = [0]

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def broken_call_is_rejected(data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(sorted(CALLS)), label="call")
        make_args, method = CALLS[call]
        args = make_args(ctx)
        candidates = [(name, kind) for name, value in args.items() for kind in _corruptions(call, name, value)]
        name, kind = data.draw(st.sampled_from(candidates), label="corruption")
        broken = dict(args, **{name: _corrupt(args[name], kind, data, name)})
        before = ctx.ht.get_stats()["exchanges"] + ctx.ll.get_stats()["exchanges"]
        try:
            method(ctx)(**broken)
        except (ValueError, TypeError) as exc:
            assert call in str(exc), f"rank {rank}: {call} with {name} broken ({kind}): message {exc!r} " \
                                     f"does not name the call"
        else:
            raise AssertionError(f"rank {rank}: {call} accepted {name} broken ({kind})")
        after = ctx.ht.get_stats()["exchanges"] + ctx.ll.get_stats()["exchanges"]
        assert after == before, f"rank {rank}: {call} communicated before rejecting {name} ({kind})"
        ran[0] += 1

    broken_call_is_rejected()
    dist.barrier()
    ctx.check_buffers_work("fuzzing")
    return ran[0]
