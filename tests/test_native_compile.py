"""Every kernel source compiles: with nvcc for sm_90, with hipcc for an AMD CDNA target, and in the
exact form the run-time loader hands to NVRTC/hiprtc (headers inlined, the loader's defines).

Compile only: nothing runs, so no GPU is needed. Each compiler's tests skip, saying so, where that
compiler is absent.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from portep.native import cuda
from portep.native.engine import Ring
from portep.proxy.descriptor import Descriptor, Op

NATIVE = cuda.NATIVE_DIR
SOURCES = sorted(cuda.KERNEL_DIR.glob("*.cu"))
NAMES = [path.stem for path in SOURCES]
NVCC = shutil.which("nvcc")
HIPCC = shutil.which("hipcc")
CUDA_ARCH = "sm_90"
# MI300X first; older compilers (clang < 17) only know its predecessors of the same wave64 family.
HIP_ARCHES = ("gfx942", "gfx940", "gfx90a")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
needs_hipcc = pytest.mark.skipif(HIPCC is None, reason="hipcc is not on PATH (ROCm's HIP compiler)")


def _compile(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HIP_PLATFORM": "amd"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, f"{what} failed:\n{result.stdout}\n{result.stderr}"


def _runtime_text(name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{name}.rtc.cu"
    path.write_text(cuda.kernel_source(name))
    return path


def test_sources_are_found() -> None:
    assert set(cuda.KERNEL_MODULES) == set(NAMES), "native/cuda.py's KERNEL_MODULES and native/kernels/*.cu differ"


def test_runtime_text_is_self_contained() -> None:
    """The loader inlines portep's headers (hiprtc ignores -I, CuPy strips #include lines on some ROCm)."""
    for name in NAMES:
        text = cuda.kernel_source(name)
        assert not re.search(r'^\s*#\s*include\s+"', text, re.MULTILINE), f"{name}: an #include \"...\" is left"
        assert text.count("typedef struct portep_descriptor") == 1


def test_every_launched_kernel_is_defined() -> None:
    defined = set()
    for path in SOURCES:
        defined |= set(re.findall(r'extern "C" __global__ void (\w+)\(', path.read_text()))
    launched = set(re.findall(r'"(portep_\w+)"', Path(cuda.__file__).read_text()))
    assert launched <= defined, f"launched but not defined: {sorted(launched - defined)}"


def test_ring_layout_in_header_is_what_the_engine_writes() -> None:
    """The kernels' descriptor writer and the compiled proxy share the ring layout of the header."""
    header = (NATIVE / "portep_descriptor.h").read_text()
    offsets = {name: int(value) for name, value in re.findall(r"#define PORTEP_RING_(\w+)_OFFSET (\d+)", header)}
    record = Descriptor(Op.PUT_SIGNAL, 3, 1, 2, 3, 4, 5).to_record()
    with Ring.create(8) as ring:
        assert ring.push(record) == 1
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * ring.nbytes).from_address(ring.address))
        word = lambda name: int(raw[offsets[name] : offsets[name] + 8].view(np.uint64)[0])  # noqa: E731
        assert (word("HEAD"), word("TAIL"), word("CAPACITY")) == (1, 0, 8)
        assert raw[offsets["SLOTS"] : offsets["SLOTS"] + 32].tobytes() == record.tobytes()


@needs_nvcc
@pytest.mark.parametrize("name", NAMES)
def test_nvcc_compiles_source(name: str, tmp_path: Path) -> None:
    source = cuda.KERNEL_DIR / f"{name}.cu"
    _check(_compile([NVCC, f"-arch={CUDA_ARCH}", "-std=c++17", "-c", "-I", str(NATIVE), str(source),
                     "-o", str(tmp_path / f"{name}.o")]), f"nvcc {source.name}")


@needs_nvcc
@pytest.mark.parametrize(("name", "soft_fp8"), [*((name, False) for name in NAMES), ("fp8", True)],
                         ids=[*NAMES, "fp8-soft_fp8"])
def test_nvcc_compiles_runtime_text(name: str, soft_fp8: bool, tmp_path: Path) -> None:
    """What NVRTC gets: the inlined text with the loader's options (and fp8.cu's software FP8 path)."""
    source = _runtime_text(name, tmp_path)
    _check(_compile([NVCC, f"-arch={CUDA_ARCH}", "-c", *cuda.compile_options(soft_fp8), str(source),
                     "-o", str(tmp_path / f"{name}.o")]), f"nvcc (runtime text) {name}")


@pytest.fixture(scope="module")
def hip_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first of HIP_ARCHES this hipcc knows."""
    probe = tmp_path_factory.mktemp("hip") / "probe.cu"
    probe.write_text("#include <hip/hip_runtime.h>\n__global__ void probe() {}\n")
    for arch in HIP_ARCHES:
        result = _compile([HIPCC, f"--offload-arch={arch}", "-x", "hip", "-c", str(probe), "-o",
                           str(probe.with_suffix(".o"))])
        if result.returncode == 0:
            return arch
        if "invalid target" not in result.stderr and "unknown target" not in result.stderr:
            _check(result, "hipcc probe")
    pytest.skip(f"this hipcc knows none of {HIP_ARCHES}")


@needs_hipcc
@pytest.mark.parametrize("name", NAMES)
def test_hipcc_compiles_source(name: str, hip_arch: str, tmp_path: Path) -> None:
    source = cuda.KERNEL_DIR / f"{name}.cu"
    _check(_compile([HIPCC, f"--offload-arch={hip_arch}", "-x", "hip", "-std=c++17", "-c", "-I", str(NATIVE),
                     str(source), "-o", str(tmp_path / f"{name}.o")]), f"hipcc {source.name} ({hip_arch})")


@needs_hipcc
@pytest.mark.parametrize("name", NAMES)
def test_hipcc_compiles_runtime_text(name: str, hip_arch: str, tmp_path: Path) -> None:
    """What hiprtc gets: the inlined text, the loader's options, and the HIP runtime header it implies."""
    source = _runtime_text(name, tmp_path)
    _check(_compile([HIPCC, f"--offload-arch={hip_arch}", "-x", "hip", *cuda.compile_options(), "-include",
                     "hip/hip_runtime.h", "-c", str(source), "-o", str(tmp_path / f"{name}.o")]),
           f"hipcc (runtime text) {name} ({hip_arch})")
