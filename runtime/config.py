"""Tuning knobs of the high-throughput pipeline (DeepEP's ``Config``) and buffer size hints."""

from __future__ import annotations

from dataclasses import dataclass

from .topology import ranks_per_node_from_env

# Largest top-k and number of scale groups per token that the HT buffers are sized for.
MAX_TOPK = 32
MAX_SCALES_PER_TOKEN = 128
# Per-token metadata that travels with a row: source rank + source index (int32 each).
SOURCE_META_BYTES = 8
BUFFER_ALIGNMENT_BYTES = 128
DEFAULT_MAX_RANKS_PER_NODE = 8


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _ranks_per_node(num_ranks: int) -> int:
    return ranks_per_node_from_env(num_ranks) or min(num_ranks, DEFAULT_MAX_RANKS_PER_NODE)


def _bytes_per_token(hidden_bytes: int) -> int:
    topk_bytes = MAX_TOPK * (8 + 4)  # int64 expert id + float32 weight
    return hidden_bytes + SOURCE_META_BYTES + topk_bytes + MAX_SCALES_PER_TOKEN * 4


@dataclass
class Config:
    """Chunking of the HT pipeline.

    Arguments:
        num_sms: parallel channels are ``num_sms // 2`` (one send and one receive unit each).
        num_max_nvl_chunked_send_tokens: tokens sent to an intra-node peer per step.
        num_max_nvl_chunked_recv_tokens: intra-node receive queue depth, in tokens.
        num_max_rdma_chunked_send_tokens: tokens sent to an inter-node peer per step.
        num_max_rdma_chunked_recv_tokens: inter-node receive queue depth, in tokens.

    The collective backend moves each hop as one message and does not chunk; the sizes still
    bound the buffers that :meth:`get_nvl_buffer_size_hint` and :meth:`get_rdma_buffer_size_hint`
    ask for.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {value!r}")
        if self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be even, got {self.num_sms}")
        if self.num_max_nvl_chunked_send_tokens > self.num_max_nvl_chunked_recv_tokens:
            raise ValueError("Config: num_max_nvl_chunked_send_tokens exceeds the receive queue")
        if self.num_max_rdma_chunked_send_tokens > self.num_max_rdma_chunked_recv_tokens:
            raise ValueError("Config: num_max_rdma_chunked_send_tokens exceeds the receive queue")

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of intra-node buffer needed for rows of ``hidden_bytes`` among ``num_ranks`` ranks."""
        local_peers = _ranks_per_node(num_ranks)
        num_nodes = max(num_ranks // local_peers, 1)
        queues = self.num_channels * local_peers
        counters = queues * (2 * num_nodes + 3) * 4
        rows = queues * self.num_max_nvl_chunked_recv_tokens * _bytes_per_token(hidden_bytes)
        return align_up(counters + rows, BUFFER_ALIGNMENT_BYTES)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of inter-node (registered) buffer; 0 when all ranks share one node."""
        local_peers = _ranks_per_node(num_ranks)
        num_nodes = num_ranks // local_peers
        if num_nodes <= 1:
            return 0
        queues = self.num_channels * num_nodes
        counters = queues * (2 * local_peers + 2) * 2 * 4
        rows = queues * self.num_max_rdma_chunked_recv_tokens * (_bytes_per_token(hidden_bytes) + 16) * 2
        return align_up(counters + rows, BUFFER_ALIGNMENT_BYTES)


# (max ranks, nvl send, nvl recv, rdma send, rdma recv): deeper queues as the fan-out grows.
_DISPATCH_TABLE = (
    (2, 24, 256, 6, 128),
    (8, 6, 256, 6, 128),
    (16, 36, 288, 20, 128),
    (32, 32, 288, 32, 128),
    (64, 20, 288, 28, 128),
    (128, 20, 560, 32, 128),
    (1 << 30, 32, 720, 12, 128),
)
_COMBINE_TABLE = (
    (2, 10, 256, 6, 128),
    (8, 6, 256, 6, 128),
    (16, 4, 288, 12, 128),
    (32, 1, 288, 8, 128),
    (64, 1, 288, 20, 128),
    (128, 1, 560, 12, 128),
    (1 << 30, 2, 720, 8, 128),
)


def _lookup(table: tuple, num_ranks: int, num_sms: int) -> Config:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    for max_ranks, *sizes in table:
        if num_ranks <= max_ranks:
            return Config(num_sms, *sizes)
    raise AssertionError("unreachable: the last table row covers every rank count")


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    """Recommended dispatch :class:`Config` for ``num_ranks`` ranks."""
    return _lookup(_DISPATCH_TABLE, num_ranks, num_sms)


def combine_config(num_ranks: int, num_sms: int) -> Config:
    """Recommended combine :class:`Config` for ``num_ranks`` ranks."""
    return _lookup(_COMBINE_TABLE, num_ranks, num_sms)
