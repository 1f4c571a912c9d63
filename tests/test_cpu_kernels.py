"""The compiled CPU kernels against their torch versions: the same results, bit for bit."""

from __future__ import annotations

import pytest
import torch

from portep.native import cpu


@pytest.mark.parametrize("round_scale", [False, True], ids=["scale", "pow2-scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_cast_matches_torch(dtype: torch.dtype, round_scale: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    # Magnitudes over nine decades (subnormal e4m3 results included), zeros of both signs, a group
    # whose largest magnitude is below the clamp, and values at and past the e4m3 maximum.
    x = torch.randn(64, 1024, generator=gen) * torch.logspace(-6, 3, 64).unsqueeze(1)
    x[0, :6] = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 448.0, 500.0])
    x[1, :128] = 1e-6
    x = x.to(dtype)
    got, got_scales = cpu.fp8_cast(x, round_scale)
    want, want_scales = cpu.fp8_cast_torch(x, round_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got_scales, want_scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finish_sum_casts_zeroes_and_keeps_final_rows(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    acc = torch.randn(6, 300, generator=gen)
    touched = torch.tensor([1, 0, 2, 1, 2, 0], dtype=torch.uint8)
    final = torch.randn(6, 300, generator=gen).to(dtype)
    out = final.clone()
    cpu.finish_sum(acc.clone(), touched, out)
    for r, t in enumerate(touched.tolist()):
        want = acc[r].to(dtype) if t == 1 else torch.zeros(300, dtype=dtype) if t == 0 else final[r]
        assert torch.equal(out[r], want), f"row {r} (touched {t})"
    strided = torch.empty(6, 600, dtype=dtype)[:, ::2]  # the torch path, same result
    strided.copy_(final)
    cpu.finish_sum(acc.clone(), touched, strided)
    assert torch.equal(strided, out)
