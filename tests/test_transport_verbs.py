"""RDMA transports (``pe_transport_verbs.c``) and the protocol they share with every message fabric
(``pe_msgproto.c``).

Everywhere: the immediate encoding and its limits, values split over several immediates, and the
receive-side signal table replayed against arbitrary arrival orders (hypothesis), with drops,
duplicates and sequence numbers that wrap; the transports' clear errors where libibverbs or a
device is missing. On a machine with an RDMA device: the same exchanges as the software fabric's
tests, between processes, over RC (InfiniBand / RoCE) and EFA SRD; elsewhere these skip with the
reason ``pe_verbs_probe`` gives.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from ctypes import POINTER, c_char_p, c_int, c_int32, c_int64, c_size_t, c_uint32, c_uint64, c_void_p
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portep.native import engine
from tests.test_transport_fabric import Ranks, _assert_exact, _segments_of, plan

COUNTERS = 1 << 16
SEQ_MOD = 128
MAX_OUTSTANDING = 63
PLAIN = COUNTERS  # a test post on this "counter" is a plain put
KIND_PUT, KIND_DATA, KIND_SIGNAL = 1, 2, 3
PUT_DTYPE = np.dtype([("src", "<u4"), ("counter", "<u4"), ("len", "<u8"), ("value", "<i8")])
MSG_DTYPE = np.dtype([("src", "<u4"), ("kind", "<u4"), ("imm", "<u4"), ("put", "<u4"), ("bytes", "<u8"),
                      ("seq", "<u4"), ("value", "<i4")])


def _lib() -> ctypes.CDLL:
    """The engine, with the protocol's exported functions declared."""
    so = engine.lib()
    declarations = {
        "pe_imm_encode": (c_int, [c_int, c_uint32, c_uint32, c_int32, POINTER(c_uint32), c_char_p]),
        "pe_imm_decode": (None, [c_uint32, POINTER(c_int), POINTER(c_uint32), POINTER(c_uint32), POINTER(c_int32)]),
        "pe_msg_split_value": (c_int, [c_int64, POINTER(c_int32), c_char_p]),
        "pe_msgproto_test_plan": (c_int, [c_void_p, c_int, c_uint64, c_void_p, c_int, c_char_p]),
        "pe_msgproto_test_replay": (c_int, [c_void_p, c_int, c_void_p, c_int, c_uint32, c_void_p, POINTER(c_int),
                                            c_char_p]),
        "pe_opt_get": (c_int, [c_char_p, c_char_p, c_char_p, c_size_t]),
        "pe_verbs_probe": (c_int, [c_int, c_char_p]),
    }
    for name, (restype, argtypes) in declarations.items():
        fn = getattr(so, name)
        fn.restype, fn.argtypes = restype, argtypes
    return so


def encode(kind: int, counter: int, seq: int, value: int) -> int:
    err, imm = ctypes.create_string_buffer(512), c_uint32()
    if _lib().pe_imm_encode(kind, counter, seq, value, ctypes.byref(imm), err) != 0:
        raise ValueError(err.value.decode())
    return imm.value


def decode(imm: int) -> tuple[int, int, int, int]:
    kind, counter, seq, value = c_int(), c_uint32(), c_uint32(), c_int32()
    _lib().pe_imm_decode(imm, ctypes.byref(kind), ctypes.byref(counter), ctypes.byref(seq), ctypes.byref(value))
    return kind.value, counter.value, seq.value, value.value


def split(value: int) -> list[int]:
    err, pieces = ctypes.create_string_buffer(512), (c_int32 * 16)()
    n = _lib().pe_msg_split_value(value, pieces, err)
    if n < 0:
        raise ValueError(err.value.decode())
    return list(pieces[:n])


