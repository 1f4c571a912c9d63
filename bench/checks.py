"""Checks of one benchmarked result against :mod:`portep.reference`, run once per mode and size.

Expert outputs are the identity (the dequantised received rows), so a combine must return
``x_dq * copies`` (HT and the baseline: unweighted sum over destination ranks) or
``x_dq * sum(weights)`` (LL), where ``x_dq`` is what the FP8 cast keeps of ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from portep import reference

from .workload import Inputs, Shape

HT_TOLERANCE = 5e-6  # DeepEP's HT combine bound on calc_diff
LL_TOLERANCE = 1e-5  # DeepEP's LL combine bound after a BF16-exact dispatch


@dataclass
class Check:
    """Outcome of one check: ``ok``, the combine's ``calc_diff`` and what failed."""

    ok: bool
    diff: float
    detail: str = ""

    def as_dict(self) -> dict:
        return {"ok": self.ok, "combine_diff": self.diff, "detail": self.detail}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def dispatch_input(shape: Shape, inputs: Inputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What is handed to an HT dispatch: ``x``, or ``(x_fp8, scales)`` with FP8 dispatch."""
    return reference.per_token_cast_to_fp8(inputs.x) if shape.fp8_dispatch else inputs.x


def dequantised(shape: Shape, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """BF16 rows the identity expert returns for received ``x``."""
    if shape.fp8_dispatch:
        return reference.per_token_cast_back(x[0], x[1])
    return x  # type: ignore[return-value]


def x_kept(shape: Shape, inputs: Inputs) -> torch.Tensor:
    """float32 ``x`` as it survives the dispatch (FP8 cast and back, or exact)."""
    return dequantised(shape, dispatch_input(shape, inputs)).float()


def ht_expected(shape: Shape, mine: Inputs, copies: torch.Tensor) -> torch.Tensor:
    """float32 result of an HT (or baseline) combine of identity experts: ``x_dq * copies``."""
    return x_kept(shape, mine) * copies.float().unsqueeze(1)


def ll_expected(shape: Shape, mine: Inputs) -> torch.Tensor:
    """float32 result of an LL combine of identity experts: ``x_dq * sum(weights)``."""
    return x_kept(shape, mine) * mine.topk_weights.masked_fill(mine.topk_idx < 0, 0).sum(1, keepdim=True)


def check_repeat(combined: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> Check:
    """The last timed round trip still combines to ``expected`` (the timed loop is not a different computation)."""
    diff = reference.calc_diff(combined.detach().cpu().float(), expected)
    ok = diff < tolerance
    return Check(ok, diff, "" if ok else f"{what}: last timed combine differs (calc_diff {diff:.2e})")


def ht_reference(shape: Shape, everyone: Sequence[Inputs], rank: int) -> reference.HTDispatchResult:
    """What ``rank`` must receive from an HT dispatch of ``everyone``'s inputs."""
    return reference.ht_dispatch([dispatch_input(shape, i) for i in everyone], [i.topk_idx for i in everyone],
                                 [i.topk_weights for i in everyone], shape.num_experts, rank)


def check_ht(shape: Shape, ref: reference.HTDispatchResult, recv_x: object, recv_topk_idx: torch.Tensor | None,
             recv_topk_weights: torch.Tensor | None, counts: list[int] | None, combined: torch.Tensor,
             mine: Inputs, copies: torch.Tensor) -> Check:
    """HT dispatch outputs equal the reference's; the combine returns ``x_dq * copies``."""
    failed = []
    if shape.fp8_dispatch:
        if not (_same_bytes(recv_x[0], ref.recv_x[0]) and _same_bytes(recv_x[1], ref.recv_x[1])):  # type: ignore[index]
            failed.append("recv_x")
    elif not _same_bytes(recv_x, ref.recv_x):  # type: ignore[arg-type]
        failed.append("recv_x")
    if recv_topk_idx is not None and not _same_bytes(recv_topk_idx.long(), ref.recv_topk_idx):
        failed.append("recv_topk_idx")
    if recv_topk_weights is not None and not _same_bytes(recv_topk_weights.float(), ref.recv_topk_weights):
        failed.append("recv_topk_weights")
    if counts is not None and list(counts) != ref.num_recv_tokens_per_expert_list:
        failed.append("num_recv_tokens_per_expert_list")
    diff = reference.calc_diff(combined.detach().cpu().float(), ht_expected(shape, mine, copies))
    if not diff < HT_TOLERANCE:
        failed.append(f"combine (calc_diff {diff:.2e} >= {HT_TOLERANCE:g})")
    return Check(not failed, diff, ", ".join(failed))


def check_ll(shape: Shape, everyone: Sequence[Inputs], rank: int, num_max_tokens: int, recv_x: object,
             recv_count: torch.Tensor, handle: Sequence, combined: torch.Tensor) -> Check:
    """LL dispatch rows equal the reference's (compared per expert and source rank in source-token order,
    as DeepEP leaves the order within a source to arrival); the combine returns ``x_dq * sum(w)``."""
    ref = reference.ll_dispatch([i.x for i in everyone], [i.topk_idx for i in everyone], num_max_tokens,
                                shape.num_experts, rank, use_fp8=shape.fp8_dispatch)
    failed = []
    count = recv_count.detach().cpu()
    if not torch.equal(count.int(), ref.recv_count):
        failed.append("recv_count")
    src_info, layout_range = handle[0].detach().cpu(), handle[1].detach().cpu()
    data = recv_x[0] if shape.fp8_dispatch else recv_x  # type: ignore[index]
    scales = recv_x[1] if shape.fp8_dispatch else None  # type: ignore[index]
    for e in range(ref.recv_count.numel()):
        if failed:
            break
        for src in range(len(everyone)):
            begin, n = reference.unpack_layout_range(int(layout_range[e, src]))
            ref_begin, ref_n = reference.unpack_layout_range(int(ref.layout_range[e, src]))
            if n != ref_n:
                failed.append(f"layout_range[{e}, {src}]")
                break
            rows = begin + torch.argsort(src_info[e, begin : begin + n].long())
            ref_rows = slice(ref_begin, ref_begin + ref_n)
            if not torch.equal(src_info[e, rows].int(), ref.src_info[e][ref_rows]):
                failed.append(f"src_info of expert {e}")
            ref_x = ref.recv_x[e][0] if shape.fp8_dispatch else ref.recv_x[e]
            if not _same_bytes(data[e].cpu()[rows], ref_x[ref_rows]):
                failed.append(f"recv_x of expert {e}")
            if scales is not None and not _same_bytes(scales[e].cpu()[rows], ref.recv_x[e][1][ref_rows]):
                failed.append(f"scales of expert {e}")
            if failed:
                break
    diff = reference.calc_diff(combined.detach().cpu().float(), ll_expected(shape, everyone[rank]))
    if not diff < LL_TOLERANCE:
        failed.append(f"combine (calc_diff {diff:.2e} >= {LL_TOLERANCE:g})")
    return Check(not failed, diff, ", ".join(failed))
