"""A system's parameters as a plain dictionary of tensors, and its batched energy.

The dictionary (:data:`FORMAT`) is what :meth:`TorchEnergy.to_dict` saves: tensors,
numbers and strings only, so ``torch.save`` / ``torch.load(weights_only=True)`` carry it to
a machine without OpenMM. Keys (each term optional)::

    n_atoms                      int
    bonds     atoms [n, 2], length [n] (nm), k [n] (kJ/mol/nm^2)
    angles    atoms [n, 3], theta0 [n] (rad), k [n] (kJ/mol/rad^2)
    torsions  atoms [n, 4], periodicity [n], phase [n] (rad), k [n] (kJ/mol)
    pairs     atoms [n, 2], qq [n] (kJ/mol nm), c12 [n] (kJ/mol nm^12), c6 [n] (kJ/mol nm^6)
    obc       charge, offset_radius, scaled_radius [n_atoms]; alpha, beta, gamma, offset,
              prefactor, surface (numbers)
"""

from __future__ import annotations

import torch

from .layout import Layout, PairAtomMap
from .terms import angle_energy, bond_energy, obc_energy, pair_energy, torsion_energy

__all__ = ["FORMAT", "TERMS", "SystemModel"]

#: Name and version of the parameter dictionary.
FORMAT = "bgflow_gate.TorchEnergy/1"
#: The terms a parameter dictionary may hold.
TERMS = ("bonds", "angles", "torsions", "pairs", "obc")


def _segments(parameters: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The difference vectors every term needs: (plus atom, minus atom) per column."""
    segments = {}
    if "bonds" in parameters:
        a = parameters["bonds"]["atoms"]
        segments["bonds"] = (a[:, 1], a[:, 0])
    if "angles" in parameters:
        a = parameters["angles"]["atoms"]
        segments["angle_a"], segments["angle_b"] = (a[:, 0], a[:, 1]), (a[:, 2], a[:, 1])
    if "torsions" in parameters:
        a = parameters["torsions"]["atoms"]
        for leg in range(3):
            segments[f"torsion_b{leg + 1}"] = (a[:, leg + 1], a[:, leg])
    if "pairs" in parameters:
        a = parameters["pairs"]["atoms"]
        segments["pairs"] = (a[:, 1], a[:, 0])
    if "obc" in parameters:
        i, j = torch.triu_indices(parameters["n_atoms"], parameters["n_atoms"], 1)
        segments["obc"] = (j, i)
    return segments


def _cast(term: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A term's parameters on ``device``: floating ones in ``dtype``, atom indices as they are."""
    return {
        name: torch.as_tensor(value, dtype=dtype if name != "atoms" else torch.long, device=device)
        for name, value in term.items()
    }


def _obc_pairs(gb: dict[str, torch.Tensor], n_atoms: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The OBC model's per-pair parameters and pair / atom maps, for all pairs ``i < j``."""
    i, j = torch.triu_indices(n_atoms, n_atoms, 1, device=device)
    pair_map = PairAtomMap(i, j, n_atoms, device, dtype)
    offset_radius, scaled, charge = gb["offset_radius"], gb["scaled_radius"], gb["charge"]
    return {
        "offset_radius_i": offset_radius[i], "offset_radius_j": offset_radius[j],
        "scaled_radius_i": scaled[i], "scaled_radius_j": scaled[j],
        "charge_ij": charge[i] * charge[j],
        "to_atoms": pair_map.to_atoms, "to_pairs": pair_map.to_pairs,
    }


class SystemModel:
    """The energy (kJ/mol) of a batch of configurations of one system.

    Parameters
    ----------
    parameters : dict
        The system's parameters (see the module docstring).
    device, dtype
        Where and in which precision the energy is evaluated.
    """

    def __init__(self, parameters: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.n_atoms = int(parameters["n_atoms"])
        self.layout = Layout(self.n_atoms, _segments(parameters)).to(torch.device(device), dtype)
        self.terms = {name: _cast(parameters[name], device, dtype) for name in TERMS if name in parameters}
        if "obc" in self.terms:
            self.terms["obc"].update(_obc_pairs(self.terms["obc"], self.n_atoms, torch.device(device), dtype))

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """Energies ``[batch]`` in kJ/mol of positions ``[batch, n_atoms, 3]`` in nm."""
        v = self.layout(positions)
        t = self.terms
        energy = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        if "bonds" in t:
            energy = energy + bond_energy(v["bonds"], t["bonds"]["length"], t["bonds"]["k"])
        if "angles" in t:
            energy = energy + angle_energy(v["angle_a"], v["angle_b"], t["angles"]["theta0"], t["angles"]["k"])
        if "torsions" in t:
            p = t["torsions"]
            legs = (v["torsion_b1"], v["torsion_b2"], v["torsion_b3"])
            energy = energy + torsion_energy(*legs, p["periodicity"], p["phase"], p["k"])
        if "pairs" in t:
            energy = energy + pair_energy(v["pairs"], t["pairs"]["qq"], t["pairs"]["c12"], t["pairs"]["c6"])
        if "obc" in t:
            energy = energy + obc_energy(v["obc"], t["obc"])
        return energy
