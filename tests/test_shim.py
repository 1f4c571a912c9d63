"""The opt-in ``deep_ep`` name resolves to portep, with DeepEP's whole module layout.

Both forms of the shim are checked, each in a fresh interpreter: the installable package in
``compat/deep_ep`` (put on ``sys.path`` as ``pip install`` would) and
``portep.install_deep_ep_alias()``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SHIM_DIR = Path(__file__).resolve().parent.parent / "compat" / "deep_ep"

# How each form makes ``deep_ep`` importable.
FORMS = {
    "package": f"import sys; sys.path.insert(0, {str(SHIM_DIR)!r})",
    "alias": "import portep; portep.install_deep_ep_alias()",
}

# Every name DeepEP's modules define that callers use, checked against the portep object behind it.
LAYOUT_CHECK = """
import importlib.util
import sys

import deep_ep
import deep_ep.buffer
import deep_ep.utils
import deep_ep_cpp
import portep
import portep.buffer
import portep.deep_ep_cpp
import portep.utils
import torch

# Modules: one object per module, whichever name it is imported by.
assert deep_ep is portep
assert deep_ep.utils is portep.utils and sys.modules["deep_ep.utils"] is portep.utils
assert deep_ep.buffer is portep.buffer and sys.modules["deep_ep.buffer"] is portep.buffer
assert deep_ep_cpp is portep.deep_ep_cpp and sys.modules["deep_ep_cpp"] is portep.deep_ep_cpp
from deep_ep import buffer, utils
assert (buffer, utils) == (portep.buffer, portep.utils)
assert importlib.util.find_spec("deep_ep") is not None  # how vLLM probes for DeepEP
assert importlib.util.find_spec("deep_ep.utils") is not None

# deep_ep (its __init__ exports), as the frameworks import them.
from deep_ep import Buffer, Config, EventHandle, EventOverlap, topk_idx_t
assert Buffer is portep.Buffer and Config is portep.Config and EventOverlap is portep.EventOverlap
assert EventHandle is portep.EventHandle
assert topk_idx_t is torch.int64
try:
    from deep_ep import HybridEPBuffer  # noqa: F401  optional in Megatron-core: must be an ImportError
except ImportError:
    pass
else:
    raise AssertionError("deep_ep.HybridEPBuffer must not exist")

# deep_ep.buffer
from deep_ep.buffer import Buffer as B2, Config as C2, EventHandle as H2, EventOverlap as O2
assert (B2, C2, H2, O2) == (Buffer, Config, EventHandle, EventOverlap)

# deep_ep.utils (Megatron-core: from deep_ep.utils import EventHandle, EventOverlap)
from deep_ep.utils import Config as C3, EventHandle as H3, EventOverlap as O3, check_nvlink_connections
assert (C3, H3, O3) == (Config, EventHandle, EventOverlap)

# deep_ep_cpp (XTuner: from deep_ep_cpp import EventHandle; DeepEP: Config, topk_idx_t)
from deep_ep_cpp import Config as C4, EventHandle as H4, get_low_latency_rdma_size_hint, is_sm90_compiled
from deep_ep_cpp import topk_idx_t as T4
assert (C4, H4, T4) == (Config, EventHandle, torch.int64)
assert get_low_latency_rdma_size_hint(128, 7168, 16, 256) == Buffer.get_low_latency_rdma_size_hint(128, 7168, 16, 256)
assert is_sm90_compiled() is True and Buffer.is_sm90_compiled() is True

# Semantics on this (CPU) machine: events are complete, overlap wrappers wait for nothing.
handle = EventHandle()
handle.current_stream_wait()
assert handle.query()
overlap = EventOverlap(handle, extra_tensors=(torch.zeros(2),))
overlap.current_stream_wait()
with overlap as entered:
    assert entered is overlap
assert isinstance(Buffer.capture(), EventOverlap)
with EventOverlap():  # no event: leaving the block waits for nothing
    pass
config = Config(24, 8, 256, 16, 128)
assert config.get_nvl_buffer_size_hint(7168 * 2, 8) > 0
assert isinstance(Buffer.get_dispatch_config(8), Config)

# check_nvlink_connections: any process group passes (no NVLink needed), anything else is refused.
import tempfile

import torch.distributed as dist

with tempfile.TemporaryDirectory() as tmp:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    try:
        assert check_nvlink_connections(dist.group.WORLD) is None
        assert check_nvlink_connections(dist.new_group([0])) is None
    finally:
        dist.destroy_process_group()
try:
    check_nvlink_connections("world")
except TypeError as exc:
    assert "check_nvlink_connections" in str(exc)
else:
    raise AssertionError("check_nvlink_connections accepted a non-group")
print("ok")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ok", result.stdout


@pytest.mark.parametrize("form", sorted(FORMS))
def test_deep_ep_layout(form: str) -> None:
    """deep_ep, deep_ep.buffer, deep_ep.utils and deep_ep_cpp with every name DeepEP gives them."""
    _assert_ok(_run(FORMS[form] + "\n" + textwrap.dedent(LAYOUT_CHECK)))


@pytest.mark.parametrize("first", ["deep_ep.utils", "deep_ep.buffer", "deep_ep_cpp"])
def test_package_submodule_imported_first(first: str) -> None:
    """A submodule imported before ``deep_ep`` itself is still portep's module, not a copy."""
    target = {"deep_ep.utils": "portep.utils", "deep_ep.buffer": "portep.buffer",
              "deep_ep_cpp": "portep.deep_ep_cpp"}[first]
    code = (f"{FORMS['package']}\nimport importlib, sys\nmodule = importlib.import_module({first!r})\n"
            f"assert module is importlib.import_module({target!r}), module\n"
            "copies = {id(m) for m in list(sys.modules.values()) if getattr(m, '__file__', None) == module.__file__}\n"
            "assert len(copies) == 1, f'{module.__file__} loaded {len(copies)} times'\n"
            "print('ok')")
    _assert_ok(_run(code))


def test_alias_leaves_a_real_deep_ep_alone() -> None:
    """With another ``deep_ep`` already imported, the alias changes nothing."""
    code = textwrap.dedent("""
        import sys, types
        real = types.ModuleType("deep_ep")
        sys.modules["deep_ep"] = real
        import portep
        portep.install_deep_ep_alias()
        assert sys.modules["deep_ep"] is real
        assert "deep_ep.utils" not in sys.modules and "deep_ep_cpp" not in sys.modules
        print("ok")
    """)
    _assert_ok(_run(code))


def test_alias_is_idempotent() -> None:
    code = textwrap.dedent("""
        import sys
        import portep
        portep.install_deep_ep_alias()
        first = {name: sys.modules[name] for name in ("deep_ep", "deep_ep.utils", "deep_ep.buffer", "deep_ep_cpp")}
        portep.install_deep_ep_alias()
        assert all(sys.modules[name] is module for name, module in first.items())
        print("ok")
    """)
    _assert_ok(_run(code))
