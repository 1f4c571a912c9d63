"""The descriptor: one fixed-size command from a device kernel to the proxy.

"Put ``length`` bytes from ``src_offset`` of my registered buffer to ``dst_offset`` of rank
``dst_rank``'s, then add ``signal_value`` to its signal ``signal_slot``." Defined once here and
mirrored by ``native/portep_descriptor.h``; a test proves the two agree byte for byte.

Layout (32 bytes, little-endian)::

    0  u8  version        4  u32 dst_rank      16 u64 dst_offset    28 i32 signal_value
    1  u8  opcode         8  u64 src_offset    24 u32 length
    2  u16 signal_slot
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

DESCRIPTOR_VERSION = 1
DESCRIPTOR_BYTES = 32


class Op(IntEnum):
    """What a descriptor asks for."""

    PUT = 1  # copy bytes
    PUT_SIGNAL = 2  # copy bytes, then apply the signal once they have all landed
    SIGNAL = 3  # apply the signal only
    FENCE = 4  # earlier descriptors to dst_rank complete before later ones start
    BARRIER = 5  # every rank's proxy arrives before any continues


DESCRIPTOR_DTYPE = np.dtype(
    [
        ("version", "<u1"),
        ("opcode", "<u1"),
        ("signal_slot", "<u2"),
        ("dst_rank", "<u4"),
        ("src_offset", "<u8"),
        ("dst_offset", "<u8"),
        ("length", "<u4"),
        ("signal_value", "<i4"),
    ]
)
assert DESCRIPTOR_DTYPE.itemsize == DESCRIPTOR_BYTES, "descriptor layout drifted from 32 bytes"

_LIMITS = {
    "signal_slot": (0, 2**16 - 1),
    "dst_rank": (0, 2**32 - 1),
    "src_offset": (0, 2**64 - 1),
    "dst_offset": (0, 2**64 - 1),
    "length": (0, 2**32 - 1),
    "signal_value": (-(2**31), 2**31 - 1),
}


@dataclass(frozen=True)
class Descriptor:
    """One command; :meth:`encode` gives its 32 wire bytes."""

    opcode: Op
    dst_rank: int
    src_offset: int = 0
    dst_offset: int = 0
    length: int = 0
    signal_slot: int = 0
    signal_value: int = 0
    version: int = DESCRIPTOR_VERSION

    def __post_init__(self) -> None:
        Op(self.opcode)  # raises ValueError for an unknown opcode
        for name, (low, high) in _LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"Descriptor.{name}={value} is outside [{low}, {high}]")

    def to_record(self) -> np.ndarray:
        """A one-element array of :data:`DESCRIPTOR_DTYPE`."""
        record = np.zeros(1, dtype=DESCRIPTOR_DTYPE)
        for name in DESCRIPTOR_DTYPE.names:
            record[name] = int(getattr(self, name))
        return record

    def encode(self) -> bytes:
        return self.to_record().tobytes()

    @classmethod
    def from_record(cls, record: np.void | np.ndarray) -> Descriptor:
        values = {name: int(record[name]) for name in DESCRIPTOR_DTYPE.names}
        if values["version"] != DESCRIPTOR_VERSION:
            raise ValueError(f"descriptor version {values['version']}, this portep speaks {DESCRIPTOR_VERSION}")
        values["opcode"] = Op(values["opcode"])
        return cls(**values)

    @classmethod
    def decode(cls, data: bytes) -> Descriptor:
        if len(data) != DESCRIPTOR_BYTES:
            raise ValueError(f"a descriptor is {DESCRIPTOR_BYTES} bytes, got {len(data)}")
        return cls.from_record(np.frombuffer(data, dtype=DESCRIPTOR_DTYPE)[0])
