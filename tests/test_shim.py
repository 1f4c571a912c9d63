"""The opt-in ``deep_ep`` name resolves to portep."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent.parent / "compat" / "deep_ep"


def _run(code: str, *path: Path) -> subprocess.CompletedProcess:
    env_path = ":".join(str(p) for p in path)
    prefix = f"import sys; sys.path[:0] = {env_path.split(':') if env_path else []!r}; "
    return subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, timeout=120)


def test_shim_package_is_portep() -> None:
    code = ("import deep_ep, portep; assert deep_ep is portep; "
            "from deep_ep import Buffer, Config, EventOverlap, topk_idx_t; assert Buffer is portep.Buffer; print('ok')")
    result = _run(code, SHIM_DIR)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_install_alias_in_process() -> None:
    code = "import portep; portep.install_deep_ep_alias(); import deep_ep; assert deep_ep.Buffer is portep.Buffer"
    result = _run(code)
    assert result.returncode == 0, result.stderr
