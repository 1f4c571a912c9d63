"""Device kernels behind one interface.

``kernels_for(device)`` gives the :class:`~portep.native.interface.Kernels` for a device:

* ``cpu``: the vectorised torch implementation (``native/cpu.py``), which runs everywhere (and in CI);
* ``cuda`` (NVIDIA, or AMD under ROCm's torch): the CUDA/HIP kernels of ``native/kernels/*.cu``,
  compiled at run time through CuPy (``native/cuda.py``) when CuPy and a GPU are there; without
  CuPy the torch implementation runs on the GPU instead.
"""

from __future__ import annotations

import warnings

import torch

from . import cpu
from .cpu import CPU_KERNELS, Field, RowFormat
from .interface import Kernels

__all__ = ["CPU_KERNELS", "Field", "Kernels", "RowFormat", "cpu", "kernels_for"]

_warned: set[str] = set()


def kernels_for(device: torch.device | str | None = None) -> Kernels:
    """The kernels for tensors on ``device`` (default: the CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return CPU_KERNELS
    from . import cuda

    reason = cuda.unavailable_reason()
    if reason is None:
        return cuda.kernels(device)
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"portep: native GPU kernels unavailable ({reason}); using torch ops on {device}",
                      RuntimeWarning, stacklevel=2)
    return CPU_KERNELS
