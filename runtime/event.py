"""Events and streams with DeepEP's interface, on any device.

On CUDA/HIP an :class:`EventHandle` records a real device event on the current stream. On CPU
every operation is complete when it returns, so the handle is an already-completed event and
waiting on it is free: caller code written for DeepEP runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def _accelerator_available() -> bool:
    return torch.cuda.is_available()


class EventHandle:
    """A point on a stream that other streams can wait for."""

    def __init__(self) -> None:
        self._event = None
        if _accelerator_available():
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current stream wait until this event has completed."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)

    def query(self) -> bool:
        """Return True when the event has completed."""
        return True if self._event is None else bool(self._event.query())


class CpuStream:
    """Placeholder for a communication stream on CPU, where work is issued in program order."""

    device = torch.device("cpu")

    def synchronize(self) -> None:
        """Nothing to wait for: CPU work is complete when the call returns."""

    def wait_stream(self, stream: Any) -> None:
        """Nothing to wait for on CPU."""

    def __repr__(self) -> str:
        return "CpuStream()"


def current_stream() -> Any:
    """The current device stream, or a :class:`CpuStream` placeholder on CPU."""
    if _accelerator_available():
        return torch.cuda.current_stream()
    return CpuStream()


class EventOverlap:
    """An event plus the tensors that must stay alive until it completes (DeepEP's ``EventOverlap``).

    Arguments:
        event: an :class:`EventHandle` (or None).
        extra_tensors: tensors kept alive as long as this object.

    Usable as a context manager: leaving the block makes the current stream wait for the event.
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event."""
        assert self.event is not None, "EventOverlap has no event to wait for"
        self.event.current_stream_wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
