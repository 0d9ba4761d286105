"""Radial pair functions and their derivatives, computed together in one pass over the pairs.

Each ``*_with_slope`` function returns a pair function's value and its derivative in the
distance variable; :class:`~bgflow_gate.energies.model.SystemModel` carries the derivatives
through the geometry by hand (no autograd graph). The autograd wrappers
(:func:`nonbonded_sum`, :func:`descreening`, :func:`gb_pair_sum`) exist for tests, which
compare them with autograd on OpenMM's plain expressions in every branch.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .scratch import FRESH, Scratch

__all__ = [
    "nonbonded_with_slope", "descreening_with_slope", "descreening_reach", "gb_pair_with_slopes",
    "nonbonded_sum", "descreening", "gb_pair_sum",
]


def nonbonded_with_slope(inv_r: torch.Tensor, qq: torch.Tensor, c12: torch.Tensor, c6: torch.Tensor, scratch: Scratch = FRESH):
    """Lennard-Jones and Coulomb ``c12 / r^12 - c6 / r^6 + qq / r`` from inverse distances ``[batch, n]``.

    Returns
    -------
    energy : torch.Tensor
        ``[batch]``, summed over the pairs.
    slope : torch.Tensor
        ``dE/dr2`` per pair, ``[batch, n]`` (a ``scratch`` buffer).
    """
    u = torch.mul(inv_r, inv_r, out=scratch("nb_u", inv_r.shape, inv_r))  # 1 / r2
    u3 = torch.mul(u, u, out=scratch("nb_u3", inv_r.shape, inv_r)).mul_(u)
    lj = torch.mul(u3, c12, out=scratch("nb_lj", inv_r.shape, inv_r)).sub_(c6)  # u3 * lj: the Lennard-Jones energy
    energy = torch.mul(u3, lj, out=scratch("nb_energy", inv_r.shape, inv_r)).sum(-1) + inv_r @ qq
    # dE/dr2 = -u (6 c12 u^6 - 3 c6 u^3 + qq sqrt(u) / 2) = u (u3 (-6 lj - 3 c6) - qq / (2 r))
    slope = lj.mul_(-6).sub_(3 * c6).mul_(u3).addcmul_(inv_r, qq, value=-0.5).mul_(u)
    return energy, slope


def _steps(upper: torch.Tensor, distance: torch.Tensor, offset_radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``step(U - or)`` (1 where OpenMM's ``select`` keeps the integral, else 0) and
    ``-[D < -or]`` (-1 where atom i lies deep inside atom j's sphere, else 0), as floats.

    Arithmetic on ``sign`` instead of boolean masks: on the CPU ``where`` and ``masked_fill``
    are ten times slower than an elementwise product.
    """
    keep = (upper - offset_radius).sign_().clamp_(max=0).add_(1)
    inside = (distance + offset_radius).sign_().clamp_(max=0)
    return keep, inside


def descreening_with_slope(r: torch.Tensor, inv_r: torch.Tensor, offset_radius: torch.Tensor, scaled_radius: torch.Tensor,
                           branches: bool = True, scratch: Scratch = FRESH):
    """Eight times OBC's pair integral ``I(r; or_i, sr_j)`` and eight times its derivative in ``r``.

    OpenMM: ``select(step(r+sr2-or1), 0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))
    +0.5*log(L/U)/r), 0); U=r+sr2; L=max(or1, D); D=abs(r-sr2)``. ``inv_r = 1 / r``; the
    parameters broadcast against ``r``. The partial derivatives in ``U`` and in ``L = |r - sr|``
    vanish, except for ``L = sr - r`` (atom i deep inside atom j's sphere), where
    ``-dI/dL = 1 / L^2``. ``branches=False`` skips both close-range branches (``r + sr < or``
    and ``sr - r > or``): exact only where no distance reaches them (:func:`descreening_reach`).

    Returns
    -------
    value, slope : torch.Tensor
        ``8 I`` and ``8 dI/dr`` (``scratch`` buffers; the caller applies the factor 1/8 once per atom).
    """
    shape = torch.broadcast_shapes(r.shape, scaled_radius.shape, offset_radius.shape)
    upper = torch.add(r, scaled_radius, out=scratch("ds_upper", shape, r))
    distance = torch.sub(r, scaled_radius, out=scratch("ds_distance", shape, r))
    if branches:
        keep, inside = _steps(upper, distance, offset_radius)
    lower = torch.maximum(distance.abs_(), offset_radius, out=scratch("ds_lower", shape, r))
    inv_u = upper.reciprocal_()
    inv_l = torch.reciprocal(lower, out=distance)
    difference = torch.mul(inv_u, inv_u, out=scratch("ds_difference", shape, r)).addcmul_(inv_l, inv_l, value=-1)
    if branches:
        inside.mul_(inv_l).mul_(inv_l)  # -1 / L^2 where atom i is deep inside atom j's sphere, else 0
    log_term = lower.mul_(inv_u).log_().mul_(inv_r)  # log(L/U) / r
    t = torch.mul(scaled_radius * scaled_radius, inv_r, out=scratch("ds_slope", shape, r))
    # 8 I = (r - t) d + 4 (1/L - 1/U) + 2 log(L/U) / r
    value = torch.sub(r, t, out=scratch("ds_value", shape, r)).mul_(difference)
    value.add_(inv_l.sub_(inv_u), alpha=4).add_(log_term, alpha=2)
    # 8 dI/dr = (1 + t / r) d - 2 log(L/U) / r^2 + 8 / L^2 [inside]
    slope = t.mul_(inv_r).mul_(difference).add_(difference).sub_(log_term.mul_(inv_r), alpha=2)
    if not branches:
        return value, slope
    slope.add_(inside, alpha=-8)
    return value.mul_(keep), slope.mul_(keep)


