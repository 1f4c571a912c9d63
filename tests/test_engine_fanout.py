"""Rows that fan out on arrival (what an LL dispatch sends: a token once per rank, with the list of
that rank's experts it selected): two engines of one process, rank 0 sending to rank 1, which
applies each row to every destination its list names, in arrival order, and refuses a row whose
list names a destination outside what it announced."""

from __future__ import annotations

import numpy as np
import pytest

from portep.native import engine as native

WIDTH = 3  # int32 payload per row; then a list of LIST keys
LIST = 2


def _field(base: int, row_stride: int, count: int, kind: int) -> tuple:
    return (base, row_stride, 4, 0, 0, count, native.I32, native.I32, kind, 0)


def _exchange(engines: list[native.Engine], rows: np.ndarray, cursor: np.ndarray, end: np.ndarray,
              out: np.ndarray, record: np.ndarray | None = None) -> list[native.Exchange]:
    """Rank 0 sends ``rows`` (int32 [n, WIDTH + LIST]) to rank 1, which fans them out into ``out``
    (and writes where each went into ``record``, if given)."""
    keep: list = [rows, cursor, end, out, record]
    peers = np.array([0, 1], dtype=np.int32)
    send_fields = np.array([_field(rows.ctypes.data, rows.strides[0], WIDTH + LIST, native.GATHER)],
                           dtype=native.FIELD_DTYPE)
    segment = np.array([(send_fields.ctypes.data, 0, 0, len(rows), 1, 0, 0, 0)], dtype=native.SEGMENT_DTYPE)
    sends0 = np.zeros(2, dtype=native.SEND_DTYPE)
    sends0[1] = (segment.ctypes.data, 0, 1, 0)
    recv_fields = np.array([_field(out.ctypes.data, out.strides[0], WIDTH, native.SCATTER),
                            (0, 0, 0, 0, 0, 4 * LIST, native.U8, native.U8, native.SKIP, 0)],
                           dtype=native.FIELD_DTYPE)
    fanout = np.zeros(1, dtype=native.FANOUT_DTYPE)
    fanout[0] = (4 * WIDTH, LIST, len(cursor), 0, cursor.ctypes.data, end.ctypes.data,
                 0 if record is None else record.ctypes.data, 0)
    recvs1 = np.zeros(2, dtype=native.RECV_DTYPE)
    recvs1[0] = (recv_fields.ctypes.data, 0, 0, 0, 0, -1, fanout.ctypes.data, 2, 0, 0)
    recvs0 = np.zeros(2, dtype=native.RECV_DTYPE)
    recvs0[1]["expect_rows"] = 0
    keep += [send_fields, segment, recv_fields, fanout]
    row_bytes = 4 * (WIDTH + LIST)
    x0 = engines[0].start("fanout", peers, sends0, row_bytes, 0, recvs0, False, keep)
    x0.push()
    x1 = engines[1].start("fanout", peers, np.zeros(2, dtype=native.SEND_DTYPE), row_bytes, 0, recvs1, False, keep)
    return [x0, x1]


def test_each_row_lands_at_every_destination_its_list_names(pair: list[native.Engine]) -> None:
    # Keys: 0 and 1 (two "experts"), destination blocks [0, 3) and [10, 12).
    lists = [(0, 1), (1, -1), (0, -1), (-1, 0)]
    rows = np.array([[10 * i, 10 * i + 1, 10 * i + 2, *keys] for i, keys in enumerate(lists)], dtype=np.int32)
    cursor, end = np.array([0, 10], dtype=np.int64), np.array([3, 12], dtype=np.int64)
    out = np.full((12, WIDTH), -7, dtype=np.int32)
    x0, x1 = _exchange(pair, rows, cursor, end, out)
    assert x1.wait(5.0) and x0.wait(5.0)
    for x in (x0, x1):
        x.free()
    # key 0 takes rows 0, 2, 3 in order; key 1 takes rows 0, 1.
    assert out[0:3].tolist() == [rows[0, :WIDTH].tolist(), rows[2, :WIDTH].tolist(), rows[3, :WIDTH].tolist()]
    assert out[10:12].tolist() == [rows[0, :WIDTH].tolist(), rows[1, :WIDTH].tolist()]
    assert (out[3:10] == -7).all()
    assert cursor.tolist() == [3, 12]