def cut(puts: list[tuple[int, int, int, int]], fragment: int) -> np.ndarray:
    """The messages senders make of ``puts`` ((src, counter, len, value); counter PLAIN: no signal)."""
    records = np.array(puts, dtype=PUT_DTYPE)
    cap = sum(p[2] // fragment + 2 + 16 for p in puts)
    out, err = np.zeros(cap, dtype=MSG_DTYPE), ctypes.create_string_buffer(512)
    n = _lib().pe_msgproto_test_plan(records.ctypes.data, len(puts), fragment, out.ctypes.data, cap, err)
    assert n >= 0, err.value.decode()
    return out[:n]


def replay(msgs: np.ndarray, order: list[int], num_counters: int) -> tuple[np.ndarray, int, str]:
    """Deliver ``msgs[order]`` one by one; returns the counters after each delivery, the index in
    ``order`` of the first protocol violation (-1: none) and its message."""
    trace = np.zeros((max(len(order), 1), num_counters), dtype=np.int64)
    order_arr = np.asarray(order, dtype=np.int32)
    failed, err = c_int(), ctypes.create_string_buffer(512)
    _lib().pe_msgproto_test_replay(msgs.ctypes.data, len(msgs), order_arr.ctypes.data, len(order), num_counters,
                                   trace.ctypes.data, ctypes.byref(failed), err)
    return trace, failed.value, err.value.decode()


def chains(msgs: np.ndarray) -> list[tuple[int, list[tuple[int, list[int]]]]]:
    """Per (source, counter): its counter and its signal pieces in sequence order, each with the
    messages it needs: itself and, for the first piece of a put, every byte of that put."""
    data_of: dict[int, list[int]] = {}
    for i, m in enumerate(msgs):
        if m["kind"] == KIND_DATA:
            data_of.setdefault(int(m["put"]), []).append(i)
    by_key: dict[tuple[int, int], list[tuple[int, int, list[int]]]] = {}
    for i, m in enumerate(msgs):
        if m["kind"] == KIND_SIGNAL:
            needs = [i] + (data_of.get(int(m["put"]), []) if m["bytes"] else [])
            by_key.setdefault((int(m["src"]), decode(int(m["imm"]))[1]), []).append((int(m["seq"]), int(m["value"]),
                                                                                     needs))
    return [(counter, [(value, needs) for _, value, needs in sorted(chain, key=lambda c: c[0])])
            for (_, counter), chain in by_key.items()]


def oracle(table: list[tuple[int, list[tuple[int, list[int]]]]], delivered: set[int], num_counters: int) -> np.ndarray:
    """What the counters must read once ``delivered`` have arrived: per (source, counter), the
    longest prefix of signal pieces whose messages all arrived is applied."""
    counters = np.zeros(num_counters, dtype=np.int64)
    for counter, chain in table:
        for value, needs in chain:
            if not all(k in delivered for k in needs):
                break
            counters[counter] += value
    return counters


def check_order(msgs: np.ndarray, order: list[int], num_counters: int) -> np.ndarray:
    """Replay ``order`` and compare the counters with the oracle after every delivery."""
    trace, failed, why = replay(msgs, order, num_counters)
    assert failed == -1, f"protocol violation at delivery {failed}: {why}"
    table, delivered = chains(msgs), set()
    for step, index in enumerate(order):
        delivered.add(index)
        expected = oracle(table, delivered, num_counters)
        assert np.array_equal(trace[step], expected), f"after {step + 1} deliveries: {trace[step]} != {expected}"
    return trace[-1] if order else np.zeros(num_counters, dtype=np.int64)


# ------------------------------------------------------------------------------------ immediates
@pytest.mark.timeout(30)
def test_immediate_round_trips_and_limits() -> None:
    for kind, counter, seq, value in [(1, 0, 0, 1), (1, COUNTERS - 1, 127, 127), (1, 513, 64, -128), (0, 42, 5, 0),
                                      (1, 7, 300, -1)]:
        imm = encode(kind, counter, seq, value)
        assert 0 <= imm < 2**32
        assert decode(imm) == (kind, counter, seq % SEQ_MOD, value)
    assert encode(1, 3, 2, 5) >> 31 == 1 and encode(0, 3, 2, 0) >> 31 == 0  # kind in bit 31
    with pytest.raises(ValueError, match="counter 65536 does not fit"):
        encode(1, COUNTERS, 0, 1)
    with pytest.raises(ValueError, match="value 128 does not fit"):
        encode(1, 0, 0, 128)
    with pytest.raises(ValueError, match="value -129 does not fit"):
        encode(1, 0, 0, -129)
    with pytest.raises(ValueError, match="DATA carries none"):
        encode(0, 0, 0, 1)
    with pytest.raises(ValueError, match="unknown kind"):
        encode(2, 0, 0, 0)


@pytest.mark.timeout(30)
@settings(max_examples=200, deadline=None)
@given(kind=st.integers(0, 1), counter=st.integers(0, COUNTERS - 1), seq=st.integers(0, 2**32 - 1),
       value=st.integers(-128, 127))
def test_immediate_round_trip_property(kind: int, counter: int, seq: int, value: int) -> None:
    value = value if kind == 1 else 0
    assert decode(encode(kind, counter, seq, value)) == (kind, counter, seq % SEQ_MOD, value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, -128, -129, 300, -300, 2032, -2048, 1000, -1017])
