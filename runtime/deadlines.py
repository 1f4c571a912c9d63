"""The deadline every portep wait is bounded by."""

from __future__ import annotations

import os

TIMEOUT_ENV = "PORTEP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0


def default_timeout_s() -> float:
    """Seconds an operation may wait for its peers: ``PORTEP_TIMEOUT_S`` or 100 s."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError as exc:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from exc
    if timeout <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {timeout}")
    return timeout
