"""Fault injection for message fabrics: reorder, delay and drop what a transport receives.

Tests use it to show that portep's protocol gives the right result on unordered, slow fabrics
(EFA's SRD delivers out of order) and a clear timeout — never a wrong result — on a lossy one.
Any message transport takes it (``PORTEP_FAULTS`` in the proxy's environment), the in-process
loopback fabric included.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

FAULTS_ENV = "PORTEP_FAULTS"


@dataclass
class Faults:
    """What the fabric does to messages: shuffle what is deliverable, hold each back for up to
    ``max_delay_polls`` polls, drop with probability ``drop_rate``."""

    reorder: bool = False
    max_delay_polls: int = 0
    drop_rate: float = 0.0
    seed: int = 0

    @property
    def any(self) -> bool:
        return self.reorder or self.max_delay_polls > 0 or self.drop_rate > 0

    @classmethod
    def parse(cls, text: str) -> Faults:
        """From ``"reorder,delay=8,drop=0.01,seed=3"`` (the ``PORTEP_FAULTS`` syntax)."""
        faults = cls()
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            try:
                if key == "reorder":
                    faults.reorder = value in ("", "1", "true", "yes")
                elif key == "delay":
                    faults.max_delay_polls = int(value)
                elif key == "drop":
                    faults.drop_rate = float(value)
                elif key == "seed":
                    faults.seed = int(value)
                else:
                    raise ValueError(f"unknown fault {key!r}")
            except ValueError as exc:
                raise ValueError(f"{FAULTS_ENV}={text!r}: {exc} (expected reorder, delay=N, drop=P, seed=N)") from exc
        return faults

    @classmethod
    def from_env(cls) -> Faults | None:
        text = os.environ.get(FAULTS_ENV, "")
        faults = cls.parse(text) if text else None
        return faults if faults is not None and faults.any else None


class FaultyDelivery:
    """Sits between a fabric and its receiver: each poll, admits what arrived (dropping some),
    and hands over what is due, shuffled if asked."""

    def __init__(self, faults: Faults, seed_offset: int = 0) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed * 1_000_003 + seed_offset)
        self._held: list[tuple[int, object]] = []
        self._polls = 0
        self.dropped = 0

    def deliver(self, arrived: list, max_messages: int | None = None) -> list:
        self._polls += 1
        for message in arrived:
            if self._rng.random() < self.faults.drop_rate:
                self.dropped += 1
                continue
            self._held.append((self._polls + self._rng.randint(0, self.faults.max_delay_polls), message))
        ready = [i for i, (due, _) in enumerate(self._held) if due <= self._polls]
        if self.faults.reorder:
            self._rng.shuffle(ready)
        if max_messages is not None:
            ready = ready[:max_messages]
        out = [self._held[i][1] for i in ready]
        for i in sorted(ready, reverse=True):
            del self._held[i]
        return out

    def held(self) -> int:
        return len(self._held)