def test_values_split_over_immediates(value: int) -> None:
    pieces = split(value)
    assert sum(pieces) == value
    assert all(-128 <= p <= 127 and (p == 0 or (p > 0) == (value > 0)) for p in pieces)
    assert len(pieces) == max(1, -(-abs(value) // (127 if value > 0 else 128)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", [2033, -2049, 2**40])
def test_values_beyond_sixteen_immediates_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="does not fit 16 immediates"):
        split(value)


@pytest.mark.timeout(30)
def test_cutting_a_put() -> None:
    """Fragments first (DATA, tagged with the put's sequence number), then the signal pieces, the
    first carrying the put's byte count; plain puts travel untagged."""
    msgs = cut([(0, 5, 1300, 300), (0, PLAIN, 700, 0), (0, 5, 0, 1), (1, 5, 10, 1)], fragment=512)
    kinds = [(int(m["kind"]), int(m["put"]), int(m["bytes"])) for m in msgs]
    assert kinds == [(KIND_DATA, 0, 512), (KIND_DATA, 0, 512), (KIND_DATA, 0, 276), (KIND_SIGNAL, 0, 1300),
                     (KIND_SIGNAL, 0, 0), (KIND_SIGNAL, 0, 0), (KIND_PUT, 1, 512), (KIND_PUT, 1, 188),
                     (KIND_SIGNAL, 2, 0), (KIND_DATA, 3, 10), (KIND_SIGNAL, 3, 10)]
    assert [decode(int(m["imm"])) for m in msgs[:6]] == [(0, 5, 0, 0)] * 3 + [(1, 5, 0, 127), (1, 5, 1, 127),
                                                                             (1, 5, 2, 46)]
    assert decode(int(msgs[8]["imm"])) == (1, 5, 3, 1)  # the next sequence number of (source 0, counter 5)
    assert decode(int(msgs[10]["imm"])) == (1, 5, 0, 1)  # source 1 numbers its own


# ---------------------------------------------------------------------------------- signal table
posts = st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0, 1, 2, 3, PLAIN]), st.integers(0, 1500),
                           st.integers(-300, 300)), min_size=1, max_size=10)


@pytest.mark.timeout(30)
@settings(max_examples=60, deadline=None)
@given(puts=posts, fragment=st.sampled_from([64, 512, 4096]), data=st.data())
def test_signals_apply_only_after_their_bytes_in_any_order(puts: list, fragment: int, data: Any) -> None:
    """Any arrival order: after every arrival the counters hold exactly the signals whose bytes have
    all landed, in sequence order per (source, counter); once everything arrived, every value."""
    puts = [(s, c, n, v if c != PLAIN else 0) for s, c, n, v in puts]
    msgs = cut(puts, fragment)
    order = data.draw(st.permutations(range(len(msgs))))
    final = check_order(msgs, list(order), 4)
    totals = np.zeros(4, dtype=np.int64)
    for _, counter, _, value in puts:
        if counter != PLAIN:
            totals[counter] += value
    assert np.array_equal(final, totals)


@pytest.mark.timeout(30)
@settings(max_examples=40, deadline=None)
@given(puts=posts, data=st.data())
def test_lost_messages_keep_counters_short(puts: list, data: Any) -> None:
    """Drops: a counter never counts a signal whose bytes (or whose earlier signals) were lost."""
    msgs = cut([(s, c, n, v if c != PLAIN else 0) for s, c, n, v in puts], 256)
    order = list(data.draw(st.permutations(range(len(msgs)))))
    kept = [i for i in order if data.draw(st.booleans())]
    check_order(msgs, kept, 4)


@pytest.mark.timeout(30)
def test_a_later_put_never_stands_in_for_a_lost_one() -> None:
    msgs = cut([(0, 0, 1000, 1), (0, 0, 1000, 1), (0, 0, 1000, 1)], 500)
    lost = next(i for i, m in enumerate(msgs) if m["put"] == 0 and m["kind"] == KIND_DATA)
    order = [i for i in range(len(msgs)) if i != lost]
    trace, failed, why = replay(msgs, order, 1)
    assert failed == -1, why
    assert trace[-1][0] == 0, "puts 1 and 2 arrived whole, but put 0 did not: the counter must stay at 0"
    trace, _, _ = replay(msgs, order + [lost], 1)
    assert trace[-1][0] == 3


@pytest.mark.timeout(30)
def test_sequence_numbers_wrap() -> None:
    """300 puts on one counter (sequence numbers 0..299, 7 bits on the wire), delivered in blocks of
    8 puts shuffled among themselves."""
    msgs = cut([(0, 2, 100, 1)] * 300, 64)
    assert int(msgs["seq"].max()) == 299
    assert {decode(int(m["imm"]))[2] for m in msgs} == set(range(SEQ_MOD))
    rng = np.random.default_rng(0)
    order: list[int] = []
    per_put = len(msgs) // 300
    for start in range(0, 300, 8):
        block = list(range(start * per_put, min(300, start + 8) * per_put))
        rng.shuffle(block)
        order += block
    assert check_order(msgs, order, 4)[2] == 300


