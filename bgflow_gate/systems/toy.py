"""A cheap toy system for gated training: a steep well and an elementwise affine flow.

The well's energy explodes away from its mode, so an untrained generator starts at about
1e8 kJ/mol, like an untrained molecular flow; training is a matter of milliseconds.
Used by the tests and ``examples/progressive_training_toy.py``.
"""

from __future__ import annotations

import torch

from .. import bg

__all__ = ["SteepWellEnergy", "ElementwiseAffineFlow", "steep_well_generator"]


class SteepWellEnergy(bg.Energy):
    """A narrow well at ``mode`` whose energy explodes away from it (kJ/mol).

    ``E = sum(0.5 r^2 + 1e-2 r^4)`` with ``r = (x - mode) / width``: an untrained flow
    (standard normal samples) has a median energy of about 2e8 kJ/mol.
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


class ElementwiseAffineFlow(bg.Flow):
    """``x = shift + exp(log_scale) * z`` elementwise: a learnable flow with an exact log-det."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.log_scale = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def _forward(self, z, **kwargs):
        return self.shift + torch.exp(self.log_scale) * z, self.log_scale.sum().expand(z.shape[0], 1)

    def _inverse(self, x, **kwargs):
        return (x - self.shift) * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(x.shape[0], 1)


def steep_well_generator(dim: int = 2, **target_kwargs):
    """A Boltzmann generator (float64) whose untrained samples have energies of ~1e9 kJ/mol."""
    prior = bg.NormalDistribution(dim, mean=torch.zeros(dim, dtype=torch.float64))
    return bg.BoltzmannGenerator(prior, ElementwiseAffineFlow(dim), SteepWellEnergy(dim, **target_kwargs))
