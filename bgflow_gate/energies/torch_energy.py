"""``TorchEnergy``: an OpenMM system's energy, batched in PyTorch, in kT."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .. import bg
from ..units import KT, check_temperature, kt_in_kjmol
from .model import FORMAT, TERMS, SystemModel

__all__ = ["TorchEnergy"]


class _GuardedEnergy(torch.autograd.Function):
    """Energies with their gradient computed in the forward pass (analytically, no autograd
    graph); a sample whose energy or gradient is not finite gets ``+inf`` and a zero
    gradient, so nothing non-finite flows back."""

    @staticmethod
    def forward(ctx, positions: torch.Tensor, model: SystemModel) -> torch.Tensor:
        with torch.no_grad():
            energy, gradient = model.energy_and_gradient(positions.detach())
            bad = ~(torch.isfinite(energy) & torch.isfinite(gradient).flatten(1).all(1))
            energy = energy.masked_fill_(bad, math.inf)
            ctx.save_for_backward(gradient.masked_fill_(bad[:, None, None], 0))
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return grad_output[:, None, None] * gradient, None


def _unguarded(positions: torch.Tensor, model: SystemModel) -> torch.Tensor:
    """Energies without a gradient; non-finite ones become ``+inf``."""
    with torch.no_grad():
        energy, _ = model.energy_and_gradient(positions)
    return torch.where(torch.isfinite(energy), energy, torch.full_like(energy, math.inf))


def _check_parameters(parameters: dict) -> dict:
    """A copy of a parameter dictionary with its tensors on the CPU in float64 (indices long)."""
    unknown = set(parameters) - set(TERMS) - {"n_atoms", "format", "temperature"}
    if unknown:
        raise ValueError(f"unknown keys in the TorchEnergy parameters: {sorted(unknown)}; known: {TERMS}")
    if parameters.get("format", FORMAT) != FORMAT:
        raise ValueError(f"parameters are in format {parameters['format']!r}; this version reads {FORMAT!r}")
    copy: dict = {"n_atoms": int(parameters["n_atoms"])}
    for name in TERMS:
        if name in parameters:
            copy[name] = {
                key: torch.as_tensor(value, dtype=torch.long if key == "atoms" else torch.float64).detach().cpu()
                for key, value in parameters[name].items()
            }
    return copy


class TorchEnergy(bg.Energy):
    """An OpenMM system's potential energy in kT, batched in PyTorch, forces by autograd.

    It drops in where bgflow's ``OpenMMEnergy`` was: the same input (positions in nm,
    ``[*batch, 3 * n_atoms]``), the same output (``[*batch, 1]`` in kT at
    :attr:`temperature`). The whole batch is one tensor computation on the input's device in
    the input's dtype; OpenMM is needed only by :meth:`from_openmm`.

    Samples with non-finite coordinates, or whose energy or force is not finite (coincident
    atoms, float32 overflow), get ``+inf`` energy and zero force — never NaN, never a NaN
    gradient. The energy is differentiable once (its gradient is computed with the energy).

    Parameters
    ----------
    parameters : dict
        The system's parameters (:mod:`bgflow_gate.energies.model`; made by
        :meth:`from_openmm`, saved by :meth:`to_dict`).
    temperature : float
        Temperature in K; energies are in units of kT at it.
    two_event_dims : bool
        Inputs shaped ``[*batch, n_atoms, 3]`` instead of ``[*batch, 3 * n_atoms]``.

    Attributes
    ----------
    temperature : float
        Temperature in K that defines kT.
    unit : str
        ``"kT"``: the unit of the energies.
    accepts_nonfinite : bool
        True: non-finite coordinates give +inf and a zero gradient, so a
        :class:`~bgflow_gate.ScheduledEnergyGate` passes whole batches without a host read.
    """

    unit = KT
    accepts_nonfinite = True

    def __init__(self, parameters: dict, temperature: float, two_event_dims: bool = False):
        tables = _check_parameters(parameters)
        n_atoms = tables["n_atoms"]
        super().__init__([n_atoms, 3] if two_event_dims else [3 * n_atoms])
        self._tables = tables
        self.temperature = check_temperature(temperature)
        self.n_atoms = n_atoms
        self._two_event_dims = two_event_dims
        self._models: dict[tuple[torch.device, torch.dtype], SystemModel] = {}

    @classmethod
    def from_openmm(cls, system, temperature: float, verify: bool = True, two_event_dims: bool = False) -> "TorchEnergy":
        """Build from an ``openmm.System`` (the only method that needs OpenMM).

        Parameters
        ----------
        system : openmm.System
            Its forces must be supported (see :mod:`bgflow_gate.energies.openmm_reader`).
        temperature : float
            Temperature in K that defines kT.
        verify : bool
            Compare energies and forces with OpenMM's Reference platform on a few
            configurations (float64, 1e-6 relative) and raise ``RuntimeError`` if they differ.

        Raises
        ------
        UnsupportedForceError
            For a force or setting that is not supported; the message names the force.
        """
        from .openmm_reader import read_system, verify_against_reference

        energy = cls(read_system(system), temperature, two_event_dims=two_event_dims)
        if verify:
            verify_against_reference(system, energy.potential)
        return energy

    def to_dict(self) -> dict:
        """Everything needed to rebuild this energy: plain tensors, numbers and strings.

        ``torch.save(energy.to_dict(), path)`` and ``torch.load(path, weights_only=True)``
        carry it to a machine without OpenMM.
        """
        terms = {name: {k: v.clone() for k, v in self._tables[name].items()} for name in TERMS if name in self._tables}
        return {"format": FORMAT, "n_atoms": self.n_atoms, "temperature": self.temperature, **terms}

    @classmethod
    def from_dict(cls, data: dict, two_event_dims: bool = False) -> "TorchEnergy":
        """Rebuild an energy from :meth:`to_dict`'s output."""
        return cls(data, data["temperature"], two_event_dims=two_event_dims)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` with ``torch.save``."""
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path, two_event_dims: bool = False) -> "TorchEnergy":
        """Read an energy written by :meth:`save` (no OpenMM needed)."""
        return cls.from_dict(torch.load(path, weights_only=True), two_event_dims=two_event_dims)

    @property
    def kt(self) -> float:
        """kT at :attr:`temperature`, kJ/mol."""
        return kt_in_kjmol(self.temperature)

    @property
    def terms(self) -> tuple[str, ...]:
        """The terms this system has, a subset of ``("bonds", "angles", "torsions", "pairs", "obc")``."""
        return tuple(name for name in TERMS if name in self._tables)

    def _model(self, device: torch.device, dtype: torch.dtype) -> SystemModel:
        key = (device, dtype)
        if key not in self._models:
            self._models[key] = SystemModel(self._tables, device, dtype)
        return self._models[key]

    def _positions(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        event = 2 if self._two_event_dims else 1
        if tuple(batch.shape[batch.dim() - event:]) != tuple(self.event_shape):
            raise ValueError(f"positions must have shape [*batch, {', '.join(map(str, self.event_shape))}] (nm), got {tuple(batch.shape)}")
        return batch.reshape(-1, self.n_atoms, 3), batch.shape[: batch.dim() - event]

    def potential(self, batch: torch.Tensor) -> torch.Tensor:
        """Energies ``[*batch, 1]`` in kJ/mol (non-finite: ``+inf``, zero gradient)."""
        positions, batch_shape = self._positions(batch)
        model = self._model(positions.device, positions.dtype)
        if positions.requires_grad and torch.is_grad_enabled():
            energy = _GuardedEnergy.apply(positions, model)
        else:
            energy = _unguarded(positions, model)
        return energy.reshape(*batch_shape, 1)

    def _energy(self, batch: torch.Tensor) -> torch.Tensor:
        return self.potential(batch) / self.kt

    def forces(self, batch: torch.Tensor) -> torch.Tensor:
        """Forces ``-dE/dx`` in kT/nm, shaped like ``batch`` (zero where the energy is ``+inf``)."""
        x = batch.detach().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(self._energy(x).sum(), x)
        return -gradient

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, terms={self.terms}, temperature={self.temperature:g}, unit='kT'"
