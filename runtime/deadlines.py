"""The deadline every portep wait is bounded by."""

from __future__ import annotations

import os

TIMEOUT_ENV = "PORTEP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0


def number_from_env(name: str, default: float, kind: type = float, minimum: float = 0.0,
                    unit: str = "seconds") -> float:
    """``$name`` as a ``kind`` (float or int) above ``minimum`` (at least, for ints), else ``default``."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} is not a number of {unit}") from exc
    if number < minimum or (kind is float and number <= minimum):
        raise ValueError(f"{name} must be {'positive' if minimum == 0 else f'at least {minimum:g}'}, got {number}")
    return number


def default_timeout_s() -> float:
    """Seconds an operation may wait for its peers: ``PORTEP_TIMEOUT_S`` or 100 s."""
    return number_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
