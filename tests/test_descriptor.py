"""The descriptor is defined once: Python's encoding and the C header agree byte for byte."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portep.proxy.descriptor import DESCRIPTOR_BYTES, DESCRIPTOR_DTYPE, Descriptor, Op

HEADER_DIR = Path(__file__).resolve().parent.parent / "native"

C_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include "portep_descriptor.h"
int main(int argc, char** argv) {
  portep_descriptor_t d;
  if (argc == 2) {  /* print the layout: size and offset of every field */
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof d, offsetof(portep_descriptor_t, version),
           offsetof(portep_descriptor_t, opcode), offsetof(portep_descriptor_t, signal_slot),
           offsetof(portep_descriptor_t, dst_rank), offsetof(portep_descriptor_t, src_offset),
           offsetof(portep_descriptor_t, dst_offset), offsetof(portep_descriptor_t, length),
           offsetof(portep_descriptor_t, signal_value));
    return 0;
  }
  d.version = PORTEP_DESCRIPTOR_VERSION;
  d.opcode = (uint8_t)strtoul(argv[1], 0, 10);
  d.dst_rank = (uint32_t)strtoul(argv[2], 0, 10);
  d.src_offset = strtoull(argv[3], 0, 10);
  d.dst_offset = strtoull(argv[4], 0, 10);
  d.length = (uint32_t)strtoul(argv[5], 0, 10);
  d.signal_slot = (uint16_t)strtoul(argv[6], 0, 10);
  d.signal_value = (int32_t)strtol(argv[7], 0, 10);
  fwrite(&d, sizeof d, 1, stdout);
  return 0;
}
"""


@pytest.fixture(scope="module")
def c_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    workdir = tmp_path_factory.mktemp("descriptor")
    source = workdir / "encode.c"
    source.write_text(C_PROGRAM)
    binary = workdir / "encode"
    subprocess.run([compiler, "-std=c11", "-Wall", "-Werror", "-I", str(HEADER_DIR), str(source), "-o", str(binary)],
                   check=True, timeout=60)
    return binary


def test_layout_matches_header(c_encoder: Path) -> None:
    out = subprocess.run([str(c_encoder), "layout"], capture_output=True, text=True, check=True).stdout.split()
    size, *offsets = (int(v) for v in out)
    assert size == DESCRIPTOR_BYTES == DESCRIPTOR_DTYPE.itemsize
    assert offsets == [DESCRIPTOR_DTYPE.fields[name][1] for name in
                       ("version", "opcode", "signal_slot", "dst_rank", "src_offset", "dst_offset", "length",
                        "signal_value")]


descriptors = st.builds(
    Descriptor,
    opcode=st.sampled_from(list(Op)),
    dst_rank=st.integers(0, 2**32 - 1),
    src_offset=st.integers(0, 2**64 - 1),
    dst_offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
    signal_slot=st.integers(0, 2**16 - 1),
    signal_value=st.integers(-(2**31), 2**31 - 1),
)


@settings(max_examples=40, deadline=None)
@given(descriptors)
def test_c_and_python_encode_the_same_bytes(c_encoder: Path, desc: Descriptor) -> None:
    args = [int(desc.opcode), desc.dst_rank, desc.src_offset, desc.dst_offset, desc.length, desc.signal_slot,
            desc.signal_value]
    c_bytes = subprocess.run([str(c_encoder), *map(str, args)], capture_output=True, check=True).stdout
    assert c_bytes == desc.encode()
    assert Descriptor.decode(c_bytes) == desc


def test_rejects_out_of_range_fields_and_versions() -> None:
    with pytest.raises(ValueError, match="signal_slot"):
        Descriptor(Op.SIGNAL, 0, signal_slot=2**16)
    with pytest.raises(ValueError):
        Descriptor(99, 0)  # type: ignore[arg-type]
    record = Descriptor(Op.PUT, 1).to_record()
    record["version"] = 7
    with pytest.raises(ValueError, match="version 7"):
        Descriptor.decode(record.tobytes())
