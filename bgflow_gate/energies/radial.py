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

__all__ = ["nonbonded_sum", "descreening", "gb_pair_sum"]


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


def _descreening_slope(inv_r, inv_u, inv_l, grows, q, t, difference, log_ratio):
    """d/dr of the OBC descreening integral (before the ``r + sr >= or`` selection).

    ``grows`` is dL/dr (0 or +-1), ``t = sr^2 / r``, ``difference = 1/U^2 - 1/L^2``.
    """
    dl = grows * inv_l  # (dL/dr) / L
    inv_u2 = inv_u * inv_u
    half_r = 0.5 * inv_r
    return 0.5 * (
        inv_u2 - dl * inv_l
        + 0.25 * (1 + t * inv_r) * difference
        + 0.5 * q * (dl * inv_l * inv_l - inv_u2 * inv_u)
        + half_r * (dl - inv_u - log_ratio * inv_r)
    )


class _Descreening(torch.autograd.Function):
    """OBC's pair integral ``I(r; or_i, sr_j)`` (OpenMM's ``GBSAOBC1Force`` expression)."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, offset_radius: torch.Tensor, scaled_radius: torch.Tensor) -> torch.Tensor:
        upper = r + scaled_radius
        distance = r - scaled_radius
        beyond = distance.abs()
        lower = torch.maximum(offset_radius, beyond)
        inv_r, inv_u, inv_l = r.reciprocal(), upper.reciprocal(), lower.reciprocal()
        t = scaled_radius * scaled_radius * inv_r
        q = r - t
        difference = inv_u * inv_u - inv_l * inv_l
        log_ratio = torch.log(lower * inv_u)
        value = 0.5 * (inv_l - inv_u + 0.25 * q * difference + 0.5 * log_ratio * inv_r)
        outside = upper < offset_radius
        if ctx.needs_input_grad[0]:
            grows = distance.sign().masked_fill_(beyond <= offset_radius, 0)
            slope = _descreening_slope(inv_r, inv_u, inv_l, grows, q, t, difference, log_ratio)
            ctx.save_for_backward(slope.masked_fill_(outside, 0))
        return value.masked_fill_(outside, 0)

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


class _GBPairSum(torch.autograd.Function):
    """``sum_p k_p / f`` with ``f = sqrt(r2 + bb exp(-r2 / (4 bb)))`` (the GB pair term), per sample."""

    @staticmethod
    def forward(ctx, r2: torch.Tensor, bb: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ratio = r2 / bb
        decay = torch.exp(-0.25 * ratio)
        inv_f = (r2 + bb * decay).rsqrt()
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # d(1/f)/d(f^2) = -f^-3 / 2; d(f^2)/d(r2) = 1 - decay/4; d(f^2)/d(bb) = decay (1 + ratio/4)
            scale = (inv_f * inv_f * inv_f) * (-0.5 * k)
            ctx.save_for_backward(scale * (1 - 0.25 * decay), scale * decay * (1 + 0.25 * ratio))
        return inv_f @ k

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        by_r2, by_bb = ctx.saved_tensors
        return grad[:, None] * by_r2, grad[:, None] * by_bb, None


def gb_pair_sum(r2: torch.Tensor, bb: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The GB pair energy ``sum_p k_p / sqrt(r2 + bb exp(-r2 / (4 bb)))``, ``[batch]``, from
    squared distances and Born-radius products ``bb = B_i B_j`` ``[batch, n]`` (differentiable in both, once)."""
    return _GBPairSum.apply(r2, bb, k)
