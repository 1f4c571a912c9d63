"""DeepEP's Python API surface (single process): exports, signatures, defaults, static helpers."""

from __future__ import annotations

import inspect

import pytest
import torch

import portep

_ = inspect.Parameter.empty
REQUIRED = _

# name -> [(parameter, default)] exactly as in DeepEP (API.md), ``self`` excluded.
BUFFER_METHODS: dict[str, list[tuple[str, object]]] = {
    "__init__": [
        ("group", REQUIRED), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0), ("low_latency_mode", False),
        ("num_qps_per_rank", 24), ("allow_nvlink_for_low_latency_mode", True), ("allow_mnnvl", False),
        ("use_fabric", False), ("explicitly_destroy", False), ("enable_shrink", False), ("comm", None),
    ],
    "destroy": [],
    "get_comm_stream": [],
    "get_local_buffer_tensor": [("dtype", REQUIRED), ("size", None), ("offset", 0), ("use_rdma_buffer", False)],
    "get_dispatch_layout": [
        ("topk_idx", REQUIRED), ("num_experts", REQUIRED), ("previous_event", None), ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "dispatch": [
        ("x", REQUIRED), ("handle", None), ("num_tokens_per_rank", None), ("num_tokens_per_rdma_rank", None),
        ("is_token_in_rank", None), ("num_tokens_per_expert", None), ("topk_idx", None), ("topk_weights", None),
        ("expert_alignment", 1), ("num_worst_tokens", 0), ("config", None), ("previous_event", None),
        ("async_finish", False), ("allocate_on_comm_stream", False),
    ],
    "combine": [
        ("x", REQUIRED), ("handle", REQUIRED), ("topk_weights", None), ("bias", None), ("config", None),
        ("previous_event", None), ("async_finish", False), ("allocate_on_comm_stream", False),
    ],
    "low_latency_dispatch": [
        ("x", REQUIRED), ("topk_idx", REQUIRED), ("num_max_dispatch_tokens_per_rank", REQUIRED),
        ("num_experts", REQUIRED), ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None), ("use_fp8", True), ("round_scale", False), ("use_ue8m0", False),
        ("async_finish", False), ("return_recv_hook", False),
    ],
    "low_latency_combine": [
        ("x", REQUIRED), ("topk_idx", REQUIRED), ("topk_weights", REQUIRED), ("handle", REQUIRED),
        ("use_logfmt", False), ("zero_copy", False), ("async_finish", False), ("return_recv_hook", False),
        ("out", None), ("combine_wait_recv_cost_stats", None),
    ],
    "get_next_low_latency_combine_buffer": [("handle", REQUIRED)],
    "clean_low_latency_buffer": [
        ("num_max_dispatch_tokens_per_rank", REQUIRED), ("hidden", REQUIRED), ("num_experts", REQUIRED),
    ],
    "low_latency_update_mask_buffer": [("rank_to_mask", REQUIRED), ("mask", False)],
    "low_latency_query_mask_buffer": [("mask_status", REQUIRED)],
    "low_latency_clean_mask_buffer": [],
}

BUFFER_STATIC: dict[str, list[tuple[str, object]]] = {
    "set_num_sms": [("new_num_sms", REQUIRED)],
    "capture": [],
    "get_low_latency_rdma_size_hint": [
        ("num_max_dispatch_tokens_per_rank", REQUIRED), ("hidden", REQUIRED), ("num_ranks", REQUIRED),
        ("num_experts", REQUIRED),
    ],
    "get_dispatch_config": [("num_ranks", REQUIRED)],
    "get_combine_config": [("num_ranks", REQUIRED)],
    "is_sm90_compiled": [],
}

CONFIG_INIT = [
    ("num_sms", 20), ("num_max_nvl_chunked_send_tokens", 6), ("num_max_nvl_chunked_recv_tokens", 256),
    ("num_max_rdma_chunked_send_tokens", 6), ("num_max_rdma_chunked_recv_tokens", 256),
]


def _params(func: object, skip_self: bool) -> list[tuple[str, object]]:
    params = list(inspect.signature(func).parameters.values())
    if skip_self:
        assert params and params[0].name == "self", f"{func}: first parameter must be self"
        params = params[1:]
    return [(p.name, p.default) for p in params]


def test_exports() -> None:
    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t"):
        assert hasattr(portep, name), f"portep does not export {name}"
    assert portep.topk_idx_t == torch.int64


