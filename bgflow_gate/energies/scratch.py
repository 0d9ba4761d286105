"""Reusable scratch tensors: on the CPU, allocating a fresh ``[chunk, n_pairs]`` tensor costs
several times the arithmetic done in it (the allocator hands out new pages, which the kernel
maps and zeroes); writing into the same buffers call after call keeps them mapped and in cache.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["Scratch"]


class Scratch:
    """Named buffers by shape, dtype and device, reused from call to call (one set per thread).

    Parameters
    ----------
    keep : bool
        Keep the buffers between calls (the CPU). ``False``: every request is a new
        ``torch.empty`` (CUDA, whose caching allocator already reuses memory, and callers
        that hold on to the results).

    Examples
    --------
    >>> scratch = Scratch()
    >>> a = scratch("a", (2, 3), torch.zeros(1))
    >>> a is scratch("a", (2, 3), torch.zeros(1))
    True
    """

    #: Buffers kept per thread before all are dropped (batch shapes that keep changing).
    MAX_BUFFERS = 256

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._local = threading.local()

    def __call__(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor ``shape`` with ``like``'s dtype and device, the same one
        every time this thread asks for ``name`` with this shape, dtype and device."""
        shape = tuple(shape)
        if not self.keep:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        buffers = getattr(self._local, "buffers", None)
        if buffers is None or len(buffers) > self.MAX_BUFFERS:
            buffers = self._local.buffers = {}
        key = (name, shape, like.dtype, like.device)
        if key not in buffers:
            buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffers[key]


#: A Scratch that allocates every time.
FRESH = Scratch(keep=False)
