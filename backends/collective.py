"""Collective backend: rows move with ``torch.distributed.all_to_all_single``.

gloo on CPU, NCCL on NVIDIA and RCCL on AMD, through the same calls. It is portep's portable
fallback and the baseline its benchmarks compare against. The hierarchy is kept: one process
group per node and one per local index, so HT traffic crosses nodes once per destination node.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from portep.errors import CommTimeoutError, PortepError, TransportError
from portep.topology import Topology

from .base import CommBackend, PendingRows
from .plan import Plan, Receive, Scope, apply_rows, pack_rows


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


class _CollectivePending(PendingRows):
    """A plan carried out as two all-to-alls: row counts and header counts first, then the rows."""

    def __init__(self, backend: CollectiveBackend, plan: Plan, group: dist.ProcessGroup | None) -> None:
        self.plan, self.group, self.op, self.timeout_s = plan, group, plan.op, backend.timeout_s
        scope = len(plan.sends)
        device = _device_of(plan)
        self.device = device
        self.comm_device = torch.device("cpu") if device.type != "cpu" and _is_gloo(group) else device
        self.send_rows = [sum(g.rows for g in gathers) for gathers in plan.sends]
        meta = torch.zeros(scope, 1 + plan.num_counts, dtype=torch.int64)
        meta[:, 0] = torch.tensor(self.send_rows, dtype=torch.int64)
        if plan.counts is not None:
            meta[:, 1:] = plan.counts.to(torch.int64).cpu()
        got = meta if group is None else torch.empty_like(meta)
        if group is not None:
            _wait(dist.all_to_all_single(got, meta, group=group, async_op=True), f"{plan.op} (exchanging counts)",
                  self.timeout_s)
        # Excluded ranks take part (a collective cannot leave them out); what they send is dropped.
        me = backend.scope_index(plan.scope)
        self.excluded = {i for i, r in enumerate(backend.scope_ranks(plan.scope)) if r in plan.exclude and i != me}
        self.recv_rows = got[:, 0].tolist()
        got[sorted(self.excluded)] = 0
        self.counts = got[:, 1:].to(torch.int32)
        self.rows = pack_rows([g for gathers in plan.sends for g in gathers], plan.layout, device).to(self.comm_device)
        self.work: dist.Work | None = None
        self.out: torch.Tensor | None = None
        self.receives: list[Receive | None] | None = None
        self.done = False
        if plan.receives is not None:
            self.receive(plan.receives)

    def headers(self) -> tuple[list[int], torch.Tensor]:
        return [0 if i in self.excluded else n for i, n in enumerate(self.recv_rows)], self.counts

    def receive(self, receives: list[Receive | None]) -> None:
        self.receives = [None if i in self.excluded else r for i, r in enumerate(receives)]
        for i, (got, receive) in enumerate(zip(self.recv_rows, self.receives, strict=True)):
            want = None if receive is None else receive.rows if receive.rows is not None else (
                receive.index.numel() if receive.index is not None else None)
            if want is not None and want != got:
                raise PortepError(f"{self.op}: peer {i} of the scope sent {got} row(s), {want} expected")
        out = torch.empty(sum(self.recv_rows), self.plan.layout.row_bytes, dtype=torch.uint8, device=self.comm_device)
        if self.group is None:
            out = self.rows
        elif out.numel() or self.rows.numel():
            self.work = dist.all_to_all_single(out, self.rows, self.recv_rows, self.send_rows, group=self.group,
                                               async_op=True)
        self.out = out

    def wait(self) -> None:
        if self.done:
            return
        if self.receives is None:
            raise RuntimeError(f"{self.op}: say where the rows go (receive) before waiting")
        if self.work is not None:
            _wait(self.work, self.op, self.timeout_s)
        rows = self.out.to(self.device)
        at = 0
        for count, receive in zip(self.recv_rows, self.receives, strict=True):
            if receive is not None:
                apply_rows(rows[at : at + count], receive, self.plan.layout)
            at += count
        self.done = True


def _device_of(plan: Plan) -> torch.device:
    for gathers in plan.sends:
        for gather in gathers:
            for column in gather.columns:
                return column.device
    return torch.device("cpu")


def _is_gloo(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_backend(group) == "gloo"


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

    def _start(self, plan: Plan) -> PendingRows:
        # A collective cannot leave a rank out: excluded ranks take part, with empty messages; and
        # it cannot tell a dead rank, so ``drop_dead`` changes nothing (the deadline fails it).
        return _CollectivePending(self, plan, self._groups[plan.scope])

    def barrier(self, op: str) -> None:
        _wait(dist.barrier(group=self._groups["world"], async_op=True), op, self.timeout_s)
