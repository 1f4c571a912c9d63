"""``portep bench`` end to end on 2 ranks with small sizes: JSON fields, plots, checks; error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from portep import backends

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _portep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "portep.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", backends.available())
def test_quick_bench_writes_results(tmp_path: Path, name: str) -> None:
    result = _portep("bench", "--quick", "--ranks", "2", "--ranks-per-node", "1", "--backend", name,
                     "--ll-tokens", "4,8", "--ht-tokens", "4,8", "--max-iters", "3", "--c-tok-us", "2",
                     "--no-progress", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "x baseline" in result.stdout and "of limit" in result.stdout

    doc = json.loads((tmp_path / "bench.json").read_text())
    for key in ("machine", "versions", "parameters", "limit", "expert_mlp", "points", "round_trips", "fits", "model"):
        assert key in doc, key
    assert doc["versions"]["torch"] and doc["machine"]["cpus"]
    assert doc["parameters"]["backends"] == [name]
    assert doc["limit"]["value"] > 0 and doc["limit"]["samples_s"]
    combos = {(p["impl"], p["mode"], p["tokens"], p["op"]) for p in doc["points"]}
    for impl in ("portep", "baseline"):
        for mode in ("LL", "HT"):
            for tokens in (4, 8):
                for op in ("dispatch", "combine", "b2b round trip"):
                    assert (impl, mode, tokens, op) in combos
    for p in doc["points"]:
        assert p["check"]["ok"], p
        assert p["backend"] == (name if p["impl"] == "portep" else "all_to_all_single")
        assert len(p["samples_s"]) == len(p["rank_samples_s"][0]) >= 3
        assert len(p["rank_samples_s"]) == len(p["bytes_per_rank"]) == 2
        assert p["median_s"] > 0 and p["p99_s"] >= p["median_s"] and p["bytes_per_rank"][0] > 0
    modes = {(f["impl"], f["mode"]) for f in doc["fits"]}
    assert {("portep", "LL"), ("portep", "HT"), ("baseline", "a2a")} <= modes
    assert doc["model"] and "crossover" in doc["model"][0]
    summary = (tmp_path / "summary.md").read_text()
    assert "| portep" in summary and "back to back ms" in summary
    for name in ("time_vs_payload.png", "vs_baseline.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_compare_with_missing_module(tmp_path: Path) -> None:
    result = _portep("bench", "--compare", "no_such_deep_ep_module", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "no_such_deep_ep_module" in result.stderr and "not installed" in result.stderr
    assert not (tmp_path / "bench.json").exists()


def test_unknown_backend(tmp_path: Path) -> None:
    result = _portep("bench", "--backend", "no_such_backend", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "no_such_backend" in result.stderr


def test_descriptor_rate_runs_from_the_package() -> None:
    result = subprocess.run([sys.executable, "-m", "portep.bench.descriptor_rate", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
