"""Device kernels behind one interface.

``cpu``: the vectorised torch implementation that runs everywhere (and in CI).
"""

from . import cpu

__all__ = ["cpu"]
