"""High-throughput (normal) dispatch and combine: hierarchical, two hops.

Dispatch, for a token that needs ranks on several nodes:

1. *network hop* (scope ``"peers"``): the token goes once to each destination node, to the rank
   with the sender's local index there, carrying which ranks of that node need it;
2. *node hop* (scope ``"node"``): that forwarder copies it to each rank of its node that needs it.

Received rows are then ordered by source rank, source order kept. Combine runs the hops in
reverse: each forwarder sums the copies from its node (float32), sends one partial sum over the
network, and the source adds the partial sums of every node. With one node the network hop is a
local copy, with one rank per node the node hop is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from portep.backends import CommBackend
from portep.native import kernels_for
from portep.native.cpu import Field, RowFormat


@dataclass
class HTHandle:
    """What a cached dispatch and a combine need from a dispatch (opaque to callers).

    Attributes (rank-local):
        num_tokens: tokens this rank dispatched.
        is_token_in_rank: `[num_tokens, num_ranks]` bool routing.
        net_index / net_send / net_recv: token of each network-hop send row, rows per node sent
            and received.
        node_index / node_send / node_recv: network-hop receive row of each node-hop send row,
            rows per local rank sent and received.
        order: `[num_recv]` node-hop receive row of each output row.
        num_recv_tokens_per_expert_list: per local expert, rounded to ``expert_alignment``.
    """

    buffer_id: int
    num_tokens: int
    hidden: int
    is_token_in_rank: torch.Tensor
    net_index: torch.Tensor
    net_send: list[int]
    net_recv: list[int]
    node_index: torch.Tensor
    node_send: list[int]
    node_recv: list[int]
    order: torch.Tensor
    num_recv_tokens_per_expert_list: list[int]

    @property
    def num_recv(self) -> int:
        return self.order.numel()


@dataclass
class Payload:
    """Per-token tensors a dispatch moves: `x` (and FP8 `scales`) plus optional routing."""

    x: torch.Tensor
    scales: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None

    def fields(self) -> list[Field]:
        fields = [Field("x", self.x.dtype, self.x.size(1))]
        for name in ("scales", "topk_idx", "topk_weights"):
            value = getattr(self, name)
            if value is not None:
                fields.append(Field(name, value.dtype, value.size(1)))
        return fields

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _node_of_rows(counts: list[int], device: torch.device) -> torch.Tensor:
    index = torch.arange(len(counts), device=device)
    return index.repeat_interleave(torch.tensor(counts, dtype=torch.int64, device=device))


def dispatch(
    comm: CommBackend, payload: Payload, is_token_in_rank: torch.Tensor, op: str = "dispatch"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Move each token to every rank in its row of ``is_token_in_rank``.

    Returns the received tensors (ordered by source rank, then source token) and the index maps
    a handle keeps.
    """
    topo, kernels = comm.topology, kernels_for(payload.x.device)
    num_tokens, per_node = is_token_in_rank.size(0), topo.ranks_per_node
    by_node = is_token_in_rank.view(num_tokens, topo.num_nodes, per_node)
    net_index, net_send = kernels.rows_by_column(by_node.any(2))
    net_send = net_send.tolist()
    dest_node = _node_of_rows(net_send, is_token_in_rank.device)
    tensors = {name: value[net_index] for name, value in payload.tensors().items()}
    tensors["src_token"] = net_index.to(torch.int32).unsqueeze(1)
    tensors["ranks_in_node"] = by_node[net_index, dest_node]
    net_fields = [*payload.fields(), Field("src_token", torch.int32, 1), Field("ranks_in_node", torch.bool, per_node)]
    net_format = RowFormat(net_fields)
    rows, net_recv = comm.exchange(kernels.pack_rows(net_format, tensors), net_send, None, "peers", op)
    hop = kernels.unpack_rows(net_format, rows)

    source_node = _node_of_rows(net_recv, is_token_in_rank.device)
    hop["src_rank"] = (source_node * per_node + topo.local_rank).to(torch.int32).unsqueeze(1)
    node_index, node_send = kernels.rows_by_column(hop["ranks_in_node"])
    node_send = node_send.tolist()
    node_format = RowFormat([*net_fields[:-1], Field("src_rank", torch.int32, 1)])
    rows, node_recv = comm.exchange(kernels.pack_rows(node_format, hop, node_index), node_send, None, "node", op)
    received = kernels.unpack_rows(node_format, rows)

    order = torch.argsort(received["src_rank"].view(-1), stable=True)
    out = {name: received[name][order] for name in payload.tensors()}
    maps = dict(net_index=net_index, net_send=net_send, net_recv=net_recv, node_index=node_index,
                node_send=node_send, node_recv=node_recv, order=order)
    return out, maps


def cached_dispatch(comm: CommBackend, payload: Payload, handle: HTHandle, op: str = "dispatch") -> dict:
    """Dispatch new data along the routing of an earlier dispatch (no count exchange)."""
    fmt, kernels = RowFormat(payload.fields()), kernels_for(payload.x.device)
    rows, _ = comm.exchange(kernels.pack_rows(fmt, payload.tensors(), handle.net_index), handle.net_send,
                            handle.net_recv, "peers", op)
    rows, _ = comm.exchange(rows[handle.node_index], handle.node_send, handle.node_recv, "node", op)
    return kernels.unpack_rows(fmt, rows[handle.order])


def combine(
    comm: CommBackend, handle: HTHandle, x: torch.Tensor, topk_weights: torch.Tensor | None, op: str = "combine"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum the copies of each token back at its source.

    Arguments:
        x: `[num_recv (or more, padding ignored), hidden]` expert outputs in dispatch order.
        topk_weights: optional `[num_recv, num_topk]` float32, summed the same way.

    Returns float32 sums `[num_tokens, hidden]` and `[num_tokens, num_topk]` (or None).
    """
    num_recv, kernels = handle.num_recv, kernels_for(x.device)
    unsorted = {"x": torch.empty_like(x[:num_recv])}
    unsorted["x"][handle.order] = x[:num_recv]
    fields = [Field("x", x.dtype, x.size(1))]
    if topk_weights is not None:
        unsorted["w"] = torch.empty_like(topk_weights[:num_recv])
        unsorted["w"][handle.order] = topk_weights[:num_recv]
        fields.append(Field("w", torch.float32, topk_weights.size(1)))
    fmt = RowFormat(fields)
    rows, _ = comm.exchange(kernels.pack_rows(fmt, unsorted), handle.node_recv, handle.node_send, "node", op)
    copies = kernels.unpack_rows(fmt, rows)

    num_partials = sum(handle.net_recv)
    partial = {name: kernels.reduce_rows(value, handle.node_index, num_partials) for name, value in copies.items()}
    # Partial sums cross the network in the input dtype, as the data did; no rounding without a network.
    wire = x.dtype if comm.scope_size("peers") > 1 else torch.float32
    net_format = RowFormat([Field("x", wire, x.size(1)), *fields[1:]])
    partial["x"] = partial["x"].to(wire)
    rows, _ = comm.exchange(kernels.pack_rows(net_format, partial), handle.net_recv, handle.net_send, "peers", op)
    sums = kernels.unpack_rows(net_format, rows)
    result = {name: kernels.reduce_rows(value, handle.net_index, handle.num_tokens) for name, value in sums.items()}
    return result["x"], result.get("w")
