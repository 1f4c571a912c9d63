"""High-throughput (normal) dispatch and combine: hierarchical, two hops.

Dispatch, for a token that needs ranks on several nodes:

1. *network hop* (scope ``"peers"``): the token goes once to each other destination node, to the
   rank with the sender's local index there, carrying which ranks of that node need it;
2. *node hop* (scope ``"node"``): each rank sends its node's ranks the tokens they need — its own
   tokens straight from the caller's tensors, the network-hop rows from where they landed.

The node-hop header carries, per source node, how many rows follow, so every receiver knows at
once where each source rank's rows go: received rows are grouped by source rank, source order
kept, and are scattered straight into the output tensors. Combine runs the hops in reverse: each
rank sums (float32) the copies its node's ranks send back — its own tokens' copies straight into
the result, the forwarded ones into partial sums — sends one partial sum per token over the
network (in the input dtype), and the source adds the partial sums of every node on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from portep.backends import CommBackend
from portep.backends.plan import Gather, Plan, Receive, RowLayout, WireColumn
from portep.memory import POOL
from portep.native import kernels_for


@dataclass
class HTHandle:
    """What a cached dispatch and a combine need from a dispatch (opaque to callers).

    Attributes (rank-local):
        num_tokens: tokens this rank dispatched; hidden: their width.
        is_token_in_rank: `[num_tokens, num_ranks]` bool routing.
        num_recv_tokens_per_expert_list: per local expert, rounded to ``expert_alignment``.
        route: on a backend that runs HT itself (the ring backend on host tensors), the engine's
            route, which holds every map below; otherwise None and the maps:
        net_index: per node, the tokens this rank sent there (empty for its own node).
        hop_first / hop_rows: per node, the first row and the number of rows of the network-hop
            rows that came from that node (``num_hop`` in all).
        node_sends: per local rank ``j``, per node ``n``: the rows this rank forwarded to ``j`` that
            came from node ``n`` (tokens of its own for its own node, network-hop rows otherwise).
        node_recv: int64 `[ranks_per_node, num_nodes]` rows received from local rank ``j`` that
            came from node ``n``; positions: per local rank, the output row of each of them.
    """

    buffer_id: int
    num_tokens: int
    hidden: int
    is_token_in_rank: torch.Tensor
    num_recv_tokens_per_expert_list: list[int]
    route: Any = field(default=None, repr=False)
    net_index: list[torch.Tensor] | None = field(default=None, repr=False)
    hop_first: list[int] | None = None
    hop_rows: list[int] | None = None
    node_sends: list[list[torch.Tensor]] | None = field(default=None, repr=False)
    node_recv: torch.Tensor | None = None
    positions: list[torch.Tensor] | None = field(default=None, repr=False)
    # Where a combine reduces what comes back (node hop, then network hop), made by its first combine.
    combine_targets: tuple[list[torch.Tensor], list[torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def num_recv(self) -> int:
        return self.route.num_recv if self.route is not None else int(self.node_recv.sum())

    @property
    def num_hop(self) -> int:
        return int(self.route.sizes()[self.route.HOP_ROWS]) if self.route is not None else sum(self.hop_rows)


@dataclass
class Payload:
    """Per-token tensors a dispatch moves: `x` (and FP8 `scales`) plus optional routing."""

    x: torch.Tensor
    scales: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None

    def columns(self) -> list[torch.Tensor]:
        return [t for t in (self.x, self.scales, self.topk_idx, self.topk_weights) if t is not None]

    def names(self) -> list[str]:
        return [n for n in ("x", "scales", "topk_idx", "topk_weights") if getattr(self, n) is not None]


def _wire(columns: list[torch.Tensor]) -> list[WireColumn]:
    return [WireColumn(t.dtype, t.size(1)) for t in columns]


def _split(index: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(index, counts))


def _network_hop(comm: CommBackend, columns: list[torch.Tensor], by_node: torch.Tensor | None,
                 net_index: list[torch.Tensor], hop_rows: list[int] | None, op: str
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[int], list[int]]:
    """Send ``columns`` rows ``net_index[n]`` to node ``n`` (with that node's slice of ``by_node``, the
    routing inside it, unless a cached dispatch knows it); returns the landed rows by column, the
    landed routing, and the first row and count of each node's block."""
    topo = comm.topology
    masks = [] if by_node is None else [by_node[:, n, :] for n in range(topo.num_nodes)]
    wire = _wire(columns) + ([WireColumn(torch.bool, topo.ranks_per_node)] if by_node is not None else [])
    sends = [[] if n == topo.node or not idx.numel() else [Gather([*columns, *masks[n:n + 1]], index=idx)]
             for n, idx in enumerate(net_index)]
    pending = comm.start(Plan(op, "peers", RowLayout(wire), sends))
    rows = pending.headers()[0] if hop_rows is None else hop_rows
    first = [sum(rows[:n]) for n in range(len(rows))]
    total = sum(rows)
    device = columns[0].device
    hop = [POOL.empty((total, t.size(1)), t.dtype, device) for t in columns]
    mask = None if by_node is None else POOL.empty((total, topo.ranks_per_node), torch.bool, device)
    pending.receive([Receive([*hop, *([mask] if mask is not None else [])], first=first[n],
                             rows=None if hop_rows is None else rows[n]) for n in range(len(rows))])
    pending.wait()
    return hop, mask, first, rows


