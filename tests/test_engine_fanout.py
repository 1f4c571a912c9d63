"""Rows that fan out on arrival (what an LL dispatch sends: a token once per rank, with the list of
that rank's experts it selected): two engines of one process, rank 0 sending to rank 1, which
applies each row to every destination its list names, in arrival order, and refuses a row whose
list names a destination outside what it announced."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from portep.native import engine as native

SLOTS, CHUNK = 4, 4096
WIDTH = 3  # int32 payload per row; then a list of LIST keys
LIST = 2


@pytest.fixture
def pair() -> Iterator[list[native.Engine]]:
    signals, data = native.Engine.window_size(2, SLOTS, CHUNK)
    windows = [native.Window.create(signals, data) for _ in range(2)]
    engines = [native.Engine(rank, 2, SLOTS, CHUNK, windows[rank]) for rank in range(2)]
    engines[0].set_direct(1, windows[1])
    engines[1].set_direct(0, windows[0])
    yield engines
    for e in engines:
        e.destroy()
    for w in windows:
        w.close()


def _field(base: int, row_stride: int, count: int, kind: int) -> tuple:
    return (base, row_stride, 4, 0, 0, count, native.I32, native.I32, kind, 0)


def _exchange(engines: list[native.Engine], rows: np.ndarray, cursor: np.ndarray, end: np.ndarray,
              out: np.ndarray) -> list[native.Exchange]:
    """Rank 0 sends ``rows`` (int32 [n, WIDTH + LIST]) to rank 1, which fans them out into ``out``."""
    keep: list = [rows, cursor, end, out]
    peers = np.array([0, 1], dtype=np.int32)
    send_fields = np.array([_field(rows.ctypes.data, rows.strides[0], WIDTH + LIST, native.GATHER)],
                           dtype=native.FIELD_DTYPE)
    segment = np.array([(send_fields.ctypes.data, 0, 0, len(rows), 1, 0)], dtype=native.SEGMENT_DTYPE)
    sends0 = np.zeros(2, dtype=native.SEND_DTYPE)
    sends0[1] = (segment.ctypes.data, 0, 1, 0)
    recv_fields = np.array([_field(out.ctypes.data, out.strides[0], WIDTH, native.SCATTER),
                            (0, 0, 0, 0, 0, 4 * LIST, native.U8, native.U8, native.SKIP, 0)],
                           dtype=native.FIELD_DTYPE)
    fanout = np.zeros(1, dtype=np.dtype([("list_offset", "<i4"), ("list_count", "<i4"), ("nkeys", "<i4"),
                                         ("pad", "<i4"), ("cursor", "<u8"), ("end", "<u8")]))
    fanout[0] = (4 * WIDTH, LIST, len(cursor), 0, cursor.ctypes.data, end.ctypes.data)
    recvs1 = np.zeros(2, dtype=native.RECV_DTYPE)
    recvs1[0] = (recv_fields.ctypes.data, 0, 0, 0, 0, -1, fanout.ctypes.data, 2, 0)
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
