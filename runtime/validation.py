"""Argument checks that run before any communication.

Each raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value) whose
message starts with the operation and names the offending argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_TOPK = 32
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn,)


def check_tensor(op: str, name: str, value: object, dtypes: Sequence[torch.dtype] | torch.dtype,
                 shape: Sequence[int | None]) -> torch.Tensor:
    """``value`` must be a tensor of one of ``dtypes`` with ``shape`` (None = any size)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    if value.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {str(value.dtype).replace('torch.', '')}")
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape, strict=True)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{op}: {name} must have shape [{want}], got {list(value.shape)}")
    return value


def check_int(op: str, name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_num_experts(op: str, num_experts: object, num_ranks: int) -> int:
    check_int(op, "num_experts", num_experts, minimum=1)
    if num_experts % num_ranks:
        raise ValueError(f"{op}: num_experts={num_experts} must be a multiple of the group size {num_ranks}")
    return num_experts


def check_topk_idx(op: str, topk_idx: object, num_experts: int, num_tokens: int | None = None) -> torch.Tensor:
    """int64 `[num_tokens, num_topk]` with every entry in ``[-1, num_experts)``."""
    check_tensor(op, "topk_idx", topk_idx, torch.int64, (num_tokens, None))
    if topk_idx.size(1) > MAX_TOPK:
        raise ValueError(f"{op}: topk_idx has {topk_idx.size(1)} columns, at most {MAX_TOPK} are supported")
    if topk_idx.numel():
        low, high = (int(v) for v in torch.aminmax(topk_idx))
        if low < -1 or high >= num_experts:
            raise ValueError(
                f"{op}: topk_idx entries must be in [-1, {num_experts}) (num_experts={num_experts}), "
                f"got values in [{low}, {high}]"
            )
    return topk_idx


def check_device(op: str, device: torch.device, **tensors: object) -> None:
    """Every tensor given must live on ``device``."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.device.type != device.type:
            raise ValueError(f"{op}: {name} is on {value.device}, expected {device.type}")


def check_exclusive_async(op: str, async_finish: bool, return_recv_hook: bool) -> None:
    if async_finish and return_recv_hook:
        raise ValueError(f"{op}: async_finish and return_recv_hook cannot both be True")


def check_comm_stream_args(op: str, allocate_on_comm_stream: bool, previous_event: object,
                           async_finish: bool) -> None:
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError(f"{op}: allocate_on_comm_stream needs previous_event and async_finish=True")


def split_x(op: str, x: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` or ``(x_fp8, scales)`` for HT dispatch, checked; returns ``(x, scales or None)``."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"{op}: x as a tuple must be (x_fp8, scales), got {len(x)} items")
        data, scales = x
        check_tensor(op, "x[0] (x_fp8)", data, FP8_DTYPES, (None, None))
        check_tensor(op, "x[1] (scales)", scales, (torch.float32, torch.int32), (data.size(0), None))
        if scales.size(1) == 0:
            raise ValueError(f"{op}: x[1] (scales) has no columns")
        return data, scales
    if isinstance(x, torch.Tensor) and x.dtype in FP8_DTYPES:
        raise ValueError(f"{op}: x is FP8 without scales; pass x=(x_fp8, scales)")
    check_tensor(op, "x", x, FLOAT_DTYPES, (None, None))
    return x, None