def dispatch(comm: CommBackend, payload: Payload, is_token_in_rank: torch.Tensor, op: str = "dispatch"
             ) -> tuple[dict[str, torch.Tensor], dict]:
    """Move each token to every rank in its row of ``is_token_in_rank``.

    Returns the received tensors (grouped by source rank, source order kept) and the maps a handle
    keeps (see :class:`HTHandle`).
    """
    if comm.native_ht(payload.x.device):
        out, route = comm.ht_dispatch(op, payload.columns(), is_token_in_rank, None)
        return dict(zip(payload.names(), out, strict=True)), dict(route=route)
    topo, kernels = comm.topology, kernels_for(payload.x.device)
    num_tokens, per_node, nodes, me = is_token_in_rank.size(0), topo.ranks_per_node, topo.num_nodes, topo.node
    by_node = is_token_in_rank.view(num_tokens, nodes, per_node)
    columns = payload.columns()
    net_all, net_counts = kernels.rows_by_column(by_node.any(2))
    net_index = _split(net_all, net_counts.tolist())
    net_index[me] = net_index[me][:0]  # this node's tokens need no network hop
    hop, mask, hop_first, hop_rows = _network_hop(comm, columns, by_node, net_index, None, op)

    # Node hop: to local rank j, per node n in order, the rows of node n that j needs.
    own, own_counts = kernels.rows_by_column(by_node[:, me, :])
    own_index = _split(own, own_counts.tolist())
    fwd, fwd_counts = kernels.rows_by_column(mask) if mask is not None else (None, None)
    fwd_index = _split(fwd, fwd_counts.tolist()) if fwd is not None else [fwd] * per_node
    bounds = torch.tensor(hop_first[1:], dtype=torch.int64, device=payload.x.device)
    node_sends: list[list[torch.Tensor]] = []
    for j in range(per_node):
        # Forwarded rows are in landing order, which groups them by source node: cut at the bounds.
        forwarded = fwd_index[j]
        blocks = list(torch.tensor_split(forwarded, torch.searchsorted(forwarded, bounds).tolist())) \
            if forwarded is not None else None
        node_sends.append([own_index[j] if n == me else blocks[n] for n in range(nodes)])
    counts = torch.tensor([[idx.numel() for idx in segs] for segs in node_sends], dtype=torch.int32)
    wire = _wire(columns)
    sends = [[Gather(columns if n == me else hop, index=idx) for n, idx in enumerate(segs) if idx.numel()]
             for segs in node_sends]
    pending = comm.start(Plan(op, "node", RowLayout(wire), sends, counts=counts))
    _, node_recv = pending.headers()
    node_recv = node_recv.to(torch.int64)  # [j, n]: rows of source rank (n, j)
    num_recv = int(node_recv.sum())
    device = payload.x.device
    out = [POOL.empty((num_recv, t.size(1)), t.dtype, device) for t in columns]
    positions = list(torch.split(kernels.ht_recv_positions(node_recv).to(device), node_recv.sum(1).tolist()))
    pending.receive([Receive(out, index=pos) for pos in positions])
    pending.wait()
    maps = dict(net_index=net_index, hop_first=hop_first, hop_rows=hop_rows, node_sends=node_sends,
                node_recv=node_recv, positions=positions)
    return dict(zip(payload.names(), out, strict=True)), maps


