"""Wire format of :class:`~portep.backends.transport.Message`: a fixed little-endian header, then the payload.

Every message fabric (UCX tag messages, sockets, EFA send/recv, shared-memory queues) carries the
same bytes::

    offset size field
         0    2 magic            0x5045 ("PE" little-endian)
         2    1 version          WIRE_VERSION
         3    1 kind             Kind.DATA / Kind.SIGNAL
         4    4 source           int32, sending rank
         8    4 slot             int32, -1 for untagged data
        12    4 payload_length   uint32, bytes after the header
        16    8 dst_offset       uint64, where the payload lands in the receiver's region
        24    8 value            int64, signal increment
        32    8 cumulative_bytes uint64, tagged bytes the signal guards
        40      payload

The header is 40 bytes, so the payload starts 8-byte aligned. ``payload_length`` makes the format
self-delimiting on byte streams (read :data:`HEADER_BYTES`, then ``payload_length`` more).

Zero-copy: :func:`decode` returns the payload as a ``memoryview`` into the received buffer (valid
while that buffer is), and :func:`encode_into` / :func:`encode_header_into` write into a buffer
the caller owns (a pooled send buffer), so a put costs one copy from the region into it.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .transport import Kind, Message

MAGIC = 0x5045
WIRE_VERSION = 1
HEADER = struct.Struct("<HBBiiIQqQ")
HEADER_BYTES = HEADER.size
MAX_PAYLOAD_BYTES = 2**32 - 1

# The same header as a numpy structured dtype, for decoding many headers at once.
HEADER_DTYPE = np.dtype([("magic", "<u2"), ("version", "u1"), ("kind", "u1"), ("source", "<i4"), ("slot", "<i4"),
                         ("payload_length", "<u4"), ("dst_offset", "<u8"), ("value", "<i8"),
                         ("cumulative_bytes", "<u8")])
assert HEADER_DTYPE.itemsize == HEADER_BYTES

_KINDS = {int(k): k for k in Kind}


class WireError(ValueError):
    """Bytes that are not a well-formed portep message."""


def message_bytes(payload_length: int) -> int:
    """Encoded size of a message with ``payload_length`` payload bytes."""
    return HEADER_BYTES + payload_length


def encode_header_into(buffer: Any, kind: int, source: int, payload_length: int, dst_offset: int = 0,
                       slot: int = -1, value: int = 0, cumulative_bytes: int = 0) -> None:
    """Write a header at the start of the writable ``buffer``; the caller puts the payload after it."""
    if not 0 <= payload_length <= MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {payload_length} bytes does not fit the wire format")
    HEADER.pack_into(buffer, 0, MAGIC, WIRE_VERSION, kind, source, slot, payload_length, dst_offset, value,
                     cumulative_bytes)


def encode_into(buffer: Any, message: Message) -> int:
    """Write ``message`` at the start of the writable ``buffer``; returns the bytes written."""
    payload = memoryview(message.payload).cast("B")
    size = message_bytes(payload.nbytes)
    view = memoryview(buffer).cast("B")
    if view.nbytes < size:
        raise WireError(f"a {size}-byte message does not fit a {view.nbytes}-byte buffer")
    encode_header_into(view, int(message.kind), message.source, payload.nbytes, message.dst_offset, message.slot,
                       message.value, message.cumulative_bytes)
    view[HEADER_BYTES:size] = payload
    return size


def encode(message: Message) -> bytearray:
    """``message`` as a new buffer."""
    out = bytearray(message_bytes(memoryview(message.payload).nbytes))
    encode_into(out, message)
    return out


def decode_header(buffer: Any) -> tuple[int, int, int, int, int, int, int, int, int]:
    """The raw header fields ``(magic, version, kind, source, slot, payload_length, dst_offset, value,
    cumulative_bytes)``, checked."""
    view = memoryview(buffer).cast("B")
    if view.nbytes < HEADER_BYTES:
        raise WireError(f"{view.nbytes} bytes are shorter than the {HEADER_BYTES}-byte message header")
    fields = HEADER.unpack_from(view, 0)
    if fields[0] != MAGIC:
        raise WireError(f"bad magic 0x{fields[0]:04x} (expected 0x{MAGIC:04x}): not a portep message")
    if fields[1] != WIRE_VERSION:
        raise WireError(f"wire version {fields[1]}, this build speaks {WIRE_VERSION}")
    if fields[2] not in _KINDS:
        raise WireError(f"unknown message kind {fields[2]}")
    if view.nbytes < HEADER_BYTES + fields[5]:
        raise WireError(f"message announces {fields[5]} payload bytes but only {view.nbytes - HEADER_BYTES} "
                        f"follow the header")
    return fields


def decode(buffer: Any, copy: bool = False) -> Message:
    """The message at the start of ``buffer`` (which may be longer, e.g. a fixed-size receive buffer).

    With ``copy=False`` the payload is a ``memoryview`` into ``buffer``: apply it before the buffer
    is reused. With ``copy=True`` it is ``bytes``.
    """
    _, _, kind, source, slot, length, dst_offset, value, cumulative = decode_header(buffer)
    payload = memoryview(buffer).cast("B")[HEADER_BYTES : HEADER_BYTES + length]
    return Message(_KINDS[kind], source, dst_offset, slot, value, cumulative,
                   payload.tobytes() if copy else payload)  # type: ignore[arg-type]


def decode_headers(buffer: Any, count: int, stride: int) -> np.ndarray:
    """``count`` headers of messages laid ``stride`` bytes apart in ``buffer`` (e.g. a ring of slots),
    as a :data:`HEADER_DTYPE` array view; checks magic and version."""
    raw = np.frombuffer(buffer, dtype=np.uint8)
    if count and (count - 1) * stride + HEADER_BYTES > raw.size:
        raise WireError(f"{count} headers {stride} bytes apart do not fit a {raw.size}-byte buffer")
    headers = np.ndarray((count,), dtype=HEADER_DTYPE, buffer=raw, strides=(stride,)) if count else \
        np.zeros(0, dtype=HEADER_DTYPE)
    if count and ((headers["magic"] != MAGIC).any() or (headers["version"] != WIRE_VERSION).any()):
        raise WireError("bad magic or wire version among the headers")
    return headers
