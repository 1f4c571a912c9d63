"""The message wire format: round trips, zero-copy decode, and clear errors on malformed bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portep.backends import wire
from portep.backends.transport import Kind, Message

messages = st.builds(
    Message,
    kind=st.sampled_from(list(Kind)),
    source=st.integers(0, 2**31 - 1),
    dst_offset=st.integers(0, 2**64 - 1),
    slot=st.integers(-1, 2**31 - 1),
    value=st.integers(-(2**63), 2**63 - 1),
    cumulative_bytes=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=600),
)


@settings(max_examples=200, deadline=None)
@given(message=messages)
def test_round_trip(message: Message) -> None:
    encoded = wire.encode(message)
    assert len(encoded) == wire.message_bytes(len(message.payload))
    decoded = wire.decode(encoded)
    assert isinstance(decoded.payload, memoryview)
    assert decoded == Message(message.kind, message.source, message.dst_offset, message.slot, message.value,
                              message.cumulative_bytes, decoded.payload)
    assert bytes(decoded.payload) == message.payload
    assert wire.decode(encoded, copy=True) == message


def test_header_layout_is_fixed() -> None:
    encoded = wire.encode(Message(Kind.SIGNAL, source=3, dst_offset=7, slot=5, value=-2, cumulative_bytes=9,
                                  payload=b"xy"))
    assert wire.HEADER_BYTES == 40
    assert struct.unpack_from("<HBBiiIQqQ", encoded) == (0x5045, wire.WIRE_VERSION, 2, 3, 5, 2, 7, -2, 9)
    assert bytes(encoded[40:]) == b"xy"


def test_decode_is_zero_copy_into_a_larger_buffer() -> None:
    slot = np.zeros(256, dtype=np.uint8)
    used = wire.encode_into(slot, Message(Kind.DATA, 1, dst_offset=4, payload=b"abc"))
    assert used == 43
    message = wire.decode(slot)
    slot[wire.HEADER_BYTES] = ord("z")  # the payload is a view of the buffer
    assert bytes(message.payload) == b"zbc"


def test_encode_header_into_then_payload() -> None:
    buffer = bytearray(wire.message_bytes(4))
    wire.encode_header_into(buffer, Kind.DATA, source=2, payload_length=4, dst_offset=100, slot=1)
    buffer[wire.HEADER_BYTES :] = b"\x01\x02\x03\x04"
    message = wire.decode(buffer, copy=True)
    assert (message.kind, message.source, message.dst_offset, message.slot, message.payload) == \
        (Kind.DATA, 2, 100, 1, b"\x01\x02\x03\x04")


def test_payload_may_be_any_buffer() -> None:
    payload = np.arange(16, dtype=np.uint8)
    encoded = wire.encode(Message(Kind.DATA, 0, payload=memoryview(payload[4:8])))  # type: ignore[arg-type]
    assert bytes(wire.decode(encoded).payload) == bytes(range(4, 8))


def test_decode_headers_of_a_ring() -> None:
    stride, count = 128, 5
    ring = np.zeros(stride * count, dtype=np.uint8)
    for i in range(count):
        message = Message(Kind.DATA, i, dst_offset=10 * i, payload=b"q" * i)
        wire.encode_into(ring[i * stride : (i + 1) * stride], message)
    headers = wire.decode_headers(ring, count, stride)
    assert headers["source"].tolist() == list(range(count))
    assert headers["dst_offset"].tolist() == [0, 10, 20, 30, 40]
    assert headers["payload_length"].tolist() == list(range(count))
    assert wire.decode_headers(ring, 0, stride).size == 0


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:10], "shorter than"),
    (lambda b: b"\x00\x00" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x09" + b[3:], "wire version 9"),
    (lambda b: b[:3] + b"\x07" + b[4:], "unknown message kind 7"),
    (lambda b: b[:-1], "announces 3 payload bytes"),
])
def test_malformed_bytes_are_rejected(mutate: Callable[[bytes], bytes], match: str) -> None:
    encoded = bytes(wire.encode(Message(Kind.DATA, 0, payload=b"abc")))
    with pytest.raises(wire.WireError, match=match):
        wire.decode(mutate(encoded))


def test_buffer_too_small_is_rejected() -> None:
    with pytest.raises(wire.WireError, match="does not fit"):
        wire.encode_into(bytearray(41), Message(Kind.DATA, 0, payload=b"ab"))
    with pytest.raises(wire.WireError, match="do not fit"):
        wire.decode_headers(np.zeros(100, dtype=np.uint8), 2, 80)