def cached_dispatch(comm: CommBackend, payload: Payload, handle: HTHandle, op: str = "dispatch") -> dict:
    """Dispatch new data along the routing of an earlier dispatch (counts known: no header waits)."""
    columns = payload.columns()
    if handle.route is not None:
        out, _ = comm.ht_dispatch(op, columns, None, handle.route)
        return dict(zip(payload.names(), out, strict=True))
    hop, _, _, _ = _network_hop(comm, columns, None, handle.net_index, handle.hop_rows, op)
    me = comm.topology.node
    sends = [[Gather(columns if n == me else hop, index=idx) for n, idx in enumerate(segs) if idx.numel()]
             for segs in handle.node_sends]
    out = [POOL.empty((handle.num_recv, t.size(1)), t.dtype, t.device) for t in columns]
    comm.run(Plan(op, "node", RowLayout(_wire(columns)), sends,
                  receives=[Receive(out, index=pos, rows=pos.numel()) for pos in handle.positions]))
    return dict(zip(payload.names(), out, strict=True))


def combine(
    comm: CommBackend, handle: HTHandle, x: torch.Tensor, topk_weights: torch.Tensor | None, op: str = "combine",
    finals: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor] | None]:
    """Sum the copies of each token back at its source.

    Arguments:
        x: `[num_recv (or more, padding ignored), hidden]` expert outputs in dispatch order.
        topk_weights: optional `[num_recv, num_topk]` float32, summed the same way.
        finals: let a backend that runs HT itself write each sum, once complete, straight into
            output tensors in x's (and the weights') dtype.

    Returns float32 sums `[num_tokens, hidden]` and `[num_tokens, num_topk]` (or None), which tokens
    got any copy (uint8 `[num_tokens]`: the sums of the others are not written; treat them as
    zeros; 2: the sum is final in the outputs), and those outputs (None if the backend made none;
    see :func:`portep.native.cpu.finish_sum`).
    """
    topo = comm.topology
    me, hop_total, num_tokens = topo.node, handle.num_hop, handle.num_tokens
    # One accumulator: the partial sums of forwarded rows first, then this rank's tokens. It is not
    # zeroed: the first copy to reach a row is stored, the others added (``touched``).
    rows = hop_total + num_tokens
    acc = [POOL.empty((rows, x.size(1)), torch.float32, x.device)]
    touched = torch.zeros(rows, dtype=torch.uint8, device=x.device)
    columns = [x]
    if topk_weights is not None:
        acc.append(POOL.empty((rows, topk_weights.size(1)), torch.float32, x.device))
        columns.append(topk_weights)
    if handle.route is not None:
        final = [POOL.empty((rows, c.size(1)), c.dtype, x.device) for c in columns] if finals else None
        comm.ht_combine(op, handle.route, columns, acc, touched, final)
        result = [a[hop_total:] for a in acc]
        outputs = None if final is None else [f[hop_total:] for f in final]
        return result[0], (result[1] if topk_weights is not None else None), touched[hop_total:], outputs
    wire = _wire(columns)

    if handle.combine_targets is None:  # accumulator rows: forwarded rows first, then this rank's tokens
        handle.combine_targets = (
            [torch.cat([segs[n] + (hop_total if n == me else 0) for n in range(topo.num_nodes)])
             for segs in handle.node_sends],
            [idx + hop_total for idx in handle.net_index])
    node_targets, net_targets = handle.combine_targets

    # Node hop, reversed: copies go back to the rank that forwarded them.
    sends = [[Gather(columns, index=pos)] if pos.numel() else [] for pos in handle.positions]
    comm.run(Plan(op, "node", RowLayout(wire), sends, receives=[
        Receive(acc, index=t, reduce=True, touched=touched, rows=t.numel()) for t in node_targets]))

    # Network hop, reversed: one partial sum per token and node, in the input dtype.
    wire[0] = WireColumn(x.dtype, x.size(1))
    sends = [[] if n == me or not rows else [Gather(acc, first=first, count=rows)]
             for n, (first, rows) in enumerate(zip(handle.hop_first, handle.hop_rows, strict=True))]
    receives = [Receive(acc, index=idx, reduce=True, touched=touched, rows=idx.numel()) for idx in net_targets]
    comm.run(Plan(op, "peers", RowLayout(wire), sends, receives=receives))
    result = [a[hop_total:] for a in acc]
    return result[0], (result[1] if topk_weights is not None else None), touched[hop_total:], None
