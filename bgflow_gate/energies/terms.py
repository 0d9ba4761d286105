"""The energy terms of an OpenMM system as batched tensor functions (kJ/mol, nm, radians).

Every function takes difference vectors shaped ``[batch, 3, n]`` (one column per bond,
angle leg, torsion leg or atom pair, as :class:`~bgflow_gate.energies.layout.Layout` makes
them) and per-term parameters shaped ``[n]``, and returns the term's energy per sample,
``[batch]``. The formulas are OpenMM's:

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

__all__ = ["bond_energy", "angle_energy", "torsion_energy", "pair_energy", "obc_energy"]


def _norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the coordinate axis (dim 1); its gradient at 0 is 0, not NaN."""
    return torch.linalg.vector_norm(v, dim=1)


def bond_energy(v: torch.Tensor, length: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Harmonic bonds: ``sum k / 2 (|v| - length)^2`` over the columns of ``v``."""
    stretch = _norm(v) - length
    return (stretch * stretch) @ (0.5 * k)


def angle_energy(a: torch.Tensor, b: torch.Tensor, theta0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Harmonic angles between the legs ``a`` (atom 1 to 0) and ``b`` (atom 1 to 2)."""
    cross = torch.linalg.cross(a, b, dim=1)
    theta = torch.atan2(_norm(cross), (a * b).sum(1))
    bend = theta - theta0
    return (bend * bend) @ (0.5 * k)


def torsion_energy(
    b1: torch.Tensor,
    b2: torch.Tensor,
    b3: torch.Tensor,
    periodicity: torch.Tensor,
    phase: torch.Tensor,
    k: torch.Tensor,
) -> torch.Tensor:
    """Periodic torsions of the bond vectors ``b1 = x1 - x0``, ``b2 = x2 - x1``, ``b3 = x3 - x2``.

    The dihedral is IUPAC's (trans = pi), the same sign convention as OpenMM's.
    """
    n1 = torch.linalg.cross(b1, b2, dim=1)
    n2 = torch.linalg.cross(b2, b3, dim=1)
    phi = torch.atan2(_norm(b2) * (b1 * n2).sum(1), (n1 * n2).sum(1))
    return (1 + torch.cos(periodicity * phi - phase)) @ k


def pair_energy(v: torch.Tensor, qq: torch.Tensor, c12: torch.Tensor, c6: torch.Tensor) -> torch.Tensor:
    """Lennard-Jones and Coulomb: ``c12 / r^12 - c6 / r^6 + qq / r`` summed over the pairs.

    ``c12 = 4 eps sigma^12``, ``c6 = 4 eps sigma^6``, ``qq`` = Coulomb's constant times the
    charge product, per pair.
    """
    inv_r2 = (v * v).sum(1).reciprocal()
    inv_r6 = inv_r2 * inv_r2 * inv_r2
    return (inv_r6 * inv_r6) @ c12 - inv_r6 @ c6 + inv_r2.sqrt() @ qq


def _descreening(r: torch.Tensor, offset_radius: torch.Tensor, scaled_radius: torch.Tensor) -> torch.Tensor:
    """OBC's pair integral: what atom j (``scaled_radius``) takes from atom i (``offset_radius``)."""
    upper = r + scaled_radius
    lower = torch.maximum(offset_radius, (r - scaled_radius).abs())
    inv_u, inv_l = upper.reciprocal(), lower.reciprocal()
    value = 0.5 * (
        inv_l - inv_u
        + 0.25 * (r - scaled_radius * scaled_radius / r) * (inv_u * inv_u - inv_l * inv_l)
        + 0.5 * torch.log(lower / upper) / r
    )
    return torch.where(r + scaled_radius >= offset_radius, value, torch.zeros_like(value))


def _born_radii(r: torch.Tensor, gb: dict[str, torch.Tensor], n_atoms: int) -> torch.Tensor:
    """OBC effective Born radii ``[batch, n_atoms]`` from all pair distances ``r`` ``[batch, n_pairs]``."""
    i, j = gb["pair_i"], gb["pair_j"]
    offset_radius, scaled = gb["offset_radius"], gb["scaled_radius"]
    both = torch.cat([r, r], dim=1)
    integrals = _descreening(
        both, torch.cat([offset_radius[i], offset_radius[j]]), torch.cat([scaled[j], scaled[i]])
    )
    total = torch.zeros(r.shape[0], n_atoms, dtype=r.dtype, device=r.device)
    total = total.index_add(1, torch.cat([i, j]), integrals)
    psi = total * offset_radius
    alpha, beta, gamma = gb["alpha"], gb["beta"], gb["gamma"]
    radius = offset_radius + gb["offset"]
    return (offset_radius.reciprocal() - torch.tanh(psi * (alpha - psi * (beta - gamma * psi))) / radius).reciprocal()


def obc_energy(v: torch.Tensor, gb: dict[str, torch.Tensor], n_atoms: int) -> torch.Tensor:
    """OBC generalized Born (``GBSAOBC1Force`` / ``GBSAOBC2Force``, no cutoff, no salt).

    ``v``: difference vectors of every atom pair ``gb["pair_i"] < gb["pair_j"]``. ``gb``
    holds per-atom ``charge``, ``offset_radius`` (OpenMM's ``or``), ``scaled_radius``
    (``sr``), the tanh coefficients ``alpha, beta, gamma``, ``offset``, ``prefactor``
    (``-138.935485 (1/soluteDielectric - 1/solventDielectric)``) and ``surface``
    (the ACE surface term's 28.3919551, or 0 without it).
    """
    r2 = (v * v).sum(1)
    r = r2.sqrt()
    born = _born_radii(r, gb, n_atoms)
    charge = gb["charge"]
    inv_born = born.reciprocal()
    self_energy = inv_born @ (0.5 * gb["prefactor"] * charge * charge)
    radius = gb["offset_radius"] + gb["offset"]
    ratio3 = (radius * inv_born) ** 3
    surface = (ratio3 * ratio3) @ (gb["surface"] * (radius + 0.14) ** 2)
    bb = born.index_select(1, gb["pair_i"]) * born.index_select(1, gb["pair_j"])
    f = torch.sqrt(r2 + bb * torch.exp(-r2 / (4 * bb)))
    pair = f.reciprocal() @ (gb["prefactor"] * charge[gb["pair_i"]] * charge[gb["pair_j"]])
    return self_energy + surface + pair
