"""The spline Boltzmann generator for alanine dipeptide, in internal coordinates.

The flow maps a standard normal latent vector to the internal coordinates of the mixed
transform (bonds, angles, torsions, whitened rigid block) in two parts, ``p(T) p(R | T)``:

1. Torsions ``T``: the latent torsion block goes through the normal CDF onto ``[0, 1]``
   (a uniform density on the torus), then through circular rational-quadratic spline
   couplings; each coupling transforms half of the torsions conditioned on ``cos`` and
   ``sin`` of the other half, so the conditioner sees the torus without a seam.
2. The rest ``R`` (bonds, angles, rigid block, standardised with the training data's mean
   and spread): affine couplings conditioned on the torsions' features and on the other
   half of ``R``; with ``rest_spline_bins``, each affine map is followed by a monotonic
   rational-quadratic spline on ``[-5, 5]`` (identity outside) from the same conditioner,
   so the conditional densities of ``R`` need not be normal.

The final layer hands ``(bonds, angles, torsions, fixed)`` to the inverse of
:class:`MixedCoordinateTransformation`, so the generator's samples are Cartesian (nm).
Everything comes from :mod:`bgflow_gate.bg`, so the generator is a real bgflow
``BoltzmannGenerator`` when bgflow imports.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from zuko.transforms import MonotonicRQSTransform

from .. import bg

__all__ = ["CircularFeatures", "ICSplineFlow", "spline_generator"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
#: Torsions are kept this far from 0 and 1 when mapped back to the latent normal.
_EDGE = 1e-6


class CircularFeatures(torch.nn.Module):
    """``[cos 2 pi t, sin 2 pi t]`` of periodic inputs ``t`` in units of one turn."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * t
        return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


def _mlp(n_in: int, n_out: int, hidden: int, n_hidden: int = 2) -> torch.nn.Sequential:
    """SiLU perceptron whose last layer starts at zero (the coupling starts as the identity)."""
    layers: list[torch.nn.Module] = []
    width = n_in
    for _ in range(n_hidden):
        layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
        width = hidden
    last = torch.nn.Linear(width, n_out)
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return torch.nn.Sequential(*layers, last)


