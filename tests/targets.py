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


class SteepWell(bg.Energy):
    """A narrow well at ``mode`` whose energy explodes away from it (kJ/mol).

    ``E = sum(0.5 r^2 + 1e-2 r^4)`` with ``r = (x - mode) / width``: an untrained flow
    (standard normal samples) starts at ~1e9 kJ/mol.
    """

    def __init__(self, dim: int = 2, mode: float = 3.0, width: float = 0.01):
        super().__init__(dim)
        self.mode, self.width = mode, width

    def _energy(self, x):
        r = (x - self.mode) / self.width
        return (0.5 * r**2 + 1e-2 * r**4).sum(-1, keepdim=True)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """Approximate samples (the Gaussian part of the well)."""
        return self.mode + self.width * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)


class AffineFlow(bg.Flow):
    """``x = shift + exp(log_scale) * z`` elementwise: a learnable flow with an exact log-det."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.log_scale = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def _forward(self, z, **kwargs):
        return self.shift + torch.exp(self.log_scale) * z, self.log_scale.sum().expand(z.shape[0], 1)

    def _inverse(self, x, **kwargs):
        return (x - self.shift) * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(x.shape[0], 1)


def steep_generator(dim: int = 2, **target_kwargs):
    """A Boltzmann generator (float64) whose untrained samples have energies of ~1e9 kJ/mol."""
    prior = bg.NormalDistribution(dim, mean=torch.zeros(dim, dtype=torch.float64))
    return bg.BoltzmannGenerator(prior, AffineFlow(dim), SteepWell(dim, **target_kwargs))
