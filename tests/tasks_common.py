"""Helpers shared by the task modules that run inside the rank-pool workers.

Every rank builds its inputs from ``(seed, rank)`` so any rank can regenerate any other rank's
data; checks gather all ranks' inputs with ``all_gather_object`` and compare the implementation's
output on this rank to :mod:`portep.reference`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from tests.rankpool import worker_cache


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set these environment variables inside the block, as they were afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


RANKS_PER_NODE_ENV = "PORTEP_RANKS_PER_NODE"
BACKEND_ENV = "PORTEP_BACKEND"
# The backend the session was started with (None: portep's default); tasks without an explicit
# backend use it.
_SESSION_BACKEND = os.environ.get(BACKEND_ENV)
# Test variants of a backend: its name and the environment its Buffers are created with.
# "ring-faults": the ring backend over Unix sockets whose receivers reorder and delay messages,
# with 4 KiB chunks so that messages span several chunks (and rows straddle them) and credits matter.
BACKEND_VARIANTS: dict[str, dict[str, str]] = {
    "ring-faults": {"PORTEP_BACKEND": "ring", "PORTEP_TRANSPORT": "fabric",
                    "PORTEP_FAULTS": "reorder,delay=4,seed=7", "PORTEP_CHUNK_BYTES": "4096"},
}
_VARIANT_VARS = ("PORTEP_TRANSPORT", "PORTEP_FAULTS", "PORTEP_CHUNK_BYTES")
_SESSION_VARS = {name: os.environ.get(name) for name in _VARIANT_VARS}


# ------------------------------------------------------------------------------------ inputs


def generator(seed: int, rank: int, salt: int = 0) -> torch.Generator:
    """The random stream of ``rank`` for test ``seed`` (``salt`` separates independent draws)."""
    return torch.Generator().manual_seed(seed * 1000 + rank + salt * 7919)


def make_routing(
    gen: torch.Generator, num_tokens: int, num_experts: int, topk: int, drop: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random routing: distinct experts per token (top-k of random scores), about ``drop`` of the
    slots set to -1, and the first token (if any) routed nowhere.

    Returns ``topk_idx`` int64 `[N, topk]` and ``topk_weights`` float32 `[N, topk]`.
    """
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_idx = scores.topk(topk, dim=1).indices.to(torch.int64)
    dropped = torch.rand(num_tokens, topk, generator=gen) < drop
    topk_idx = topk_idx.masked_fill(dropped, -1)
    if num_tokens > 1:
        topk_idx[0] = -1
    weights = torch.rand(num_tokens, topk, generator=gen) + 0.1
    return topk_idx.contiguous(), weights.float()