def descreening_reach(offset_radius: torch.Tensor, scaled_radius: torch.Tensor) -> float:
    """The largest distance at which :func:`descreening_with_slope`'s close-range branches
    can apply: at every distance above it ``branches=False`` is exact."""
    return max(float((offset_radius - scaled_radius).max()), float((scaled_radius - offset_radius).max()), 0.0)


def gb_pair_with_slopes(r2: torch.Tensor, bb: torch.Tensor, k: torch.Tensor, scratch: Scratch = FRESH):
    """The GB pair energy ``sum_p k_p / f``, ``f = sqrt(r2 + bb exp(-r2 / (4 bb)))``, with ``bb = B_i B_j``.

    Returns
    -------
    energy : torch.Tensor
        ``[batch]``.
    by_r2, by_bb : torch.Tensor
        ``dE/dr2`` and ``dE/dbb`` per pair, ``[batch, n]`` (``scratch`` buffers).
    """
    ratio = torch.div(r2, bb, out=scratch("gb_ratio", r2.shape, r2))
    decay = torch.mul(ratio, -0.25, out=scratch("gb_decay", r2.shape, r2)).exp_()
    inv_f = torch.addcmul(r2, bb, decay, out=scratch("gb_inv_f", r2.shape, r2)).rsqrt_()
    energy = inv_f @ k
    # d(1/f)/d(f^2) = -f^-3 / 2; d(f^2)/d(r2) = 1 - decay/4; d(f^2)/d(bb) = decay (1 + ratio/4)
    scale = torch.mul(inv_f, inv_f, out=scratch("gb_scale", r2.shape, r2)).mul_(inv_f).mul_(-0.5 * k)
    decay.mul_(scale)  # scale decay
    by_bb = torch.addcmul(decay, decay, ratio, value=0.25, out=ratio)
    by_r2 = scale.sub_(decay, alpha=0.25)
    return energy, by_r2, by_bb


class _NonbondedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r2, qq, c12, c6):
        energy, slope = nonbonded_with_slope(r2.rsqrt(), qq, c12, c6)
        ctx.save_for_backward(slope)
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad[:, None] * slope, None, None, None


def nonbonded_sum(r2: torch.Tensor, qq: torch.Tensor, c12: torch.Tensor, c6: torch.Tensor) -> torch.Tensor:
    """:func:`nonbonded_with_slope`'s energy, differentiable in ``r2`` (once)."""
    return _NonbondedSum.apply(r2, qq, c12, c6)


class _Descreening(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, offset_radius, scaled_radius):
        value, slope = descreening_with_slope(r, r.reciprocal(), offset_radius, scaled_radius)
        ctx.save_for_backward(slope)
        return 0.125 * value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return 0.125 * grad * slope, None, None


def descreening(r: torch.Tensor, offset_radius: torch.Tensor, scaled_radius: torch.Tensor) -> torch.Tensor:
    """OBC's pair integral (what atom j, ``scaled_radius``, takes from atom i, ``offset_radius``), differentiable in ``r`` (once)."""
    return _Descreening.apply(r, offset_radius, scaled_radius)


class _GBPairSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r2, bb, k):
        energy, by_r2, by_bb = gb_pair_with_slopes(r2, bb, k)
        ctx.save_for_backward(by_r2, by_bb)
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        by_r2, by_bb = ctx.saved_tensors
        return grad[:, None] * by_r2, grad[:, None] * by_bb, None


def gb_pair_sum(r2: torch.Tensor, bb: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """:func:`gb_pair_with_slopes`'s energy, differentiable in ``r2`` and ``bb`` (once)."""
    return _GBPairSum.apply(r2, bb, k)
