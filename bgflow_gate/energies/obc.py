"""The OBC generalized-Born energy (``GBSAOBC1Force`` / ``GBSAOBC2Force``, no cutoff, no salt)
with its gradient with respect to the pair distances, by hand in reverse order.

The energy of every pair ``i < j`` (all of them) and atom:

* Born radii ``B = 1 / (1/or - tanh(psi (alpha - psi (beta - gamma psi))) / radius)``,
  ``psi = I or``, ``I`` the sum of the descreening integrals of atom i's pairs
  (:func:`~.radial.descreening_with_slope`, evaluated in both directions of each pair);
* per atom ``prefactor q^2 / (2 B)`` and the ACE surface term
  ``surface (radius + 0.14)^2 (radius / B)^6``;
* per pair ``prefactor q_i q_j / f`` (:func:`~.radial.gb_pair_with_slopes`).
"""

from __future__ import annotations

import torch

from .layout import PairAtomMap
from .radial import descreening_reach, descreening_with_slope, gb_pair_with_slopes
from .scratch import FRESH, Scratch

__all__ = ["obc_tables", "obc_energy"]


def obc_tables(gb: dict, n_atoms: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Per-pair and per-atom tables of the OBC model for all pairs ``i < j`` (from the parameter dictionary's ``obc``)."""
    i, j = torch.triu_indices(n_atoms, n_atoms, 1, device=device)
    cast = {name: torch.as_tensor(value, dtype=dtype, device=device) for name, value in gb.items()}
    offset_radius, scaled, charge = cast["offset_radius"], cast["scaled_radius"], cast["charge"]
    radius = offset_radius + cast["offset"]
    return {
        "pair_map": PairAtomMap(i, j, n_atoms, device, dtype),
        # row 0: what j takes from i (i's integral); row 1: what i takes from j
        "pair_offset_radius": torch.stack([offset_radius[i], offset_radius[j]]),
        "pair_scaled_radius": torch.stack([scaled[j], scaled[i]]),
        "reach": descreening_reach(offset_radius, scaled),
        "pair_charge": cast["prefactor"] * charge[i] * charge[j],
        "psi_scale": 0.125 * offset_radius,  # psi = I or, from the sums of 8 I
        "inv_offset_radius": offset_radius.reciprocal(),
        "inv_radius": radius.reciprocal(),
        "self": 0.5 * cast["prefactor"] * charge * charge,
        "radius6": radius**6,
        "surface": cast["surface"] * (radius + 0.14) ** 2,
        "alpha": cast["alpha"], "beta": cast["beta"], "gamma": cast["gamma"],
    }


def _born_radii(total: torch.Tensor, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Born radii ``[batch, n_atoms]`` from eight times the descreening sums, and their derivative in those."""
    psi = total * t["psi_scale"]
    alpha, beta, gamma = t["alpha"], t["beta"], t["gamma"]
    argument = psi * (alpha - psi * (beta - gamma * psi))
    tanh = torch.tanh(argument)
    born = (t["inv_offset_radius"] - tanh * t["inv_radius"]).reciprocal_()
    # dB/dtotal = B^2 sech^2(arg) / radius * darg/dpsi * or / 8
    darg = alpha - psi * (2 * beta - 3 * gamma * psi)
    slope = born * born * (1 - tanh * tanh) * darg * (t["inv_radius"] * t["psi_scale"])
    return born, slope


def _atom_energy(born: torch.Tensor, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Self and surface energies ``[batch]`` of Born radii ``[batch, n_atoms]``, and ``dE/dB``."""
    inv_born = born.reciprocal()
    ratio6 = (inv_born * inv_born * inv_born).square_()
    surface = ratio6 * t["surface"] * t["radius6"]
    energy = inv_born @ t["self"] + surface.sum(-1)
    slope = -(inv_born * inv_born * t["self"] + 6 * surface * inv_born)
    return energy, slope


def obc_energy(r2: torch.Tensor, r: torch.Tensor, inv_r: torch.Tensor, t: dict, scratch: Scratch = FRESH):
    """OBC energy ``[batch]`` of all pairs' squared distances, distances and inverse distances
    ``[batch, n_pairs]`` (pairs ``i < j`` in ``torch.triu_indices`` order), and its derivative in
    ``r2`` per pair (a ``scratch`` buffer)."""
    pair_map: PairAtomMap = t["pair_map"]
    # the close-range branches only where a distance reaches them (on the CPU; elsewhere a
    # data-dependent branch would wait for the device)
    branches = r.device.type != "cpu" or not bool(r.min() > t["reach"])
    integral, integral_slope = descreening_with_slope(
        r[:, None, :], inv_r[:, None, :], t["pair_offset_radius"], t["pair_scaled_radius"], branches, scratch)
    born, born_slope = _born_radii(pair_map.to_atoms(integral), t)
    energy, by_born = _atom_energy(born, t)
    ends = pair_map.to_pairs(born, out=scratch("obc_ends", integral.shape, r2))  # [batch, 2, n_pairs]: B_i, B_j
    bb = torch.mul(ends[:, 0], ends[:, 1], out=scratch("obc_bb", r2.shape, r2))
    pair_energy, by_r2, by_bb = gb_pair_with_slopes(r2, bb, t["pair_charge"], scratch)
    # dE/dB_i += dE/dbb B_j, dE/dB_j += dE/dbb B_i: swap the ends in place, weight them
    swapped = integral  # the integrals are summed already; reuse their buffer
    torch.mul(ends[:, 1], by_bb, out=swapped[:, 0])
    torch.mul(ends[:, 0], by_bb, out=swapped[:, 1])
    by_total = by_born.add_(pair_map.to_atoms(swapped)).mul_(born_slope)
    by_r = torch.sum(pair_map.to_pairs(by_total, out=ends).mul_(integral_slope), 1, out=bb)
    return energy + pair_energy, by_r2.addcmul_(by_r, inv_r, value=0.5)
