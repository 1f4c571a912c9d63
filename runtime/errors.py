"""Typed errors raised by portep.

Every error names the operation and, where known, the ranks involved, so that a failure in a
distributed job points at its cause instead of hanging.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class PortepError(RuntimeError):
    """Base class of portep's runtime errors (not of argument errors)."""


class CommTimeoutError(PortepError, TimeoutError):
    """A wait passed its deadline.

    Attributes:
        op: the operation that was waiting (e.g. ``"low_latency_dispatch"``).
        ranks: the ranks that did not arrive in time (empty when unknown).
    """

    def __init__(self, op: str, timeout_s: float, ranks: Iterable[int] = (), detail: str = "") -> None:
        self.op = op
        self.timeout_s = timeout_s
        self.ranks = tuple(sorted(ranks))
        if self.ranks:
            who = f"rank(s) {list(self.ranks)} did not arrive"
        else:
            who = detail or "peers did not arrive"
            detail = ""
        msg = f"{op}: timed out after {timeout_s:g} s: {who}"
        super().__init__(f"{msg}; {detail}" if detail else msg)


class PeerFailureError(PortepError):
    """A peer rank failed (died or reported an error) while an operation was in progress.

    Attributes:
        op: the operation that was in progress.
        ranks: the failed ranks.
        causes: how each failed rank was detected, by rank (e.g. ``"heartbeat: no heartbeat for
            5.1 s"``); empty when unknown. Without ``detail``, the message lists them.
    """

    def __init__(self, op: str, ranks: Iterable[int], detail: str = "",
                 causes: Mapping[int, str] | None = None) -> None:
        self.op = op
        self.causes = {int(rank): causes[rank] for rank in sorted(causes)} if causes else {}
        self.ranks = tuple(sorted(set(ranks) | set(self.causes)))
        if not detail and self.causes:
            detail = "; ".join(f"rank {rank}: {how}" for rank, how in self.causes.items())
        msg = f"{op}: peer rank(s) {list(self.ranks)} failed"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class TransportError(PortepError):
    """The transport underneath an operation reported an error."""

    def __init__(self, op: str, detail: str) -> None:
        self.op = op
        super().__init__(f"{op}: transport error: {detail}")
