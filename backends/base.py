"""The narrow interface every portep communication backend implements.

The dispatch/combine algorithms (``portep.ht``, ``portep.ll``) decide *which* rows go *where* and
say it as a :class:`~portep.backends.plan.Plan`; a backend only carries it out. It knows three
scopes of peers:

* ``"world"``: every rank of the group, indexed by group rank;
* ``"node"``: the ranks of this rank's node, indexed by local rank (NVLink / xGMI / shared memory);
* ``"peers"``: the ranks with this rank's local index on every node, indexed by node (the network).

A backend is chosen by name from :mod:`portep.backends`; callers never branch on its name. A
backend may also run a whole LL dispatch and combine in one compiled step
(:meth:`CommBackend.native_ll`), as DeepEP has LL kernels of their own; the plans stay the
definition of what moves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from portep.topology import Topology

from .plan import Gather, Plan, Receive, RowLayout, Scope, WireColumn


@dataclass
class TrafficStats:
    """Counters of what this rank sent, for tests, demos and ``portep status``."""

    rows_sent: dict[str, int] = field(default_factory=lambda: {"world": 0, "node": 0, "peers": 0})
    bytes_sent: dict[str, int] = field(default_factory=lambda: {"world": 0, "node": 0, "peers": 0})
    exchanges: int = 0

    def record(self, scope: Scope, rows: int, row_bytes: int) -> None:
        self.rows_sent[scope] += rows
        self.bytes_sent[scope] += rows * row_bytes
        self.exchanges += 1


class PendingRows(ABC):
    """An exchange in flight (see :meth:`CommBackend.start`)."""

    @abstractmethod
    def headers(self) -> tuple[list[int], torch.Tensor]:
        """Wait until every peer's header arrived; rows each peer of the scope sends, and the int32
        ``[scope_size, k]`` counts that travelled with them (zeros from excluded or dropped ranks)."""

    @abstractmethod
    def receive(self, receives: list[Receive | None]) -> None:
        """Say where each peer's rows go (for a plan started without ``receives``)."""

    @abstractmethod
    def wait(self) -> None:
        """Block until every row has been sent and received (or the deadline passes)."""

    @property
    def dropped(self) -> frozenset[int]:
        """World ranks dropped from the exchange after they died (0 rows from them); see
        :attr:`Plan.drop_dead`."""
        return frozenset()


class CommBackend(ABC):
    """Carries out exchange plans among the ranks of one group."""

    name: str = "abstract"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.stats = TrafficStats()

    def scope_ranks(self, scope: Scope) -> list[int]:
        """Group ranks of ``scope``, in scope order."""
        t = self.topology
        if scope == "world":
            return list(range(t.num_ranks))
        return t.node_ranks(t.node) if scope == "node" else t.peer_ranks(t.local_rank)

    def scope_size(self, scope: Scope) -> int:
        """Number of ranks in ``scope``."""
        return len(self.scope_ranks(scope))

    def scope_index(self, scope: Scope) -> int:
        """This rank's index within ``scope``."""
        return self.scope_ranks(scope).index(self.topology.rank)

    def start(self, plan: Plan) -> PendingRows:
        """Start ``plan``: its rows leave (as the peers make room), its headers and rows arrive as
        :class:`PendingRows` is waited on. The plan's tensors must stay alive and unchanged until
        the exchange completed."""
        me = self.scope_index(plan.scope)
        rows = sum(g.rows for p, gathers in enumerate(plan.sends) if p != me for g in gathers)
        self.stats.record(plan.scope, rows, plan.layout.row_bytes)
        return self._start(plan)

    @abstractmethod
    def _start(self, plan: Plan) -> PendingRows:
        """Backend part of :meth:`start`."""

    def run(self, plan: Plan) -> PendingRows:
        """:meth:`start` ``plan`` (with its receives) and wait for it."""
        pending = self.start(plan)
        pending.wait()
        return pending

    def native_ll(self, device: torch.device) -> bool:
        """Whether this backend runs LL dispatch and combine on tensors of ``device`` itself
        (``ll_dispatch`` / ``ll_combine``); otherwise they run as plans."""
        return False

    def native_ht(self, device: torch.device) -> bool:
        """Whether this backend runs HT dispatch and combine on tensors of ``device`` itself
        (``ht_dispatch`` / ``ht_combine``); otherwise they run as plans."""
        return False

    def exchange_counts(self, counts: torch.Tensor, op: str) -> torch.Tensor:
        """Send row ``r`` of int32 ``[num_ranks, k]`` ``counts`` to rank ``r``; returns the
        ``[num_ranks, k]`` rows received, row ``r`` from rank ``r``."""
        world = self.scope_size("world")
        counts = counts.to(torch.int32).contiguous()
        pending = self.start(Plan(op, "world", RowLayout([WireColumn(torch.int32, 1)]), [[] for _ in range(world)],
                                  counts=counts, receives=[Receive([None]) for _ in range(world)]))
        return pending.headers()[1]

    def barrier(self, op: str) -> None:
        """Wait until every rank of the group has arrived."""
        world = self.scope_size("world")
        self.run(Plan(op, "world", RowLayout([]), [[] for _ in range(world)],
                      receives=[Receive([]) for _ in range(world)]))

    def abandon(self, op: str, reason: str) -> None:  # noqa: B027 (optional hook)
        """Give up on this backend's in-flight state after ``op`` failed above it (for ``reason``)."""

    def dead_ranks(self) -> dict[int, str]:
        """Ranks known to be dead, and how that was detected (none when the backend cannot tell)."""
        return {}

    def data_path_stats(self) -> dict[str, int]:
        """Counters of the machinery under this backend (e.g. its proxy), by name; none by default."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing to release)
        """Release resources; the backend is unusable afterwards."""


__all__ = ["CommBackend", "Gather", "PendingRows", "Plan", "Receive", "RowLayout", "Scope", "TrafficStats",
           "WireColumn"]
