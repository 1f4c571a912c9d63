"""The communication buffer: DeepEP's ``Buffer`` API on top of portep's backends.

Every public method checks its arguments first (so bad input fails before any communication
and leaves the Buffer usable), then runs the HT (:mod:`portep.ht`) or LL (:mod:`portep.ll`)
algorithm over the selected backend (:mod:`portep.backends`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from portep import backends, ht, ll
from portep import validation as check
from portep.config import Config, combine_config, dispatch_config
from portep.deadlines import default_timeout_s
from portep.event import EventHandle, EventOverlap, current_stream
from portep.ll_layout import LowLatencyLayout, low_latency_rdma_size_hint
from portep.memory import POOL, ZeroedBytes
from portep.native import cpu, kernels_for
from portep.topology import Topology, discover

_buffer_ids = itertools.count(1)
DEVICE_ENV = "PORTEP_DEVICE"


def default_device() -> torch.device:
    """Where a Buffer's tensors live: ``PORTEP_DEVICE`` (``cpu`` or ``cuda``), default ``cpu``.

    On ``cuda`` the kernels run on the GPU and rows cross between ranks through host windows."""
    name = os.environ.get(DEVICE_ENV, "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{DEVICE_ENV}=cuda but torch sees no GPU")
        return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"{DEVICE_ENV}={name!r}: expected cpu or cuda")


def _event(async_finish: bool, *tensors: Any) -> EventOverlap:
    if not async_finish:
        return EventOverlap(None)
    return EventOverlap(EventHandle(), tuple(t for t in tensors if t is not None))


class Buffer:
    """Expert-parallel communication buffer, a drop-in for ``deep_ep.Buffer``.

    Supports high-throughput dispatch/combine (hierarchical: once over the network per
    destination node, then inside the node) and low-latency dispatch/combine (direct,
    expert-major, with receive hooks for overlap).

    Arguments:
        group: the ``torch.distributed`` process group of the expert-parallel ranks.
        num_nvl_bytes: bytes of intra-node buffer (see :meth:`Config.get_nvl_buffer_size_hint`).
        num_rdma_bytes: bytes of registered inter-node buffer; in LL mode at least
            :meth:`get_low_latency_rdma_size_hint`.
        low_latency_mode: enable the LL calls.
        num_qps_per_rank: queue pairs per peer (transport hint).
        allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: accepted for compatibility;
            portep picks the intra-node path itself.
        explicitly_destroy: require :meth:`destroy` to release resources.
        enable_shrink: enable the rank mask of the LL calls.
        comm: an mpi4py communicator (not used; ``group`` is required).

    Ranks are grouped into nodes of ``PORTEP_RANKS_PER_NODE`` (else ``LOCAL_WORLD_SIZE``, else
    by host name) consecutive ranks; ``PORTEP_BACKEND`` selects the backend.
    """

    num_sms: int = 20

    def __init__(self, group: dist.ProcessGroup | None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm: Any = None) -> None:
        op = "Buffer"
        if group is None:
            if not dist.is_initialized():
                raise ValueError(f"{op}: group is required (torch.distributed is not initialised)")
            group = dist.group.WORLD
        check.check_int(op, "num_nvl_bytes", num_nvl_bytes)
        check.check_int(op, "num_rdma_bytes", num_rdma_bytes)
        check.check_int(op, "num_qps_per_rank", num_qps_per_rank, minimum=1)
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.group_size: int = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.use_fabric = use_fabric
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.buffer_id = next(_buffer_ids)
        self.timeout_s = default_timeout_s()
        self.topology: Topology = discover(group)
        self.device = default_device()
        self._backend = backends.create(backends.default_backend_name(), group, self.topology, self.timeout_s)
        self._nvl_bytes = ZeroedBytes(num_nvl_bytes, self.device)
        self._rdma_bytes = ZeroedBytes(num_rdma_bytes, self.device)
        self._ll_half = 0
        self._mask = torch.zeros(self.group_size, dtype=torch.int32)
        self._masked_cache: tuple[tuple[int, ...], torch.Tensor] | None = None  # (mask, what _masked returns)
        self._ll_layouts: dict[tuple[int, int, int], LowLatencyLayout] = {}
        self._last_layout: _Versions | None = None  # what get_dispatch_layout returned last
        self._destroyed = False

    # ------------------------------------------------------------------ static API
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the number of SMs (parallel channels x 2) used by HT kernels; must be even."""
        check.check_int("set_num_sms", "new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2:
            raise ValueError(f"set_num_sms: new_num_sms must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` an LL buffer needs (same value as DeepEP)."""
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Recommended HT dispatch :class:`Config` for ``num_ranks`` ranks."""
        return dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Recommended HT combine :class:`Config` for ``num_ranks`` ranks."""
        return combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: portep has the SM90 feature set (FP8 casts, UE8M0 scales) on every device."""
        return True

    # ------------------------------------------------------------------ lifecycle
    def _live(self, op: str) -> None:
        if self._destroyed:
            raise RuntimeError(f"{op}: this Buffer was destroyed")

    def destroy(self) -> None:
        """Release the buffer's resources (only with ``explicitly_destroy=True``); collective."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy: only a Buffer created with explicitly_destroy=True can be destroyed")
        self._live("destroy")
        self._backend.barrier("destroy")
        self._backend.close()
        self._nvl_bytes = self._rdma_bytes = ZeroedBytes(0)
        self._destroyed = True

    def get_comm_stream(self) -> Any:
        """The stream communication runs on (a placeholder on CPU)."""
        return current_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | tuple | None = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A `dtype` view of this rank's intra-node (or RDMA) buffer, from byte ``offset``."""
        op = "get_local_buffer_tensor"
        self._live(op)
        buffer = (self._rdma_bytes if use_rdma_buffer else self._nvl_bytes).tensor
        check.check_int(op, "offset", offset)
        item = dtype.itemsize
        if offset % item:
            raise ValueError(f"{op}: offset={offset} is not a multiple of the {dtype} element size {item}")
        available = (buffer.numel() - offset) // item if offset <= buffer.numel() else -1
        numel = available if size is None else int(torch.Size(size).numel())
        if available < 0 or numel > available:
            raise ValueError(f"{op}: {numel} x {dtype} from offset {offset} exceeds the {buffer.numel()}-byte buffer")
        view = buffer[offset : offset + numel * item].view(dtype)
        return view if size is None else view.view(size)

    def get_stats(self) -> dict[str, int]:
        """What this rank has sent so far: rows and bytes per scope (``world``, ``node`` (intra-node)
        and ``peers`` (inter-node)); ``ht_internode_rows`` counts HT rows sent to other nodes
        (dispatch copies and combine partial sums). The ring backend adds its data path's counters:
        ``chunks_written``/``chunks_read`` and the proxy's ``proxy_descriptors``, ``proxy_bytes``,
        ``proxy_signals``, ``proxy_max_queue_depth`` and others."""
        stats = self._backend.stats
        out = {"exchanges": stats.exchanges, "ht_internode_rows": stats.rows_sent["peers"]}
        for scope in ("world", "node", "peers"):
            out[f"rows_{scope}"] = stats.rows_sent[scope]
            out[f"bytes_{scope}"] = stats.bytes_sent[scope]
        out.update(self._backend.data_path_stats())
        return out

    @property
    def backend_name(self) -> str:
        """Name of the backend that moves this Buffer's data."""
        return self._backend.name

    # ------------------------------------------------------------------ HT mode
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Count what a dispatch of ``topk_idx`` will move (local computation, no communication).

        Arguments:
            topk_idx: `[num_tokens, num_topk]` int64 expert ids, -1 for none.
            num_experts: total experts, a multiple of the group size.

        Returns:
            num_tokens_per_rank: `[num_ranks]` int32.
            num_tokens_per_rdma_rank: `[num_nodes]` int32, or None on a single node.
            num_tokens_per_expert: `[num_experts]` int32.
            is_token_in_rank: `[num_tokens, num_ranks]` bool.
            event: an :class:`EventOverlap` (with an event when ``async_finish``).
        """
        op = "get_dispatch_layout"
        self._live(op)
        check.check_device(op, self.device, topk_idx=topk_idx)
        check.check_num_experts(op, num_experts, self.group_size)
        check.check_topk_idx(op, topk_idx, num_experts)
        check.check_comm_stream_args(op, allocate_on_comm_stream, previous_event, async_finish)
        layout = cpu.dispatch_layout(topk_idx, num_experts, self.group_size, self.topology.ranks_per_node)
        self._last_layout = _Versions((topk_idx, *layout))
        return (*layout, _event(async_finish, topk_idx, *layout))

    def _check_layout(self, op: str, num_tokens: int, num_tokens_per_rank: Any, num_tokens_per_rdma_rank: Any,
                      is_token_in_rank: Any, num_tokens_per_expert: Any, topk_idx: Any) -> None:
        ranks = self.group_size
        for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
            if value is None:
                raise ValueError(f"{op}: {name} is required without a handle (from get_dispatch_layout)")
        check.check_tensor(op, "num_tokens_per_rank", num_tokens_per_rank, torch.int32, (ranks,))
        check.check_tensor(op, "is_token_in_rank", is_token_in_rank, torch.bool, (num_tokens, ranks))
        check.check_tensor(op, "num_tokens_per_expert", num_tokens_per_expert, torch.int32, (None,))
        num_experts = check.check_num_experts(op, num_tokens_per_expert.numel(), ranks)
        if num_tokens_per_rdma_rank is not None:
            check.check_tensor(op, "num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, torch.int32,
                               (self.topology.num_nodes,))
        # What this Buffer's get_dispatch_layout computed from this very topk_idx, untouched since, is
        # consistent by construction: the checks against topk_idx below would only redo that work.
        if self._last_layout is not None and self._last_layout.same(
                (topk_idx, num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)):
            check.check_topk_idx(op, topk_idx, num_experts, num_tokens)
            return
        if not torch.equal(num_tokens_per_rank, is_token_in_rank.sum(0, dtype=torch.int32)):
            raise ValueError(f"{op}: num_tokens_per_rank does not match is_token_in_rank")
        if topk_idx is None:
            return
        check.check_topk_idx(op, topk_idx, num_experts, num_tokens)
        _, _, per_expert, in_rank = cpu.dispatch_layout(topk_idx, num_experts, ranks, self.topology.ranks_per_node)
        if not torch.equal(per_expert, num_tokens_per_expert):
            raise ValueError(f"{op}: num_tokens_per_expert does not match topk_idx")
        if (in_rank & ~is_token_in_rank).any():
            raise ValueError(f"{op}: is_token_in_rank misses ranks that hold experts selected in topk_idx")

    def dispatch(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], handle: ht.HTHandle | None = None,
                 num_tokens_per_rank: torch.Tensor | None = None,
                 num_tokens_per_rdma_rank: torch.Tensor | None = None,
                 is_token_in_rank: torch.Tensor | None = None, num_tokens_per_expert: torch.Tensor | None = None,
                 topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Config | None = None,
                 previous_event: EventOverlap | None = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> tuple:
        """HT dispatch: send each token to every rank holding one of its experts.

        Arguments:
            x: `[num_tokens, hidden]` bf16/fp16/fp32, or `(x_fp8 [num_tokens, hidden] float8_e4m3fn,
                scales [num_tokens, num_scales] float32)` (any strides).
            handle: from an earlier dispatch with the same routing (cached mode), else None.
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                from :meth:`get_dispatch_layout` (not needed with ``handle``).
            topk_idx: `[num_tokens, num_topk]` int64; topk_weights: `[num_tokens, num_topk]` float32.
            expert_alignment: round each per-expert count up to this multiple.
            num_worst_tokens: if > 0, pad outputs to this many rows and skip the host-side list.
            config: HT tuning knobs (default: :meth:`get_dispatch_config`).

        Returns:
            recv_x: `[num_recv, hidden]` (or the FP8 tuple), grouped by source rank in source order.
            recv_topk_idx: `[num_recv, num_topk]` int64 local expert ids, -1 for experts elsewhere.
            recv_topk_weights: `[num_recv, num_topk]` float32, 0 where recv_topk_idx is -1.
            num_recv_tokens_per_expert_list: list[int] per local expert (empty with num_worst_tokens).
            handle: for :meth:`combine` and cached dispatch.
            event: :class:`EventOverlap`.
            In cached mode: `(recv_x, None, None, None, None, event)`.
        """
        op = "dispatch"
        self._live(op)
        data, scales = check.split_x(op, x)
        check.check_device(op, self.device, x=data, scales=scales, topk_idx=topk_idx, topk_weights=topk_weights,
                           is_token_in_rank=is_token_in_rank, num_tokens_per_rank=num_tokens_per_rank,
                           num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                           num_tokens_per_expert=num_tokens_per_expert)
        num_tokens = data.size(0)
        check.check_int(op, "expert_alignment", expert_alignment, minimum=1)
        check.check_int(op, "num_worst_tokens", num_worst_tokens)
        check.check_comm_stream_args(op, allocate_on_comm_stream, previous_event, async_finish)
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"{op}: config must be a portep Config, got {type(config).__name__}")
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError(f"{op}: topk_idx and topk_weights must be given together")
        if handle is not None:
            self._check_ht_handle(op, handle)
            if topk_idx is not None:
                raise ValueError(f"{op}: cached dispatch (handle given) takes no topk_idx/topk_weights")
            if num_tokens != handle.num_tokens:
                raise ValueError(f"{op}: x has {num_tokens} rows, the handle was made for {handle.num_tokens}")
            payload = ht.Payload(data, scales)
            received = ht.cached_dispatch(self._backend, payload, handle, op)
            recv_x = (received["x"], received["scales"]) if scales is not None else received["x"]
            return recv_x, None, None, None, None, _event(async_finish, data, scales)

        self._check_layout(op, num_tokens, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                           num_tokens_per_expert, topk_idx)
        if topk_weights is not None:
            check.check_tensor(op, "topk_weights", topk_weights, torch.float32, tuple(topk_idx.shape))
        num_experts = num_tokens_per_expert.numel()
        local_experts = num_experts // self.group_size
        payload = ht.Payload(data, scales, topk_idx, topk_weights)
        received, maps = ht.dispatch(self._backend, payload, is_token_in_rank, op)
        num_recv = received["x"].size(0)

        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx, recv_topk_weights, per_expert = kernels_for(self.device).local_routing(
                received["topk_idx"], received["topk_weights"], self.rank * local_experts, local_experts)
        else:
            # Selections every rank sends to this rank's experts.
            per_expert = self._backend.exchange_counts(num_tokens_per_expert.view(self.group_size, -1), op).sum(0)
        counts = ((per_expert + expert_alignment - 1) // expert_alignment * expert_alignment).tolist()
        handle = ht.HTHandle(buffer_id=self.buffer_id, num_tokens=num_tokens, hidden=data.size(1),
                             is_token_in_rank=is_token_in_rank, num_recv_tokens_per_expert_list=counts, **maps)
        recv_x, recv_scales = received["x"], received.get("scales")
        if num_worst_tokens:
            if num_recv > num_worst_tokens:
                raise ValueError(f"{op}: rank {self.rank} received {num_recv} tokens > num_worst_tokens="
                                 f"{num_worst_tokens}")
            recv_x, recv_scales, recv_topk_weights = (
                _pad_rows(t, num_worst_tokens, 0) for t in (recv_x, recv_scales, recv_topk_weights))
            recv_topk_idx = _pad_rows(recv_topk_idx, num_worst_tokens, -1)
            counts = []
        out_x = (recv_x, recv_scales) if scales is not None else recv_x
        event = _event(async_finish, recv_x, recv_scales, recv_topk_idx, recv_topk_weights)
        return out_x, recv_topk_idx, recv_topk_weights, counts, handle, event

    def _check_ht_handle(self, op: str, handle: Any) -> None:
        if isinstance(handle, tuple):
            raise ValueError(f"{op}: handle comes from low_latency_dispatch, not from dispatch")
        if not isinstance(handle, ht.HTHandle):
            raise TypeError(f"{op}: handle must come from dispatch, got {type(handle).__name__}")
        if handle.buffer_id != self.buffer_id:
            raise ValueError(f"{op}: handle comes from a different Buffer")

    def combine(self, x: torch.Tensor, handle: ht.HTHandle, topk_weights: torch.Tensor | None = None,
                bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None, config: Config | None = None,
                previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """HT combine: sum the copies of each token (no weights) back on its source rank.

        Arguments:
            x: `[num_recv, hidden]` expert outputs in the order dispatch returned (padded rows of
                ``num_worst_tokens`` allowed and ignored).
            handle: from :meth:`dispatch`.
            topk_weights: optional `[num_recv, num_topk]` float32, summed the same way.
            bias: optional `[num_tokens, hidden]` tensor or 2-tuple of them, added to the sum.

        Returns:
            combined_x: `[num_tokens, hidden]` in x's dtype.
            combined_topk_weights: `[num_tokens, num_topk]` float32 or None.
            event: :class:`EventOverlap`.
        """
        op = "combine"
        self._live(op)
        if handle is None:
            raise ValueError(f"{op}: handle is required (from dispatch)")
        self._check_ht_handle(op, handle)
        check.check_tensor(op, "x", x, check.FLOAT_DTYPES, (None, handle.hidden))
        check.check_device(op, self.device, x=x, topk_weights=topk_weights)
        if x.size(0) < handle.num_recv:
            raise ValueError(f"{op}: x has {x.size(0)} rows, the dispatch received {handle.num_recv}")
        if topk_weights is not None:
            check.check_tensor(op, "topk_weights", topk_weights, torch.float32, (x.size(0), None))
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"{op}: config must be a portep Config, got {type(config).__name__}")
        check.check_comm_stream_args(op, allocate_on_comm_stream, previous_event, async_finish)
        biases = () if bias is None else (bias if isinstance(bias, tuple) else (bias,))
        if len(biases) > 2:
            raise ValueError(f"{op}: bias must be a tensor or a 2-tuple of tensors, got {len(biases)}")
        for i, b in enumerate(biases):
            check.check_tensor(op, f"bias[{i}]", b, check.FLOAT_DTYPES, (handle.num_tokens, handle.hidden))

        # Without a bias the engine may write each finished sum straight into the outputs.
        summed, weights, touched, outputs = ht.combine(self._backend, handle, x, topk_weights, op, finals=not biases)
        combined = cpu.finish_sum(summed, touched, outputs[0] if outputs else POOL.empty(summed.shape, x.dtype,
                                                                                          x.device), biases)
        if weights is not None:
            weights = cpu.finish_sum(weights, touched, outputs[1] if outputs else torch.empty_like(weights))
        return combined, weights, _event(async_finish, combined, weights)

    # ------------------------------------------------------------------ LL mode
    def _ll_layout(self, op: str, num_max_dispatch_tokens_per_rank: int, hidden: int,
                   num_experts: int) -> LowLatencyLayout:
        if not self.low_latency_mode:
            raise ValueError(f"{op}: this Buffer was created with low_latency_mode=False")
        key = (num_max_dispatch_tokens_per_rank, hidden, num_experts)
        layout = self._ll_layouts.get(key)
        if layout is not None:
            return layout
        layout = LowLatencyLayout(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        needed = low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < needed:
            raise ValueError(
                f"{op}: num_rdma_bytes={self.num_rdma_bytes} is too small for num_max_dispatch_tokens_per_rank="
                f"{num_max_dispatch_tokens_per_rank}, hidden={hidden}, num_experts={num_experts}: "
                f"need {needed} (Buffer.get_low_latency_rdma_size_hint)")
        self._ll_layouts[key] = layout
        return layout

    def _masked(self) -> torch.Tensor:
        """Ranks LL calls skip. A rank that masks itself is cut off: it skips every rank. With
        ``enable_shrink``, ranks the control plane knows to be dead are masked first (as DeepEP
        masks a rank that timed out)."""
        if self.enable_shrink:
            for rank in self._backend.dead_ranks():
                self._mask[rank] = 1
        state = tuple(self._mask.tolist())
        if self._masked_cache is None or self._masked_cache[0] != state:
            masked = self._mask > 0
            self._masked_cache = (state, torch.ones_like(masked) if masked[self.rank] else masked)
        return self._masked_cache[1]

    def _flip_half(self) -> None:
        self._ll_half ^= 1

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> tuple:
        """LL dispatch: send each (token, expert) selection to the expert's rank, expert-major.

        Arguments:
            x: `[num_tokens, hidden]` bf16, ``num_tokens <= num_max_dispatch_tokens_per_rank``; with
                ``use_fp8`` hidden must be a multiple of 128 (512 with ``use_ue8m0``).
            topk_idx: `[num_tokens, num_topk]` int64 expert ids, -1 for none.
            cumulative_local_expert_recv_stats: optional `[num_local_experts]` int32, += received counts.
            dispatch_wait_recv_cost_stats: optional `[num_ranks]` int64, += ns spent waiting per source.
            use_fp8, round_scale, use_ue8m0: per-token per-128-channel e4m3 cast; power-of-two scales;
                scales packed as UE8M0 bytes in int32.
            async_finish / return_recv_hook: return an event / return before receiving, with ``hook``.

        Returns:
            recv_x: `[num_local_experts, num_ranks * T, hidden]` bf16, or with ``use_fp8`` a tuple of
                e4m3 data and scales `[num_local_experts, num_ranks * T, hidden / 128]` float32 (int32
                `[..., hidden / 512]` with ``use_ue8m0``). Rows past ``recv_count[e]`` are unspecified.
            recv_count: `[num_local_experts]` int32.
            handle: ``(src_info, layout_range, T, hidden, num_experts)``.
            event: :class:`EventOverlap`; hook: a callable completing the receive, or None.
        """
        op = "low_latency_dispatch"
        self._live(op)
        check.check_exclusive_async(op, async_finish, return_recv_hook)
        check.check_int(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
        check.check_num_experts(op, num_experts, self.group_size)
        check.check_tensor(op, "x", x, torch.bfloat16, (None, None))
        check.check_device(op, self.device, x=x, topk_idx=topk_idx)
        num_tokens, hidden = x.shape
        if num_tokens > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"{op}: x has {num_tokens} tokens > num_max_dispatch_tokens_per_rank="
                             f"{num_max_dispatch_tokens_per_rank}")
        check.check_topk_idx(op, topk_idx, num_experts, num_tokens)
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError(f"{op}: use_ue8m0 needs use_fp8=True and round_scale=True")
        if use_fp8 and hidden % 128:
            raise ValueError(f"{op}: hidden={hidden} must be a multiple of 128 with use_fp8")
        if use_ue8m0 and hidden % 512:
            raise ValueError(f"{op}: hidden={hidden} must be a multiple of 512 with use_ue8m0")
        local_experts = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            check.check_tensor(op, "cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                               torch.int32, (local_experts,))
        if dispatch_wait_recv_cost_stats is not None:
            check.check_tensor(op, "dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, torch.int64,
                               (self.group_size,))
        self._ll_layout(op, num_max_dispatch_tokens_per_rank, hidden, num_experts)

        call = ll.LLDispatch(self._backend, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8,
                             round_scale, use_ue8m0, self._masked(), op, drop_dead=self.enable_shrink)
        self._flip_half()
        out = call.out
        handle = ll.LowLatencyHandle(out.src_info, out.layout_range, num_max_dispatch_tokens_per_rank, hidden,
                                     num_experts)
        handle.buffer_id, handle.send_counts, handle.masked = self.buffer_id, call.send_counts, call.masked
        handle.dispatch = call

        def hook() -> None:
            call.recv(cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)

        if not return_recv_hook:
            hook()
        recv_x = (out.x, out.scales) if use_fp8 else out.x
        event = _event(async_finish, out.x, out.scales, out.count, out.src_info, out.layout_range)
        return recv_x, out.count, handle, event, (hook if return_recv_hook else None)

    def _check_ll_handle(self, op: str, handle: Any) -> ll.LowLatencyHandle:
        if isinstance(handle, ht.HTHandle):
            raise ValueError(f"{op}: handle comes from dispatch (HT), not from low_latency_dispatch")
        if not isinstance(handle, ll.LowLatencyHandle):
            raise TypeError(f"{op}: handle must come from low_latency_dispatch, got {type(handle).__name__}")
        if handle.buffer_id != self.buffer_id:
            raise ValueError(f"{op}: handle comes from a different Buffer")
        return handle

    def get_next_low_latency_combine_buffer(self, handle: ll.LowLatencyHandle) -> torch.Tensor:
        """The bf16 `[num_local_experts, num_ranks * T, hidden]` view the next LL combine sends from
        when called with ``zero_copy=True``: write expert outputs straight into it."""
        op = "get_next_low_latency_combine_buffer"
        self._live(op)
        _, _, num_max_tokens, hidden, num_experts = self._check_ll_handle(op, handle)
        layout = self._ll_layout(op, num_max_tokens, hidden, num_experts)
        return layout.combine_send_view(self._rdma_bytes.tensor, self._ll_half)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: ll.LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """LL combine: return expert outputs to their sources and reduce them with the weights.

        Arguments:
            x: `[num_local_experts, num_ranks * T, hidden]` bf16 expert outputs (ignored with
                ``zero_copy``: the data is read from :meth:`get_next_low_latency_combine_buffer`).
            topk_idx: `[num_tokens, num_topk]` int64, the ids given to the dispatch.
            topk_weights: `[num_tokens, num_topk]` float32.
            handle: from :meth:`low_latency_dispatch`.
            use_logfmt: compress rows to 10-bit log format (per-128-channel range) on the wire.
            out: optional `[num_tokens, hidden]` bf16 tensor to write the result into.
            combine_wait_recv_cost_stats: optional `[num_ranks]` int64, += ns waited per source.

        Returns:
            combined_x: `[num_tokens, hidden]` bf16, ``sum_k topk_weights[t, k] * y_k(t)``.
            event: :class:`EventOverlap`; hook: completes the receive, or None.
        """
        op = "low_latency_combine"
        self._live(op)
        check.check_exclusive_async(op, async_finish, return_recv_hook)
        handle = self._check_ll_handle(op, handle)
        _, _, num_max_tokens, hidden, num_experts = handle
        local_experts = num_experts // self.group_size
        slots = self.group_size * num_max_tokens
        check.check_tensor(op, "x", x, torch.bfloat16, (local_experts, slots, hidden))
        check.check_device(op, self.device, x=x, topk_idx=topk_idx, topk_weights=topk_weights, out=out)
        dispatched = getattr(handle, "dispatch", None)
        if dispatched is not None and topk_idx is dispatched.topk_idx and topk_idx._version == dispatched.topk_version:
            check.check_tensor(op, "topk_idx", topk_idx, torch.int64, (None, None))  # its values were checked
        else:
            check.check_topk_idx(op, topk_idx, num_experts)
        num_tokens = topk_idx.size(0)
        if num_tokens > num_max_tokens:
            raise ValueError(f"{op}: topk_idx has {num_tokens} tokens > num_max_dispatch_tokens_per_rank="
                             f"{num_max_tokens}")
        check.check_tensor(op, "topk_weights", topk_weights, torch.float32, tuple(topk_idx.shape))
        if out is not None:
            check.check_tensor(op, "out", out, torch.bfloat16, (num_tokens, hidden))
        if use_logfmt and hidden % 128:
            raise ValueError(f"{op}: hidden={hidden} must be a multiple of 128 with use_logfmt")
        if combine_wait_recv_cost_stats is not None:
            check.check_tensor(op, "combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, torch.int64,
                               (self.group_size,))
        layout = self._ll_layout(op, num_max_tokens, hidden, num_experts)
        source = layout.combine_send_view(self._rdma_bytes.tensor, self._ll_half) if zero_copy else x

        result = out if out is not None else POOL.empty((num_tokens, hidden), torch.bfloat16, self.device)
        call = ll.LLCombine(self._backend, source, topk_idx, topk_weights, handle, use_logfmt, self._masked(), op,
                            drop_dead=self.enable_shrink, out=result, recv_later=return_recv_hook)
        self._flip_half()

        def hook() -> None:
            call.recv(result, combine_wait_recv_cost_stats)

        if not return_recv_hook:
            hook()
        return result, _event(async_finish, result), (hook if return_recv_hook else None)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zero the LL buffer's signal state before LL use (e.g. after HT calls); collective."""
        op = "clean_low_latency_buffer"
        self._live(op)
        check.check_int(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
        check.check_int(op, "hidden", hidden, minimum=1)
        check.check_num_experts(op, num_experts, self.group_size)
        self._ll_layout(op, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._rdma_bytes.clear()
        self._ll_half = 0
        self._backend.barrier(op)

    # ------------------------------------------------------------------ shrink (rank masking)
    def _shrink(self, op: str) -> None:
        self._live(op)
        if not self.enable_shrink:
            raise RuntimeError(f"{op}: needs a Buffer created with enable_shrink=True")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask rank ``rank_to_mask``: LL calls skip masked ranks."""
        op = "low_latency_update_mask_buffer"
        self._shrink(op)
        check.check_int(op, "rank_to_mask", rank_to_mask)
        if rank_to_mask >= self.group_size:
            raise ValueError(f"{op}: rank_to_mask={rank_to_mask} is not a rank of this group of {self.group_size}")
        self._mask[rank_to_mask] = int(bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Write the mask (1 = masked) of every rank into ``mask_status``, int32 `[num_ranks]`."""
        op = "low_latency_query_mask_buffer"
        self._shrink(op)
        check.check_tensor(op, "mask_status", mask_status, torch.int32, (self.group_size,))
        mask_status.copy_(self._mask)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank."""
        self._shrink("low_latency_clean_mask_buffer")
        self._mask.zero_()


class _Versions:
    """Tensors, remembered by identity and version: :meth:`same` is true for exactly these objects,
    none of them modified since (in place, which bumps a tensor's version)."""

    def __init__(self, tensors: tuple[torch.Tensor | None, ...]) -> None:
        self.tensors = tensors
        self.versions = tuple(None if t is None else t._version for t in tensors)

    def same(self, tensors: tuple[Any, ...]) -> bool:
        return len(tensors) == len(self.tensors) and all(
            a is b and (a is None or a._version == v) for a, b, v in zip(tensors, self.tensors, self.versions,
                                                                          strict=True))


def _pad_rows(tensor: torch.Tensor | None, rows: int, fill: float) -> torch.Tensor | None:
    if tensor is None:
        return None
    padded = torch.full((rows, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.size(0)] = tensor
    return padded
