"""The bonded energy terms of an OpenMM system as batched tensor functions with analytic gradients.

Every function takes difference vectors ``[3, batch, legs * n]`` (x, y, z first; the
columns of its legs side by side, as :class:`~bgflow_gate.energies.layout.Layout` makes
them) and per-term parameters shaped ``[n]``, returns the term's energy per sample,
``[batch]`` (kJ/mol), and writes its gradient with respect to the vectors into ``out`` (same
shape). The formulas are OpenMM's:

* ``HarmonicBondForce``: ``k / 2 (r - r0)^2``;
* ``HarmonicAngleForce``: ``k / 2 (theta - theta0)^2``;
* ``PeriodicTorsionForce``: ``k (1 + cos(n phi - phase))``.

The pair terms (Lennard-Jones + Coulomb, OBC generalized Born) are in :mod:`.radial` and
:mod:`.obc`.
"""

from __future__ import annotations

import torch

from .scratch import FRESH, Scratch

__all__ = ["bond_energy", "angle_energy", "torsion_energy"]


def _dot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a . b`` of vectors ``[3, ...]`` (into ``out`` if given)."""
    return torch.mul(a[0], b[0], out=out).addcmul_(a[1], b[1]).addcmul_(a[2], b[2])


def _cross(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a x b`` of vectors ``[3, ...]`` into ``out`` (``torch.linalg.cross`` along dim 0 is slower on the CPU)."""
    torch.mul(a[1], b[2], out=out[0]).addcmul_(a[2], b[1], value=-1)
    torch.mul(a[2], b[0], out=out[1]).addcmul_(a[0], b[2], value=-1)
    torch.mul(a[0], b[1], out=out[2]).addcmul_(a[1], b[0], value=-1)
    return out


def bond_energy(v: torch.Tensor, length: torch.Tensor, k: torch.Tensor, out: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
    """Harmonic bonds ``sum k / 2 (|v| - length)^2``; the gradient with respect to ``v`` goes to ``out``."""
    r = _dot(v, v).sqrt_()
    stretch = r - length
    energy = (stretch * stretch) @ (0.5 * k)
    torch.mul(v, stretch.mul_(k).div_(r), out=out)
    return energy


def angle_energy(legs: torch.Tensor, theta0: torch.Tensor, k: torch.Tensor, out: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
    """Harmonic angles between the legs ``a`` (atom 1 to 0) and ``b`` (atom 1 to 2), given as
    ``legs = [a | b]`` ``[3, batch, 2 n]``; the gradient with respect to ``legs`` goes to ``out``
    (``scratch`` holds the larger temporaries).

    ``theta = atan2(|a x b|, a . b)``; ``dtheta/da = (a.b a / |a|^2 - b) / |a x b|``.
    """
    n = legs.shape[-1] // 2
    a, b = legs[..., :n], legs[..., n:]
    normal = _cross(a, b, scratch("angle_normal", a.shape, a))
    sine = _dot(normal, normal).sqrt_()
    cosine = _dot(a, b)
    bend = torch.atan2(sine, cosine).sub_(theta0)
    energy = (bend * bend) @ (0.5 * k)
    scale = bend.mul_(k).div_(sine)  # dE/dtheta / |a x b|
    # [a | b] * (scale a.b / [|a|^2 | |b|^2]) - [b | a] * scale
    weights = _dot(legs, legs, scratch("angle_weights", legs.shape[1:], legs)).reciprocal_()
    along = cosine.mul_(scale)
    weights[:, :n].mul_(along)
    weights[:, n:].mul_(along)
    torch.mul(legs, weights, out=out)
    out[..., :n].addcmul_(b, scale, value=-1)
    out[..., n:].addcmul_(a, scale, value=-1)
    return energy


def torsion_energy(legs: torch.Tensor, periodicity: torch.Tensor, phase: torch.Tensor, k: torch.Tensor, out: torch.Tensor,
                   scratch: Scratch = FRESH) -> torch.Tensor:
    """Periodic torsions of the bond vectors ``b1 = x1 - x0``, ``b2 = x2 - x1``, ``b3 = x3 - x2``,
    given as ``legs = [b1 | b2 | b3]`` ``[3, batch, 3 n]``; the gradient with respect to ``legs``
    goes to ``out`` (``scratch`` holds the larger temporaries).

    The dihedral is IUPAC's (trans = pi), the same sign convention as OpenMM's. With
    ``n1 = b1 x b2``, ``n2 = b2 x b3``: ``dphi/db1 = |b2| n1 / |n1|^2``,
    ``dphi/db3 = |b2| n2 / |n2|^2``, ``dphi/db2 = -(b1.b2 dphi/db1 + b3.b2 dphi/db3) / |b2|^2``.
    """
    n = legs.shape[-1] // 3
    b1, b2 = legs[..., :n], legs[..., n:2 * n]
    normals = _cross(legs[..., :2 * n], legs[..., n:], scratch("torsion_normals", b1.shape[:2] + (2 * n,), legs))  # [n1 | n2]
    n1, n2 = normals[..., :n], normals[..., n:]
    along = _dot(b1, b2)  # b1.b2
    length2 = _dot(b2, b2)
    length = length2.sqrt()
    phi = torch.atan2(length * _dot(b1, n2), _dot(n1, n2))
    angle = phi.mul_(periodicity).sub_(phase)
    energy = torch.cos(angle) @ k + k.sum()
    slope = angle.sin_().mul_(-k * periodicity).mul_(length)  # dE/dphi |b2|
    weights = _dot(normals, normals, scratch("torsion_weights", normals.shape[1:], legs)).reciprocal_()
    weights[:, :n].mul_(slope)
    weights[:, n:].mul_(slope)
    ends = torch.mul(normals, weights, out=out[..., :2 * n])  # [g1 | g3] for now
    g1, g3 = out[..., :n], out[..., 2 * n:]
    g3.copy_(ends[..., n:])
    inv_length2 = length2.reciprocal_().neg_()
    torch.mul(g1, along.mul_(inv_length2), out=out[..., n:2 * n]).addcmul_(g3, _dot(legs[..., 2 * n:], b2).mul_(inv_length2))
    return energy
