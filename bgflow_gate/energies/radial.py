"""Radial pair functions with their derivative computed alongside (fewer tensor passes).

Autograd through these short formulas would make about three times as many passes over the
``[batch, n_pairs]`` tensors as the formulas themselves; each function here computes its
derivative in the distance variable in the forward pass and hands it to autograd, which
carries it through the geometry as usual. ``tests/test_torch_energy.py`` checks both against
autograd on the plain formulas and against OpenMM.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["nonbonded_sum", "descreening"]


class _NonbondedSum(torch.autograd.Function):
    """``sum_p c12 u^6 - c6 u^3 + qq sqrt(u)`` with ``u = 1 / r2``, per sample."""

    @staticmethod
    def forward(ctx, r2: torch.Tensor, qq: torch.Tensor, c12: torch.Tensor, c6: torch.Tensor) -> torch.Tensor:
        u = r2.reciprocal()
        u3 = u * u * u
        root = u.sqrt()
        if ctx.needs_input_grad[0]:
            # dE/dr2 = -u (6 c12 u^6 - 3 c6 u^3 + qq sqrt(u) / 2)
            slope = u3 * (u3 * (-6 * c12) + 3 * c6)
            ctx.save_for_backward(torch.addcmul(slope, root, qq, value=-0.5) * u)
        return (u3 * u3) @ c12 - u3 @ c6 + root @ qq

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return grad[:, None] * slope, None, None, None


def nonbonded_sum(r2: torch.Tensor, qq: torch.Tensor, c12: torch.Tensor, c6: torch.Tensor) -> torch.Tensor:
    """Lennard-Jones and Coulomb summed over pairs: ``[batch]`` from squared distances ``[batch, n]``.

    ``c12 / r^12 - c6 / r^6 + qq / r``, differentiable in ``r2`` (once).
    """
    return _NonbondedSum.apply(r2, qq, c12, c6)


def _descreening_slope(r, inv_r, upper, lower, grows, q, log_ratio, sr2):
    """d/dr of the OBC descreening integral (before the ``r + sr >= or`` selection)."""
    inv_u, inv_l = upper.reciprocal(), lower.reciprocal()
    dl = grows * inv_l  # dL/dr / L
    return 0.5 * (
        inv_u * inv_u - dl * inv_l
        + 0.25 * (1 + sr2 * inv_r * inv_r) * (inv_u * inv_u - inv_l * inv_l)
        + 0.5 * q * (dl * inv_l * inv_l - inv_u * inv_u * inv_u)
        + 0.5 * inv_r * (dl - inv_u - log_ratio * inv_r)
    )


class _Descreening(torch.autograd.Function):
    """OBC's pair integral ``I(r; or_i, sr_j)`` (OpenMM's ``GBSAOBC1Force`` expression)."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, offset_radius: torch.Tensor, scaled_radius: torch.Tensor) -> torch.Tensor:
        upper = r + scaled_radius
        distance = r - scaled_radius
        lower = torch.maximum(offset_radius, distance.abs())
        inv_r, inv_u, inv_l = r.reciprocal(), upper.reciprocal(), lower.reciprocal()
        sr2 = scaled_radius * scaled_radius
        q = r - sr2 * inv_r
        log_ratio = torch.log(lower * inv_u)
        value = 0.5 * (inv_l - inv_u + 0.25 * q * (inv_u * inv_u - inv_l * inv_l) + 0.5 * log_ratio * inv_r)
        inside = upper >= offset_radius
        if ctx.needs_input_grad[0]:
            grows = torch.where(distance.abs() > offset_radius, distance.sign(), torch.zeros_like(distance))
            slope = _descreening_slope(r, inv_r, upper, lower, grows, q, log_ratio, sr2)
            ctx.save_for_backward(torch.where(inside, slope, torch.zeros_like(slope)))
        return torch.where(inside, value, torch.zeros_like(value))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


def descreening(r: torch.Tensor, offset_radius: torch.Tensor, scaled_radius: torch.Tensor) -> torch.Tensor:
    """What atom j (``scaled_radius``) takes from atom i (``offset_radius``) at distance ``r``.

    OpenMM: ``select(step(r+sr2-or1), 0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))
    +0.5*log(L/U)/r), 0); U=r+sr2; L=max(or1, D); D=abs(r-sr2)``; differentiable in ``r`` (once).
    """
    return _Descreening.apply(r, offset_radius, scaled_radius)