def _halves(n: int, parity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (conditioning, transformed) alternating even/odd positions."""
    idx = torch.arange(n)
    return idx[idx % 2 != parity], idx[idx % 2 == parity]


class ICSplineFlow(bg.Flow):
    """Latent ``[batch, dim]`` -> ``(bonds, angles, torsions, fixed)`` of the mixed IC transform.

    Parameters
    ----------
    sizes : sequence of int
        ``(dim_bonds, dim_angles, dim_torsions, dim_fixed)``.
    mean, std : torch.Tensor
        Mean and spread of ``[bonds, angles, fixed]`` over the training data (the scale
        of ``R``; fixed, not trained).
    n_torsion_layers : int
        Circular spline couplings on the torsions (alternating halves).
    n_rest_layers : int
        Affine couplings on ``R`` conditioned on the torsions (alternating halves).
    hidden : int
        Width of the two hidden layers of every conditioner.
    n_bins : int
        Bins of every spline.
    rest_spline_bins : int
        0: the couplings of ``R`` are affine. ``K > 0``: each is affine followed by a
        ``K``-bin monotonic spline on ``[-REST_BOUND, REST_BOUND]``, identity outside
        (zuko's ``MonotonicRQSTransform``), starting as the identity.
    """

    #: Half-width of the interval the splines of ``R`` act on (identity beyond it).
    REST_BOUND = 5.0

    def __init__(
        self,
        sizes: Sequence[int],
        mean: torch.Tensor,
        std: torch.Tensor,
        n_torsion_layers: int = 4,
        n_rest_layers: int = 4,
        hidden: int = 128,
        n_bins: int = 8,
        rest_spline_bins: int = 0,
    ):
        super().__init__()
        n_bonds, n_angles, n_torsions, n_fixed = (int(s) for s in sizes)
        if not isinstance(rest_spline_bins, int) or rest_spline_bins < 0 or rest_spline_bins == 1:
            raise ValueError(f"rest_spline_bins must be 0 (affine only) or a number of bins >= 2, got {rest_spline_bins!r}")
        self.rest_spline_bins = rest_spline_bins
        self.sizes = (n_bonds, n_angles, n_torsions, n_fixed)
        self.n_rest = n_bonds + n_angles + n_fixed
        if mean.shape != (self.n_rest,) or std.shape != (self.n_rest,):
            raise ValueError(f"mean and std must have shape [{self.n_rest}] (bonds + angles + fixed)")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive for every bond, angle and rigid-block coordinate")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("log_std", std.detach().log())
        self.features = CircularFeatures()
        self.torsion_nets = torch.nn.ModuleList()
        self.splines = torch.nn.ModuleList()
        self._torsion_split = []
        for i in range(n_torsion_layers):
            cond, moved = _halves(n_torsions, i % 2)
            self._torsion_split.append((cond, moved))
            net = _mlp(2 * len(cond), 3 * n_bins * len(moved), hidden)
            self.torsion_nets.append(net)
            self.splines.append(bg.ConditionalSplineTransformer(net, is_circular=True))
        self.rest_nets = torch.nn.ModuleList()
        self._rest_split = []
        for i in range(n_rest_layers):
            cond, moved = _halves(self.n_rest, i % 2)
            self._rest_split.append((cond, moved))
            per_moved = 2 + (3 * rest_spline_bins - 1 if rest_spline_bins else 0)
            self.rest_nets.append(_mlp(2 * n_torsions + len(cond), per_moved * len(moved), hidden))

    def _rest_coupling(self, i: int, r: torch.Tensor, features: torch.Tensor):
        """Layer ``i`` of ``R``: the moved indices, shift, log-scale (kept in (-2, 2)) and the
        spline after the affine map (``None`` without ``rest_spline_bins``)."""
        cond, moved = self._rest_split[i]
        out = self.rest_nets[i](torch.cat([features, r[:, cond]], dim=-1))
        m, k = len(moved), self.rest_spline_bins
        shift, raw = out[:, :m], out[:, m:2 * m]  # the affine-only layout: models saved before splines load
        spline = None
        if k:
            p = out[:, 2 * m:].view(out.shape[0], m, 3 * k - 1)
            spline = MonotonicRQSTransform(p[..., :k], p[..., k:2 * k], p[..., 2 * k:], bound=self.REST_BOUND)
        return moved, shift, 2.0 * torch.tanh(raw / 2.0), spline

    def _forward(self, z: torch.Tensor, **kwargs):
        n_bonds, n_angles, n_torsions, n_fixed = self.sizes
        r, zt = z[:, : self.n_rest], z[:, self.n_rest:]
        # torsions: normal -> uniform on [0, 1] -> circular splines
        t = torch.special.ndtr(zt)
        dlogp = (-0.5 * zt**2 - _LOG_SQRT_2PI).sum(-1, keepdim=True)
        for (cond, moved), spline in zip(self._torsion_split, self.splines):
            y, ld = spline(self.features(t[:, cond]), t[:, moved])
            t = t.index_copy(1, moved.to(t.device), y)
            dlogp = dlogp + ld.sum(-1, keepdim=True)
        features = self.features(t)
        for i in range(len(self.rest_nets)):
            moved, shift, log_scale, spline = self._rest_coupling(i, r, features)
            y = r[:, moved] * log_scale.exp() + shift
            dlogp = dlogp + log_scale.sum(-1, keepdim=True)
            if spline is not None:
                y, ladj = spline.call_and_ladj(y)
                dlogp = dlogp + ladj.sum(-1, keepdim=True)
            r = r.index_copy(1, moved.to(r.device), y)
        r = self.mean + r * self.log_std.exp()
        dlogp = dlogp + self.log_std.sum()
        bonds, angles, fixed = r.split([n_bonds, n_angles, n_fixed], dim=-1)
        return bonds, angles, t, fixed, dlogp

    def _inverse(self, bonds, angles, t, fixed, **kwargs):
        t = torch.remainder(t, 1.0)  # torsions in turns: a whole turn is the same point
        r = (torch.cat([bonds, angles, fixed], dim=-1) - self.mean) * (-self.log_std).exp()
        dlogp = (-self.log_std.sum()).expand(r.shape[0], 1)
        features = self.features(t)
        for i in reversed(range(len(self.rest_nets))):
            moved, shift, log_scale, spline = self._rest_coupling(i, r, features)
            y = r[:, moved]
            if spline is not None:
                y = spline.inv(y)
                dlogp = dlogp - spline.call_and_ladj(y)[1].sum(-1, keepdim=True)
            r = r.index_copy(1, moved.to(r.device), (y - shift) * (-log_scale).exp())
            dlogp = dlogp - log_scale.sum(-1, keepdim=True)
        for (cond, moved), spline in reversed(list(zip(self._torsion_split, self.splines))):
            y, ld = spline(self.features(t[:, cond]), t[:, moved], inverse=True)
            t = t.index_copy(1, moved.to(t.device), y)
            dlogp = dlogp + ld.sum(-1, keepdim=True)
        t = t.clamp(_EDGE, 1 - _EDGE)
        zt = torch.special.ndtri(t)
        dlogp = dlogp + (0.5 * zt**2 + _LOG_SQRT_2PI).sum(-1, keepdim=True)
        return torch.cat([r, zt], dim=-1), dlogp


def spline_generator(
    system,
    data: torch.Tensor,
    target,
    n_torsion_layers: int = 4,
    n_rest_layers: int = 4,
    hidden: int = 128,
    n_bins: int = 8,
    rest_spline_bins: int = 0,
):
    """A Boltzmann generator for alanine dipeptide: normal prior, :class:`ICSplineFlow`,
    the inverse of the mixed internal-coordinate transform fitted on ``data``.

    Parameters
    ----------
    system : AlanineDipeptide
        Gives the z-matrix and the rigid block.
    data : torch.Tensor
        Training configurations ``[n, 66]`` (nm): fit the rigid block's whitening and the
        scale of bonds and angles.
    target : Energy
        The generator's target energy (e.g. ``system.energy()``, in kT).
    n_torsion_layers, n_rest_layers, hidden, n_bins, rest_spline_bins
        See :class:`ICSplineFlow`.
    """
    data = torch.as_tensor(data)
    ic = bg.MixedCoordinateTransformation(
        data=data, z_matrix=system.z_matrix, fixed_atoms=system.rigid_block, normalize_angles=True
    )
    sizes = (ic.dim_bonds, ic.dim_angles, ic.dim_torsions, ic.dim_fixed)
    with torch.no_grad():
        bonds, angles, _, fixed, _ = ic(data)
    rest = torch.cat([bonds, angles, fixed], dim=-1)
    flow = ICSplineFlow(
        sizes, rest.mean(0), rest.std(0).clamp(min=1e-4),
        n_torsion_layers=n_torsion_layers, n_rest_layers=n_rest_layers, hidden=hidden, n_bins=n_bins,
        rest_spline_bins=rest_spline_bins,
    )
    dim = sum(sizes)
    prior = bg.NormalDistribution(dim, mean=torch.zeros(dim, dtype=data.dtype))
    flow = bg.SequentialFlow([flow.to(data.dtype), bg.InverseFlow(ic)])
    return bg.BoltzmannGenerator(prior, flow, target)
