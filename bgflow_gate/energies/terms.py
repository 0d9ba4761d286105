"""The energy terms of an OpenMM system as batched tensor functions (kJ/mol, nm, radians).

Every function takes difference vectors as their components ``(x, y, z)``, each
``[batch, n]`` (one column per bond, angle leg, torsion leg or atom pair, as
:class:`~bgflow_gate.energies.layout.Layout` makes them) and per-term parameters shaped
``[n]``, and returns the term's energy per sample, ``[batch]``. The formulas are OpenMM's:

* ``HarmonicBondForce``: ``k / 2 (r - r0)^2``;
* ``HarmonicAngleForce``: ``k / 2 (theta - theta0)^2``;
* ``PeriodicTorsionForce``: ``k (1 + cos(n phi - phase))``;
* ``NonbondedForce`` without cutoff: ``4 eps ((sigma/r)^12 - (sigma/r)^6) + qq / r``
  (``qq`` already holds Coulomb's constant);
* the OBC generalized-Born model of ``GBSAOBC1Force`` / ``GBSAOBC2Force``
  (:func:`obc_energy`).
"""

from __future__ import annotations

import torch

from .radial import descreening, gb_pair_sum, nonbonded_sum

__all__ = ["bond_energy", "angle_energy", "torsion_energy", "pair_energy", "obc_energy"]

Vectors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _dot(a: Vectors, b: Vectors) -> torch.Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: Vectors, b: Vectors) -> Vectors:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def bond_energy(v: Vectors, length: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Harmonic bonds: ``sum k / 2 (|v| - length)^2`` over the columns of ``v``."""
    stretch = _dot(v, v).sqrt() - length
    return (stretch * stretch) @ (0.5 * k)


def angle_energy(a: Vectors, b: Vectors, theta0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Harmonic angles between the legs ``a`` (atom 1 to 0) and ``b`` (atom 1 to 2)."""
    normal = _cross(a, b)
    theta = torch.atan2(_dot(normal, normal).sqrt(), _dot(a, b))
    bend = theta - theta0
    return (bend * bend) @ (0.5 * k)


def torsion_energy(b1: Vectors, b2: Vectors, b3: Vectors, periodicity: torch.Tensor, phase: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Periodic torsions of the bond vectors ``b1 = x1 - x0``, ``b2 = x2 - x1``, ``b3 = x3 - x2``.

    The dihedral is IUPAC's (trans = pi), the same sign convention as OpenMM's.
    """
    n1, n2 = _cross(b1, b2), _cross(b2, b3)
    phi = torch.atan2(_dot(b2, b2).sqrt() * _dot(b1, n2), _dot(n1, n2))
    return torch.cos(periodicity * phi - phase) @ k + k.sum()


def pair_energy(v: Vectors, qq: torch.Tensor, c12: torch.Tensor, c6: torch.Tensor) -> torch.Tensor:
    """Lennard-Jones and Coulomb: ``c12 / r^12 - c6 / r^6 + qq / r`` summed over the pairs.

    ``c12 = 4 eps sigma^12``, ``c6 = 4 eps sigma^6``, ``qq`` = Coulomb's constant times the
    charge product, per pair.
    """
    return nonbonded_sum(_dot(v, v), qq, c12, c6)


def _born_radii(r: torch.Tensor, gb: dict[str, torch.Tensor]) -> torch.Tensor:
    """OBC effective Born radii ``[batch, n_atoms]`` from all pair distances ``r`` ``[batch, n_pairs]``."""
    integral_i = descreening(r, gb["offset_radius_i"], gb["scaled_radius_j"])  # what j takes from i
    integral_j = descreening(r, gb["offset_radius_j"], gb["scaled_radius_i"])
    total = gb["to_atoms"](integral_i, integral_j)
    offset_radius = gb["offset_radius"]
    psi = total * offset_radius
    alpha, beta, gamma = gb["alpha"], gb["beta"], gb["gamma"]
    radius = offset_radius + gb["offset"]
    return (offset_radius.reciprocal() - torch.tanh(psi * (alpha - psi * (beta - gamma * psi))) / radius).reciprocal()


def obc_energy(v: Vectors, gb: dict) -> torch.Tensor:
    """OBC generalized Born (``GBSAOBC1Force`` / ``GBSAOBC2Force``, no cutoff, no salt).

    ``v``: difference vectors of every atom pair ``i < j``. ``gb`` holds per-atom
    ``charge``, ``offset_radius`` (OpenMM's ``or``), ``scaled_radius`` (``sr``), their
    values per pair (``offset_radius_i``, ``scaled_radius_j``, ... ), the charge products
    ``charge_ij``, the tanh coefficients ``alpha, beta, gamma``, ``offset``, ``prefactor``
    (``-138.935485 (1/soluteDielectric - 1/solventDielectric)``), ``surface`` (the ACE
    surface term's 28.3919551, or 0 without it), and two functions: ``to_atoms(a_i, a_j)``
    sums pair values ``[batch, n_pairs]`` onto atoms i and j, ``to_pairs(a)`` gives an atom
    value ``[batch, n_atoms]`` at both atoms of every pair.
    """
    r2 = _dot(v, v)
    born = _born_radii(r2.sqrt(), gb)
    charge = gb["charge"]
    inv_born = born.reciprocal()
    self_energy = inv_born @ (0.5 * gb["prefactor"] * charge * charge)
    radius = gb["offset_radius"] + gb["offset"]
    ratio3 = (radius * inv_born) ** 3
    surface = (ratio3 * ratio3) @ (gb["surface"] * (radius + 0.14) ** 2)
    born_i, born_j = gb["to_pairs"](born)
    pair = gb_pair_sum(r2, born_i * born_j, gb["prefactor"] * gb["charge_ij"])
    return self_energy + surface + pair
