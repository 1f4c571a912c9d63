"""The narrow interface every portep communication backend implements.

The dispatch/combine algorithms (``portep.ht``, ``portep.ll``) decide *which* byte rows go
*where*; a backend only moves them. It knows three scopes of peers:

* ``"world"``: every rank of the group, indexed by group rank;
* ``"node"``: the ranks of this rank's node, indexed by local rank (NVLink / xGMI / shared memory);
* ``"peers"``: the ranks with this rank's local index on every node, indexed by node (the network).

A backend is chosen by name from :mod:`portep.backends`; callers never branch on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

from portep.topology import Topology

Scope = Literal["world", "node", "peers"]


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


class PendingExchange(ABC):
    """An exchange in flight; :meth:`wait` returns the received byte rows."""

    recv_counts: list[int]

    @abstractmethod
    def wait(self) -> torch.Tensor:
        """Block until every row has arrived (or the deadline passes) and return them:
        uint8 `[sum(recv_counts), row_bytes]`, grouped by sender in scope order."""

    @property
    def dropped(self) -> frozenset[int]:
        """World ranks dropped from the exchange after they died (0 rows from them); see
        ``drop_dead`` of :meth:`CommBackend.start_exchange`."""
        return frozenset()


class CommBackend(ABC):
    """Moves byte rows between the ranks of one group."""

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

    @abstractmethod
    def start_exchange(
        self,
        rows: torch.Tensor,
        send_counts: list[int],
        recv_counts: list[int] | None,
        scope: Scope,
        op: str,
        exclude: frozenset[int] = frozenset(),
        drop_dead: bool = False,
    ) -> PendingExchange:
        """Send ``rows`` (uint8 `[sum(send_counts), row_bytes]`, grouped by destination in scope
        order) and start receiving. ``recv_counts`` may be None, then the backend learns them
        from the senders first. ``op`` names the public operation for error messages.

        ``exclude``: world ranks left out (masked, possibly dead), to which nothing is sent
        (their ``send_counts`` must be 0) and from which 0 rows are received. Backends that
        cannot leave a rank out of a collective send it empty messages instead.

        ``drop_dead``: a rank that dies while the exchange is in flight is dropped from it (as if
        masked, see :attr:`PendingExchange.dropped`) instead of failing it — DeepEP's shrink mode.
        Backends that cannot tell a dead rank (collectives) ignore it and fail as usual."""

    def exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int] | None, scope: Scope, op: str,
        exclude: frozenset[int] = frozenset(),
    ) -> tuple[torch.Tensor, list[int]]:
        """Blocking :meth:`start_exchange`: returns the received rows and their counts."""
        pending = self.start_exchange(rows, send_counts, recv_counts, scope, op, exclude)
        return pending.wait(), pending.recv_counts

    def exchange_counts(self, counts: torch.Tensor, op: str, exclude: frozenset[int] = frozenset(),
                        drop_dead: bool = False) -> tuple[torch.Tensor, frozenset[int]]:
        """Send row ``r`` of int64 `[num_ranks, k]` ``counts`` to rank ``r`` (world scope); return the
        `[num_ranks, k]` rows received, row ``r`` from rank ``r`` (zeros from ``exclude`` and from
        ranks dropped after they died, which come second)."""
        num_ranks = counts.size(0)
        keep = [r for r in range(num_ranks) if r not in exclude or r == self.topology.rank]
        rows = counts.to(torch.int64).contiguous()[keep].view(torch.uint8).view(len(keep), -1)
        ones = [int(r in keep) for r in range(num_ranks)]
        pending = self.start_exchange(rows, ones, ones, "world", op, exclude, drop_dead)
        got = pending.wait()
        arrived = [r for r in keep if r not in pending.dropped]
        out = torch.zeros_like(counts, dtype=torch.int64)
        out[arrived] = got.contiguous().view(torch.int64).view(len(arrived), -1)
        return out, pending.dropped

    def dead_ranks(self) -> dict[int, str]:
        """Ranks known to be dead, and how that was detected (none when the backend cannot tell)."""
        return {}

    @abstractmethod
    def barrier(self, op: str) -> None:
        """Wait until every rank of the group has arrived."""

    def data_path_stats(self) -> dict[str, int]:
        """Counters of the machinery under this backend (e.g. its proxy), by name; none by default."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing to release)
        """Release resources; the backend is unusable afterwards."""


class Completed(PendingExchange):
    """An exchange that needed no communication (a scope of one rank)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.recv_counts = [rows.size(0)]

    def wait(self) -> torch.Tensor:
        return self.rows
