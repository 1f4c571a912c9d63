"""Collective backend: rows move with ``torch.distributed.all_to_all_single``.

gloo on CPU, NCCL on NVIDIA and RCCL on AMD, through the same calls. It is portep's portable
fallback and the baseline its benchmarks compare against. The hierarchy is kept: one process
group per node and one per local index, so HT traffic crosses nodes once per destination node.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from portep.errors import CommTimeoutError, TransportError
from portep.topology import Topology

from .base import CommBackend, Completed, PendingExchange, Scope


def _wait(work: dist.Work, op: str, timeout_s: float) -> None:
    try:
        completed = work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        text = str(exc)
        if "imeout" in text or "timed out" in text:
            raise CommTimeoutError(op, timeout_s, detail=text.splitlines()[0]) from exc
        raise TransportError(op, text.splitlines()[0] if text else repr(exc)) from exc
    if completed is False:
        raise CommTimeoutError(op, timeout_s)


class _CollectivePending(PendingExchange):
    def __init__(self, work: dist.Work, out: torch.Tensor, recv_counts: list[int], op: str, timeout_s: float,
                 device: torch.device):
        self.work, self.out, self.recv_counts = work, out, recv_counts
        self.op, self.timeout_s, self.device = op, timeout_s, device
        self.done = False

    def wait(self) -> torch.Tensor:
        if not self.done:
            _wait(self.work, self.op, self.timeout_s)
            self.out = self.out.to(self.device)
            self.done = True
        return self.out


class CollectiveBackend(CommBackend):
    """Moves rows with all-to-all collectives on sub-groups of the user's process group."""

    name = "collective"

    def __init__(self, group: dist.ProcessGroup, topology: Topology, timeout_s: float) -> None:
        super().__init__(topology)
        self.timeout_s = timeout_s
        global_ranks = dist.get_process_group_ranks(group)
        timeout = timedelta(seconds=timeout_s)
        self._groups: dict[Scope, dist.ProcessGroup | None] = {"world": group, "node": None, "peers": None}
        per_node, nodes = topology.ranks_per_node, topology.num_nodes
        # Every rank must create every sub-group, in the same order.
        if nodes > 1 and per_node > 1:
            for node in range(nodes):
                sub = dist.new_group([global_ranks[r] for r in topology.node_ranks(node)], timeout=timeout)
                if node == topology.node:
                    self._groups["node"] = sub
            for local in range(per_node):
                sub = dist.new_group([global_ranks[r] for r in topology.peer_ranks(local)], timeout=timeout)
                if local == topology.local_rank:
                    self._groups["peers"] = sub
        elif nodes == 1:
            self._groups["node"] = group
        else:
            self._groups["peers"] = group

    def start_exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int] | None, scope: Scope, op: str,
        exclude: frozenset[int] = frozenset(), drop_dead: bool = False,
    ) -> PendingExchange:
        # A collective cannot leave a rank out: excluded ranks take part, with empty messages; and
        # it cannot tell a dead rank, so ``drop_dead`` changes nothing (the deadline fails it).
        me = self.scope_index(scope)
        self.stats.record(scope, sum(send_counts) - send_counts[me], rows.size(1))
        group = self._groups[scope]
        if group is None:  # a scope of one rank
            return Completed(rows)
        device = rows.device
        if device.type != "cpu" and dist.get_backend(group) == "gloo":
            rows = rows.cpu()  # gloo moves host memory: stage device rows
        if recv_counts is None:
            counts_in = torch.tensor(send_counts, dtype=torch.int64, device=rows.device)
            counts_out = torch.empty_like(counts_in)
            work = dist.all_to_all_single(counts_out, counts_in, group=group, async_op=True)
            _wait(work, f"{op} (exchanging counts)", self.timeout_s)
            recv_counts = counts_out.tolist()
        out = torch.empty(sum(recv_counts), rows.size(1), dtype=rows.dtype, device=rows.device)
        work = dist.all_to_all_single(out, rows, recv_counts, send_counts, group=group, async_op=True)
        return _CollectivePending(work, out, recv_counts, op, self.timeout_s, device)

    def barrier(self, op: str) -> None:
        _wait(dist.barrier(group=self._groups["world"], async_op=True), op, self.timeout_s)