def test_the_record_says_where_each_row_went_in_the_senders_order(pair: list[native.Engine]) -> None:
    lists = [(1, 0), (1, -1), (-1, 0), (0, 1)]
    rows = np.array([[10 * i, 10 * i + 1, 10 * i + 2, *keys] for i, keys in enumerate(lists)], dtype=np.int32)
    cursor, end = np.array([0, 10], dtype=np.int64), np.array([3, 13], dtype=np.int64)
    out = np.full((13, WIDTH), -7, dtype=np.int32)
    record = np.full(6, -1, dtype=np.int64)
    x0, x1 = _exchange(pair, rows, cursor, end, out, record)
    assert x1.wait(5.0) and x0.wait(5.0)
    for x in (x0, x1):
        x.free()
    # (row, list entry) in order: (0: key 1, key 0), (1: key 1), (2: key 0), (3: key 0, key 1)
    assert record.tolist() == [10, 0, 11, 1, 2, 12]
    for at, (i, _) in zip(record, [(0, 1), (0, 0), (1, 1), (2, 0), (3, 0), (3, 1)], strict=True):
        assert out[at].tolist() == rows[i, :WIDTH].tolist()


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (round to nearest even), as uint16."""
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("final", [False, True], ids=["accumulated", "final"])
@pytest.mark.parametrize("first_touch", [True, False], ids=["stored", "added"])
def test_rows_reducing_into_one_row_are_summed_as_a_run_with_the_same_result(pair: list[native.Engine],
                                                                            first_touch: bool, final: bool) -> None:
    width = 700  # more than one block of the run sum, not a multiple of it
    gen = np.random.default_rng(5)
    targets = np.array([2, 2, 2, 0, 1, 1, 2, 0, 0, 0, 0], dtype=np.int64)  # runs of 3, 1, 2, 1, 4
    rows = _bf16(gen.standard_normal((len(targets), width)))
    weights = gen.random(len(targets)).astype(np.float32)
    start = gen.standard_normal((3, width)).astype(np.float32)
    acc = start.copy()
    touched = np.zeros(3, dtype=np.uint8) if first_touch else np.ones(3, dtype=np.uint8)
    # With a final spec: rows 0 and 2 get all their contributions (then their sum, cast to bf16,
    # goes to `out`), row 1 expects one more than it gets (it stays in the accumulator).
    remaining = (np.bincount(targets, minlength=3) + np.array([0, 1, 0])).astype(np.int32)
    out = np.zeros((3, width), dtype=np.uint16)
    out_fields = np.array([(out.ctypes.data, out.strides[0], 2, 0, 0, width, native.BF16, native.BF16, native.SCATTER,
                            0)], dtype=native.FIELD_DTYPE)
    final_spec = np.zeros(1, dtype=native.FINAL_DTYPE)
    final_spec[0] = (remaining.ctypes.data, out_fields.ctypes.data, 1, 0)
    bf16_field = (rows.ctypes.data, rows.strides[0], 2, 0, 0, width, native.BF16, native.BF16, native.GATHER, 0)
    send_fields = np.array([bf16_field], dtype=native.FIELD_DTYPE)
    segment = np.array([(send_fields.ctypes.data, 0, 0, len(rows), 1, 0, 0, 0)], dtype=native.SEGMENT_DTYPE)
    sends0 = np.zeros(2, dtype=native.SEND_DTYPE)
    sends0[1] = (segment.ctypes.data, 0, 1, 0)
    recv_fields = np.array([(acc.ctypes.data, acc.strides[0], 4, 0, 0, width, native.F32, native.BF16, native.REDUCE,
                             0)], dtype=native.FIELD_DTYPE)
    recvs1 = np.zeros(2, dtype=native.RECV_DTYPE)
    recvs1[0] = (recv_fields.ctypes.data, targets.ctypes.data, weights.ctypes.data, touched.ctypes.data, 0,
                 len(rows), 0, 1, 0, final_spec.ctypes.data if final else 0)
    recvs0 = np.zeros(2, dtype=native.RECV_DTYPE)
    recvs0[1]["expect_rows"] = 0
    keep = [rows, weights, acc, touched, targets, send_fields, segment, recv_fields, remaining, out, out_fields,
            final_spec]
    peers = np.array([0, 1], dtype=np.int32)
    x0 = pair[0].start("runs", peers, sends0, 2 * width, 0, recvs0, False, keep)
    x0.push()
    x1 = pair[1].start("runs", peers, np.zeros(2, dtype=native.SEND_DTYPE), 2 * width, 0, recvs1, False, keep)
    assert x1.wait(5.0) and x0.wait(5.0)
    for x in (x0, x1):
        x.free()
    # Row by row, in arrival order, float32 as the engine does it: the first touch stores w * v.
    want = start.copy()
    seen = [not first_touch] * 3
    values = (rows.astype(np.uint32) << 16).view(np.float32)
    for t, w, v in zip(targets, weights, values, strict=True):
        want[t] = w * v if not seen[t] else want[t] + w * v
        seen[t] = True
    if not final:
        assert np.array_equal(acc, want)
        assert touched.tolist() == [1, 1, 1]
        return
    assert np.array_equal(out[[0, 2]], _bf16(want[[0, 2]])), "final rows: the sum, cast once"
    assert np.array_equal(acc[1], want[1]) and not out[1].any(), "an incomplete row stays in the accumulator"
    assert touched.tolist() == [2, 1, 2] and remaining.tolist() == [0, 1, 0]


@pytest.mark.parametrize("lists", [[(0, 0), (0, -1)], [(2, -1)]], ids=["past its end", "key out of range"])
def test_a_row_naming_a_destination_outside_its_counts_is_refused(pair: list[native.Engine], lists: list) -> None:
    rows = np.array([[1, 2, 3, *keys] for keys in lists], dtype=np.int32)
    cursor, end = np.array([0, 5], dtype=np.int64), np.array([2, 6], dtype=np.int64)
    out = np.zeros((6, WIDTH), dtype=np.int32)
    _, x1 = _exchange(pair, rows, cursor, end, out)
    with pytest.raises(native.EngineError) as failed:
        x1.wait(5.0)
    assert failed.value.kind == native.EngineError.PROTOCOL and failed.value.culprit == 0
    assert "from rank 0 names destinations outside" in str(failed.value)
    assert cursor[0] <= end[0] and cursor[1] <= end[1]
