"""bgflow-compatible host: the parts of bgflow's API that bgflow-gate uses.

Used when real ``bgflow`` cannot be imported (see :mod:`bgflow_gate.bg`). Class names,
signatures and return conventions follow bgflow, so code written against ``bgflow``
runs on this host unchanged.
"""

from .energy import Energy

__all__ = ["Energy"]
