"""Rows sent as weighted sums of source rows (what an LL combine's expert side sends: one partial
sum per token and rank): two engines of one process; each wire row must be, bit for bit, the
float32 sum of its group's rows times their weights, in order, cast to the wire type, whether it
goes to a peer (rows straddling chunks included) or to the rank itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portep.native import engine as native

HIDDEN = 1000  # 2000-byte bf16 rows: some straddle two chunks
TYPES = {torch.bfloat16: native.BF16, torch.float16: native.F16, torch.float32: native.F32, torch.int32: native.I32}


def _field(t: torch.Tensor, kind: int, wire: torch.dtype | None = None) -> tuple:
    size = t.element_size()
    return (t.data_ptr(), t.stride(0) * size, size, 0, 0, t.size(1), TYPES[t.dtype], TYPES[wire or t.dtype], kind, 0)


def _groups(n_groups: int, gen: torch.Generator) -> list[int]:
    """Group sizes 1..4 (an LL token selects up to top-k experts of one rank)."""
    return torch.randint(1, 5, (n_groups,), generator=gen).tolist()


def _expected(source: torch.Tensor, index: np.ndarray, weights: np.ndarray, sizes: list[int],
              wire: torch.dtype) -> torch.Tensor:
    rows, at = [], 0
    for size in sizes:
        acc = float(weights[at]) * source[int(index[at])].float()
        for j in range(at + 1, at + size):
            acc = acc + float(weights[j]) * source[int(index[j])].float()
        rows.append(acc.to(wire))
        at += size
    return torch.stack(rows)


def _send_sums(engines: list[native.Engine], to: int, source: torch.Tensor, index: np.ndarray, weights: np.ndarray,
               sizes: list[int], out: torch.Tensor, wire: torch.dtype, send_fields: np.ndarray | None = None) -> None:
    """Rank 0 sends ``len(sizes)`` summed rows to rank ``to``, which scatters them into ``out``."""
    group_end = np.cumsum(sizes).astype(np.int64)
    if send_fields is None:
        send_fields = np.array([_field(source, native.GATHER, wire)], dtype=native.FIELD_DTYPE)
    segment = np.array([(send_fields.ctypes.data, index.ctypes.data, 0, len(sizes), 1, 0, group_end.ctypes.data,
                         weights.ctypes.data)], dtype=native.SEGMENT_DTYPE)
    recv_fields = np.array([_field(out, native.SCATTER)], dtype=native.FIELD_DTYPE)
    keep: list = [source, index, weights, out, group_end, send_fields, segment, recv_fields]
    row_bytes = out.size(1) * out.element_size()
    peers = np.array([0, 1], dtype=np.int32)
    sends = np.zeros(2, dtype=native.SEND_DTYPE)
    sends[to] = (segment.ctypes.data, 0, 1, 0)
    recvs = [np.zeros(2, dtype=native.RECV_DTYPE) for _ in range(2)]
    for r in range(2):
        recvs[r]["expect_rows"] = 0
    recvs[to][0] = (recv_fields.ctypes.data, 0, 0, 0, 0, len(sizes), 0, 1, 0, 0)
    x0 = engines[0].start("sums", peers, sends, row_bytes, 0, recvs[0], False, keep)
    x0.push()
    x1 = engines[1].start("sums", peers, np.zeros(2, dtype=native.SEND_DTYPE), row_bytes, 0, recvs[1], False, keep)
    done = [False, False]
    for _ in range(1000):  # one thread drives both engines: the rows exceed one window's slots
        done = [done[0] or x0.wait(0.005), done[1] or x1.wait(0.005)]
        if all(done):
            break
    assert all(done), "the exchange did not complete"
    x0.free()
    x1.free()


@pytest.mark.parametrize("to", [1, 0], ids=["peer", "itself"])
@pytest.mark.parametrize("dtype,wire", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                        (torch.float16, torch.float16)])
def test_each_row_is_its_groups_weighted_sum(pair: list[native.Engine], to: int, dtype: torch.dtype,
                                             wire: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    source = torch.randn(40, HIDDEN, generator=gen).to(dtype)
    sizes = _groups(12, gen)
    index = torch.randint(0, 40, (sum(sizes),), generator=gen).numpy().astype(np.int64)
    weights = torch.rand(sum(sizes), generator=gen).numpy().astype(np.float32)
    out = torch.full((len(sizes), HIDDEN), float("nan"), dtype=wire)
    _send_sums(pair, to, source, index, weights, sizes, out, wire)
    want = _expected(source, index, weights, sizes, wire)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), "sums differ from float32 in order"
    # the sums are not plain copies: a group of one with weight 1 would be
    assert not torch.equal(out[0], source[int(index[0])].to(wire)) or (sizes[0] == 1 and weights[0] == 1.0)


def test_sums_refuse_fields_that_are_not_floats(pair: list[native.Engine]) -> None:
    source = torch.zeros(4, 8, dtype=torch.int32)
    fields = np.array([(source.data_ptr(), 32, 4, 0, 0, 8, native.I32, native.I32, native.GATHER, 0)],
                      dtype=native.FIELD_DTYPE)
    out = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(native.EngineError, match="sums rows"):
        _send_sums(pair, 1, source, np.array([0, 1], dtype=np.int64), np.ones(2, dtype=np.float32), [2], out,
                   torch.int32, send_fields=fields)