@pytest.mark.timeout(30)
def test_protocol_violations_are_named() -> None:
    msgs = cut([(0, 1, 600, 1)], 512)  # DATA 512, DATA 88, SIGNAL
    _, failed, why = replay(msgs, [0, 1, 2, 0], 2)
    assert failed == 3 and "after that signal was applied" in why
    _, failed, why = replay(msgs, [0, 0, 1, 2], 2)
    assert failed == 3 and "which guards 600" in why
    _, failed, why = replay(msgs, [2, 2], 2)
    assert failed == 1 and "arrived twice" in why
    far = cut([(0, 1, 0, 1)] * (MAX_OUTSTANDING + 2), 512)  # signals only, sequence 0..64
    _, failed, why = replay(far, [MAX_OUTSTANDING + 1], 2)  # 64 ahead of the next one: looks stale
    assert failed == 0 and "after it was applied" in why
    trace, failed, _ = replay(far, [MAX_OUTSTANDING], 2)  # 63 ahead: waits for 0..62
    assert failed == -1 and trace[-1][1] == 0


@pytest.mark.timeout(30)
def test_option_strings() -> None:
    value = ctypes.create_string_buffer(64)
    options = b" rank=3, world = 8 ,reorder,drop=0.5,,x"
    found = {key: (_lib().pe_opt_get(options, key.encode(), value, 64), value.value.decode())
             for key in ("rank", "world", "reorder", "drop", "x", "seed")}
    assert found == {"rank": (1, "3"), "world": (1, "8"), "reorder": (1, ""), "drop": (1, "0.5"), "x": (1, ""),
                     "seed": (0, "")}


# ------------------------------------------------------------------------------ devices, errors
def probe(efa: bool) -> tuple[bool, str]:
    """Whether a usable device of that kind is here, and if not why (pe_verbs_probe)."""
    err = ctypes.create_string_buffer(512)
    return bool(_lib().pe_verbs_probe(int(efa), err)), err.value.decode()


RC_OK, RC_WHY = probe(efa=False)
EFA_OK, EFA_WHY = probe(efa=True)
needs_rc = pytest.mark.skipif(not RC_OK, reason=RC_WHY)
needs_efa = pytest.mark.skipif(not EFA_OK, reason=EFA_WHY)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["verbs", "efa"])
def test_missing_library_or_device_is_named(name: str) -> None:
    ok, why = probe(efa=name == "efa")
    if ok:
        pytest.skip(f"this machine has a usable {name} device")
    assert why and ("libibverbs.so.1" in why or "libefa.so.1" in why or "device" in why), why
    with pytest.raises(engine.EngineError) as info:
        engine.Proxy(name, "rank=0,world=2")
    assert str(info.value) == f"{name} transport: {why}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("name", "options", "message"), [
    ("verbs", "", "needs rank=R,world=N options"),
    ("verbs", "rank=0", "needs rank=R,world=N options"),
    ("verbs", "rank=0,world=400", "world=400 exceeds the 325 ranks"),
    ("verbs", "rank=2,world=2", "rank=2 is not a rank of world=2"),
    ("efa", "fragment=big", "fragment=big is not a non-negative integer"),
    ("efa", "queue_posts=0", "queue_posts must be in 1.."),
])
def test_bad_options_are_named_before_any_device_is_needed(name: str, options: str, message: str) -> None:
    with pytest.raises(engine.EngineError, match=message):
        engine.Proxy(name, options)


@pytest.fixture(scope="module")
def rank_processes() -> Iterator[Ranks]:
    ranks = Ranks()
    yield ranks
    ranks.close()
    assert not _segments_of(ranks.all_pids)


def _exchange(ranks: Ranks, transport: str, options: str, seed: int) -> dict[str, int]:
    job = ranks.setup(2, options, seed=seed, transport=transport)
    try:
        puts = plan(seed, 2, count=40, max_len=40_000)
        job.post(puts)
        _assert_exact(job.watch(puts, timeout_s=30), puts)
        return job.stats()
    finally:
        ranks.teardown()


@needs_rc
@pytest.mark.timeout(90)
def test_rc_between_processes(rank_processes: Ranks) -> None:
    stats = _exchange(rank_processes, "verbs", "fragment=65536", seed=21)
    assert stats["transport_fragments"] > stats["transport_puts"] > 0
    assert stats["failed_peers"] == 0


@needs_efa
@pytest.mark.timeout(90)
def test_efa_between_processes(rank_processes: Ranks) -> None:
    stats = _exchange(rank_processes, "efa", "", seed=22)
    assert stats["transport_fragments"] > stats["transport_puts"] > 0
    assert stats["failed_peers"] == 0