def make_x(gen: torch.Generator, num_tokens: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Random activations `[N, hidden]` with a per-token scale so FP8 groups differ in range."""
    x = torch.randn(num_tokens, hidden, generator=gen)
    x = x * (torch.rand(num_tokens, 1, generator=gen) * 4 + 0.25)
    return x.to(dtype)


class _Fp8Bytes:
    """An FP8 tensor in transit as bytes (torch cannot pickle float8 tensors through
    ``all_gather_object``)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.data = tensor.contiguous().view(torch.uint8)


def _encode(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.dtype == torch.float8_e4m3fn:
        return _Fp8Bytes(obj)
    if isinstance(obj, tuple | list):
        return type(obj)(_encode(o) for o in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, _Fp8Bytes):
        return obj.data.view(torch.float8_e4m3fn)
    if isinstance(obj, tuple | list):
        return type(obj)(_decode(o) for o in obj)
    return obj


def gather(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """``obj`` of every rank, by rank (tensors, FP8 ones included, inside tuples/lists)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, _encode(obj), group=group)
    return [_decode(o) for o in out]


# ----------------------------------------------------------------------------------- buffers


def set_topology(world_size: int, num_nodes: int, backend: str | None = None) -> int:
    """Set the virtual node size (and backend) for Buffers created next; returns ranks per node."""
    if world_size % num_nodes:
        raise ValueError(f"{num_nodes} nodes do not divide {world_size} ranks")
    ranks_per_node = world_size // num_nodes
    os.environ[RANKS_PER_NODE_ENV] = str(ranks_per_node)
    backend = backend or _SESSION_BACKEND
    env = BACKEND_VARIANTS.get(backend or "", {BACKEND_ENV: backend} if backend else {})
    for name, session_value in [(BACKEND_ENV, None), *_SESSION_VARS.items()]:
        value = env.get(name, session_value)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return ranks_per_node


def ht_buffer_bytes(hidden: int, world_size: int) -> tuple[int, int]:
    """(num_nvl_bytes, num_rdma_bytes) as DeepEP callers size an HT buffer (bf16 rows)."""
    import portep

    hidden_bytes = hidden * 2
    nvl = rdma = 0
    for config in (portep.Buffer.get_dispatch_config(world_size), portep.Buffer.get_combine_config(world_size)):
        nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden_bytes, world_size))
        rdma = max(rdma, config.get_rdma_buffer_size_hint(hidden_bytes, world_size))
    return nvl, rdma


def new_ht_buffer(world_size: int, num_nodes: int, hidden: int, backend: str | None = None, **kwargs: Any):
    """A fresh HT Buffer over WORLD with ``num_nodes`` virtual nodes (collective)."""
    import portep

    set_topology(world_size, num_nodes, backend)
    nvl, rdma = ht_buffer_bytes(hidden, world_size)
    return portep.Buffer(dist.group.WORLD, nvl, rdma, low_latency_mode=False, **kwargs)


def new_ll_buffer(
    world_size: int, num_nodes: int, max_tokens: int, hidden: int, num_experts: int,
    backend: str | None = None, env: dict[str, str] | None = None, **kwargs: Any,
):
    """A fresh LL Buffer sized with ``get_low_latency_rdma_size_hint`` (collective), created with
    the variables of ``env`` set (over those of the topology and backend)."""
    import portep

    set_topology(world_size, num_nodes, backend)
    rdma = portep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, world_size, num_experts)
    with environment(**(env or {})):
        return portep.Buffer(
            dist.group.WORLD, 0, rdma, low_latency_mode=True, num_qps_per_rank=max(num_experts // world_size, 1),
            **kwargs
        )


def cached(key: tuple, factory: Callable[[], Any]) -> Any:
    """``factory()`` once per worker and ``key`` (Buffers are collective to create: every rank
    must ask for the same keys in the same order, which tests do by running symmetric tasks)."""
    cache = worker_cache()
    if key not in cache:
        cache[key] = factory()
    return cache[key]


def ht_buffer(world_size: int, num_nodes: int, hidden: int, backend: str | None = None):
    """The worker's cached HT Buffer for this configuration."""
    set_topology(world_size, num_nodes, backend)
    return cached(("ht", world_size, num_nodes, hidden, backend),
                  lambda: new_ht_buffer(world_size, num_nodes, hidden, backend))


def ll_buffer(world_size: int, num_nodes: int, max_tokens: int, hidden: int, num_experts: int,
              backend: str | None = None):
    """The worker's cached LL Buffer for this configuration."""
    set_topology(world_size, num_nodes, backend)
    return cached(("ll", world_size, num_nodes, max_tokens, hidden, num_experts, backend),
                  lambda: new_ll_buffer(world_size, num_nodes, max_tokens, hidden, num_experts, backend))


# ------------------------------------------------------------------------------------ checks


class FaultsProved:
    """Around a task on a faulted backend variant: proof that the faults happened to its traffic —
    deliveries reordered and delayed, puts cut into several fragments, messages split into several
    chunks (stream credits then matter). A no-op on backends without faults."""

    def __init__(self, rank: int, buffer: Any, backend: str | None) -> None:
        self.rank, self.buffer = rank, buffer
        self.active = "PORTEP_FAULTS" in BACKEND_VARIANTS.get(backend or "", {})

    def _counts(self) -> dict[str, int]:
        stats = self.buffer.get_stats()
        names = ("proxy_transport_reordered", "proxy_transport_delayed", "proxy_transport_fragments",
                 "proxy_transport_puts", "messages_split", "chunks_read")
        return {name: stats.get(name, 0) for name in names}

    def __enter__(self) -> FaultsProved:
        self.start = self._counts() if self.active else {}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if not self.active or exc_type is not None:
            return
        d = {name: value - self.start[name] for name, value in self._counts().items()}
        where = f"rank {self.rank}: faulted run"
        assert d["proxy_transport_reordered"] > 0, f"{where}: nothing was reordered ({d})"
        assert d["proxy_transport_delayed"] > 0, f"{where}: nothing was delayed ({d})"
        assert d["proxy_transport_fragments"] > d["proxy_transport_puts"], f"{where}: no put was cut up ({d})"
        assert d["messages_split"] > 0, f"{where}: no message spanned several chunks ({d})"


def _first_mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.dtype == torch.float8_e4m3fn:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    diff = got != want
    if got.is_floating_point():
        diff &= ~(torch.isnan(got) & torch.isnan(want))
    where = diff.nonzero()
    if where.numel() == 0:
        return "no element differs"
    first = tuple(where[0].tolist())
    return (f"{int(diff.sum())} element(s) differ; first at {first}: "
            f"got {got[first].item()!r}, want {want[first].item()!r}")


def assert_equal(rank: int, name: str, got: Any, want: Any) -> None:
    """Bit-exact equality of tensors (FP8 compared as bytes) with a readable message."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"rank {rank}: {name}: expected a tensor, got {type(got).__name__}"
        assert got.dtype == want.dtype, f"rank {rank}: {name}: dtype {got.dtype}, expected {want.dtype}"
        assert tuple(got.shape) == tuple(want.shape), (
            f"rank {rank}: {name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        )
        if got.dtype == torch.float8_e4m3fn:
            same = torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        else:
            same = torch.equal(got, want)
        assert same, f"rank {rank}: {name}: {_first_mismatch(got, want)}"
    else:
        assert got == want, f"rank {rank}: {name}: got {got!r}, expected {want!r}"


def assert_close(rank: int, name: str, got: torch.Tensor, want: torch.Tensor, max_diff: float) -> float:
    """``calc_diff(got, want) < max_diff`` and no NaN/inf; returns the diff."""
    from portep.reference import calc_diff

    assert tuple(got.shape) == tuple(want.shape), (
        f"rank {rank}: {name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    )
    assert torch.isfinite(got.float()).all(), f"rank {rank}: {name}: contains NaN/inf"
    diff = calc_diff(got, want)
    assert diff < max_diff, f"rank {rank}: {name}: calc_diff={diff:.3g} >= {max_diff:g}"
    return diff


def assert_raises_naming(rank: int, what: str, call: Callable[[], Any], names: Sequence[str],
                         buffer: Any = None) -> str:
    """``call()`` must raise ValueError or TypeError whose message names one of ``names``, without
    communicating (the Buffer's exchange counter must not move). Returns the message."""
    before = buffer.get_stats().get("exchanges") if buffer is not None else None
    try:
        call()
    except (ValueError, TypeError) as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - any other error is a test failure with its type
        raise AssertionError(f"rank {rank}: {what}: raised {type(exc).__name__}: {exc}") from exc
    else:
        raise AssertionError(f"rank {rank}: {what}: no error raised")
    assert any(n in message for n in names), f"rank {rank}: {what}: message does not name {list(names)}: {message!r}"
    if before is not None:
        after = buffer.get_stats()["exchanges"]
        assert after == before, f"rank {rank}: {what}: communicated ({after - before} exchange(s)) before raising"
    return message
