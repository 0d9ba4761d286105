"""Small bgflow-style target energies used by the tests."""

from __future__ import annotations

import torch

from bgflow_gate import bg


class Quadratic(bg.Energy):
    """``E(x) = scale * sum(x**2)``; records every batch it is called with."""

    def __init__(self, dim: int = 2, scale: float = 1.0):
        super().__init__(dim)
        self.scale = scale
        self.calls: list[torch.Tensor] = []

    def _energy(self, x):
        self.calls.append(x.detach().clone())
        return self.scale * (x**2).sum(-1, keepdim=True)


class Fixed(bg.Energy):
    """Returns the first coordinate as the energy: any value, including NaN and inf."""

    def __init__(self, dim: int = 1):
        super().__init__(dim)

    def _energy(self, x):
        return x[..., :1] * 1.0


class InversePower(bg.Energy):
    """``E(x) = 1 / |x|^12``: infinite at 0, where its backward gives NaN (0 * inf)."""

    def __init__(self, dim: int = 3):
        super().__init__(dim)

    def _energy(self, x):
        return 1.0 / (x**2).sum(-1, keepdim=True) ** 6


class RaisesAbove(bg.Energy):
    """Raises, like OpenMM on a bad configuration, when any sample's first coordinate exceeds a limit."""

    def __init__(self, limit: float, dim: int = 2):
        super().__init__(dim)
        self.limit = limit
        self.batch_sizes: list[int] = []

    def _energy(self, x):
        self.batch_sizes.append(x.shape[0])
        if bool((x[..., 0] > self.limit).any()):
            raise RuntimeError("simulated engine failure")
        return (x**2).sum(-1, keepdim=True)



class Ratio(bg.Energy):
    """``E(x) = x0 / x1``: finite coordinates with an infinite (x1 = 0) or NaN (0 / 0) energy."""

    def __init__(self):
        super().__init__(2)

    def _energy(self, x):
        return x[..., :1] / x[..., 1:]

