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

from .layout import Layout
from .obc import obc_energy, obc_tables
from .radial import nonbonded_with_slope
from .scratch import Scratch
from .terms import angle_energy, bond_energy, torsion_energy

__all__ = ["FORMAT", "TERMS", "SystemModel"]

#: Name and version of the parameter dictionary.
FORMAT = "bgflow_gate.TorchEnergy/1"
#: The terms a parameter dictionary may hold.
TERMS = ("bonds", "angles", "torsions", "pairs", "obc")
#: Bytes of one sample's pair value per piece on the CPU: 256 samples in float64, 512 in float32
#: (measured on a 2-core Xeon with 2 MiB of L2 per core; 128 / 1024 samples were slower).
CPU_CHUNK_BYTES = 2048
#: The Layout segments of each term, in the order the term's function takes its vectors.
_LEGS = {"bonds": ("bonds",), "angles": ("angle_a", "angle_b"), "torsions": ("torsion_b1", "torsion_b2", "torsion_b3")}
#: The parameters of each bonded term, in the order the term's function takes them.
_PARAMETERS = {"bonds": ("length", "k"), "angles": ("theta0", "k"), "torsions": ("periodicity", "phase", "k")}


def _segments(parameters: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The difference vectors the bonded terms need: (plus atom, minus atom) per column."""
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
    return segments


def _cast(term: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A term's parameters on ``device``: floating ones in ``dtype``, atom indices as they are."""
    return {
        name: torch.as_tensor(value, dtype=dtype if name != "atoms" else torch.long, device=device)
        for name, value in term.items()
    }


def _pair_table(parameters: dict) -> dict | None:
    """The nonbonded pairs (atoms, qq, c12, c6); with OBC, every pair ``i < j`` in
    ``torch.triu_indices`` order (the nonbonded parameters added in, zero elsewhere), so
    that both share one set of distances."""
    pairs = parameters.get("pairs")
    if "obc" not in parameters:
        return None if pairs is None else dict(pairs)
    n = parameters["n_atoms"]
    i, j = torch.triu_indices(n, n, 1)
    table = {"atoms": torch.stack([i, j], 1)}
    for key in ("qq", "c12", "c6"):
        table[key] = torch.zeros(len(i), dtype=torch.float64)
        if pairs is not None:
            a = pairs["atoms"].long()
            low, high = torch.minimum(a[:, 0], a[:, 1]), torch.maximum(a[:, 0], a[:, 1])
            column = low * n - low * (low + 1) // 2 + (high - low - 1)  # triu_indices' order
            table[key].index_add_(0, column, torch.as_tensor(pairs[key], dtype=torch.float64))
    return table


class SystemModel:
    """The energy (kJ/mol) of a batch of configurations of one system, with its gradient.

    Every term computes its gradient with its value (no autograd graph): with respect to its
    difference vectors, which a :class:`~bgflow_gate.energies.layout.Layout` turns into the
    gradient on the positions with one matrix product. On the CPU the batch goes in pieces
    of :attr:`chunk` samples, so that the ``[chunk, n_pairs]`` temporaries stay in the
    core's cache, each written into the same buffers piece after piece
    (:class:`~bgflow_gate.energies.scratch.Scratch`: fresh memory costs page faults).

    Parameters
    ----------
    parameters : dict
        The system's parameters (see the module docstring).
    device, dtype
        Where and in which precision the energy is evaluated.

    Attributes
    ----------
    chunk : int or None
        Samples per piece (on the CPU 256 in float64, 512 in float32; ``None``: the whole batch at once).
    """

    def __init__(self, parameters: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        device = torch.device(device)
        self.n_atoms = int(parameters["n_atoms"])
        self.chunk = CPU_CHUNK_BYTES // dtype.itemsize if device.type == "cpu" else None
        self.layout = Layout(self.n_atoms, _segments(parameters), device, dtype)
        self.terms = {name: _cast(parameters[name], device, dtype) for name in TERMS[:3] if name in parameters}
        pairs = _pair_table(parameters)
        self.pair_layout = None
        if pairs is not None:
            self.terms["pairs"] = _cast(pairs, device, dtype)
            self.pair_layout = Layout(self.n_atoms, {"pairs": (pairs["atoms"][:, 1], pairs["atoms"][:, 0])}, device, dtype)
        if "obc" in parameters:
            self.terms["obc"] = obc_tables(parameters["obc"], self.n_atoms, device, dtype)
        self._scratch = Scratch(keep=device.type == "cpu")

    def _bonded(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bond, angle and torsion energies ``[batch]`` and their gradient ``[batch, n_atoms, 3]``."""
        v = self.layout(positions, self._scratch)
        energy = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        gradient = self._scratch("bonded_gradient", v.shape, v)
        for name, function in {"bonds": bond_energy, "angles": angle_energy, "torsions": torsion_energy}.items():
            if name in self.terms:
                # a term's legs are consecutive segments: one [3, batch, legs * n] slice
                columns = slice(self.layout.slices[_LEGS[name][0]].start, self.layout.slices[_LEGS[name][-1]].stop)
                parameters = (self.terms[name][key] for key in _PARAMETERS[name])
                energy += function(v[..., columns], *parameters, out=gradient[..., columns], scratch=self._scratch)
        return energy, self.layout.gradient(gradient)

    def _pair_terms(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nonbonded and OBC energies ``[batch]`` and their gradient ``[batch, n_atoms, 3]``."""
        scratch = self._scratch
        v = self.pair_layout(positions, scratch)
        r2 = torch.mul(v[0], v[0], out=scratch("r2", v.shape[1:], v)).addcmul_(v[1], v[1]).addcmul_(v[2], v[2])
        inv_r = torch.rsqrt(r2, out=scratch("inv_r", r2.shape, v))
        p = self.terms["pairs"]
        energy, by_r2 = nonbonded_with_slope(inv_r, p["qq"], p["c12"], p["c6"], scratch)
        if "obc" in self.terms:
            r = torch.mul(r2, inv_r, out=scratch("r", r2.shape, v))
            gb_energy, gb_by_r2 = obc_energy(r2, r, inv_r, self.terms["obc"], scratch)
            energy, by_r2 = energy + gb_energy, by_r2.add_(gb_by_r2)
        return energy, self.pair_layout.gradient(v.mul_(by_r2.mul_(2)))

    @torch.no_grad()
    def energy_and_gradient(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies ``[batch]`` in kJ/mol of positions ``[batch, n_atoms, 3]`` in nm, and their
        gradient ``[batch, n_atoms, 3]`` in kJ/mol/nm."""
        chunk = self.chunk or max(positions.shape[0], 1)
        energies, gradients = [], []
        for start in range(0, positions.shape[0], chunk):
            piece = positions[start:start + chunk]
            energy, gradient = self._bonded(piece)
            if self.pair_layout is not None:
                pair_energy, pair_gradient = self._pair_terms(piece)
                energy, gradient = energy + pair_energy, gradient + pair_gradient
            energies.append(energy)
            gradients.append(gradient)
        if len(energies) == 1:
            return energies[0], gradients[0]
        return torch.cat(energies), torch.cat(gradients)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """Energies ``[batch]`` in kJ/mol of positions ``[batch, n_atoms, 3]`` in nm."""
        return self.energy_and_gradient(positions)[0]