@pytest.mark.parametrize("method", sorted(BUFFER_METHODS))
def test_buffer_method_signature(method: str) -> None:
    func = getattr(portep.Buffer, method, None)
    assert func is not None, f"Buffer.{method} is missing"
    assert not isinstance(inspect.getattr_static(portep.Buffer, method), staticmethod | classmethod), (
        f"Buffer.{method} must be an instance method")
    assert _params(func, skip_self=True) == BUFFER_METHODS[method]


@pytest.mark.parametrize("method", sorted(BUFFER_STATIC))
def test_buffer_static_signature(method: str) -> None:
    assert isinstance(inspect.getattr_static(portep.Buffer, method, None), staticmethod), (
        f"Buffer.{method} must be a staticmethod")
    assert _params(getattr(portep.Buffer, method), skip_self=False) == BUFFER_STATIC[method]


def test_config_signature_and_defaults() -> None:
    assert _params(portep.Config.__init__, skip_self=True) == CONFIG_INIT
    config = portep.Config()
    for name, default in CONFIG_INIT:
        assert getattr(config, name) == default
    positional = portep.Config(24, 8, 128, 8, 128)  # DeepEP callers pass them positionally
    assert (positional.num_sms, positional.num_max_nvl_chunked_recv_tokens) == (24, 128)
    for name in ("get_nvl_buffer_size_hint", "get_rdma_buffer_size_hint"):
        assert _params(getattr(portep.Config, name), skip_self=True) == [("hidden_bytes", _), ("num_ranks", _)]


def test_config_size_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTEP_RANKS_PER_NODE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    hidden_bytes = 7168 * 2
    for num_ranks in (2, 4, 8, 16, 32):
        for config in (portep.Config(), portep.Buffer.get_dispatch_config(num_ranks),
                       portep.Buffer.get_combine_config(num_ranks)):
            assert isinstance(config, portep.Config)
            nvl = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
            assert isinstance(nvl, int) and nvl > 0, f"nvl hint {nvl} for {num_ranks} ranks"
            rdma = config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks)
            assert isinstance(rdma, int)
            # DeepEP: no RDMA buffer within one node (8 ranks per node by default), positive beyond.
            assert (rdma > 0) == (num_ranks > 8), f"rdma hint {rdma} for {num_ranks} ranks"
    small, large = portep.Config(), portep.Config()
    assert small.get_nvl_buffer_size_hint(1024, 8) < large.get_nvl_buffer_size_hint(8192, 8)


def test_ll_size_hint() -> None:
    hint = portep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 16, 256)
    assert isinstance(hint, int) and hint > 0 and hint % 128 == 0
    # DeepEP's formula: two halves of (send + recv + signalling), rounded to 128 bytes.
    t, h, e = 128, 7168, 256  # the formula does not depend on the number of ranks
    scales = h // 128
    dispatch_msg = 16 + max(h * 2, h + scales * 4)
    combine_msg = scales * 4 + h * 2
    send = max(t * dispatch_msg, e * t * combine_msg)
    recv = max(e * t * dispatch_msg, e * t * combine_msg)
    signal = (e * 4 + 127) // 128 * 128
    total = 2 * (send + recv + signal)
    assert hint == (total + 128) // 128 * 128
    assert portep.Buffer.get_low_latency_rdma_size_hint(256, 7168, 16, 256) > hint


def test_num_sms_default_and_setter() -> None:
    assert portep.Buffer.num_sms == 20
    try:
        portep.Buffer.set_num_sms(24)
        assert portep.Buffer.num_sms == 24
        assert portep.Buffer.get_dispatch_config(8).num_sms == 24
    finally:
        portep.Buffer.set_num_sms(20)
    assert portep.Buffer.num_sms == 20
    with pytest.raises((ValueError, TypeError)):
        portep.Buffer.set_num_sms(3)


def test_static_helpers() -> None:
    assert isinstance(portep.Buffer.is_sm90_compiled(), bool)
    event = portep.Buffer.capture()
    assert isinstance(event, portep.EventOverlap)
    event.current_stream_wait()


def test_event_overlap() -> None:
    assert _params(portep.EventOverlap.__init__, skip_self=True) == [("event", None), ("extra_tensors", None)]
    keep = torch.ones(3)
    overlap = portep.EventOverlap(None, (keep,))
    assert overlap.extra_tensors == (keep,)
    with portep.EventOverlap() as entered:
        assert isinstance(entered, portep.EventOverlap)
    captured = portep.Buffer.capture()
    with captured:
        pass
    captured.current_stream_wait()
