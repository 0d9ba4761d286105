"""What ``bgflow-gate train`` needs of alanine dipeptide on a machine without OpenMM.

A :class:`SystemSnapshot` holds the z-matrix and rigid block of the spline generator, the
starting structure and the system's :class:`~bgflow_gate.TorchEnergy` parameters, as plain
arrays and tensors. ``bgflow-gate data`` writes one beside the dataset in the data cache
(:func:`snapshot_path`); a run where ``openmm`` does not import reads it, and reads the cached
dataset with :func:`load_offline_dataset`, which checks the stored energies against the
snapshot's TorchEnergy instead of OpenMM. Only :meth:`SystemSnapshot.of` needs OpenMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..energies import TorchEnergy
from .data import ENERGY_TOLERANCE_KJMOL, Dataset, DatasetError, ReplicaExchangeSettings, load_dataset

__all__ = ["SNAPSHOT_FORMAT", "SystemSnapshot", "snapshot_path", "dataset_path", "load_offline_dataset"]

#: Name and version of a snapshot file.
SNAPSHOT_FORMAT = "bgflow_gate.SystemSnapshot/1"


def snapshot_path(cache_dir: str | Path, solvent: str) -> Path:
    """Where the data cache ``cache_dir`` keeps the snapshot of the ``solvent`` system."""
    return Path(cache_dir) / f"alanine_{solvent}_system.pt"


def dataset_path(cache_dir: str | Path, settings: ReplicaExchangeSettings) -> Path:
    """The cache file of the dataset for ``settings`` (the name
    :func:`~bgflow_gate.systems.data.generate_dataset` gives it)."""
    return Path(cache_dir) / f"alanine_{settings.solvent}_{settings.key}.npz"


@dataclass(frozen=True)
class SystemSnapshot:
    """Alanine dipeptide without OpenMM: enough for the spline generator and a TorchEnergy.

    Attributes
    ----------
    solvent : str
    z_matrix : numpy.ndarray
        The mixed transform's z-matrix (atoms outside the rigid block).
    rigid_block : numpy.ndarray
    positions : numpy.ndarray
        ``[22, 3]`` nm, openmmtools' starting structure.
    energy : dict
        :meth:`TorchEnergy.to_dict` of the system.
    """

    solvent: str
    z_matrix: np.ndarray
    rigid_block: np.ndarray
    positions: np.ndarray
    energy: dict

    @classmethod
    def of(cls, system, temperature: float = 300.0) -> "SystemSnapshot":
        """The snapshot of an :class:`~bgflow_gate.systems.alanine.AlanineDipeptide` (needs OpenMM)."""
        energy = TorchEnergy.from_openmm(system.system, temperature=temperature)
        return cls(system.solvent, np.asarray(system.z_matrix), np.asarray(system.rigid_block),
                   np.asarray(system.positions), energy.to_dict())

    def torch_energy(self, temperature: float) -> TorchEnergy:
        """The system's energy in kT at ``temperature`` K."""
        return TorchEnergy(self.energy, temperature)

    def save(self, path: str | Path) -> Path:
        """Write the snapshot (atomically; loads with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": SNAPSHOT_FORMAT, "solvent": self.solvent, "energy": self.energy,
                 **{k: torch.as_tensor(getattr(self, k)) for k in ("z_matrix", "rigid_block", "positions")}}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SystemSnapshot":
        """Read a snapshot written by :meth:`save`; a ``ValueError`` naming the file otherwise."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways
            raise ValueError(f"{path} is not a system snapshot ({' '.join(str(err).split())[:100]})") from None
        if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a system snapshot of format {SNAPSHOT_FORMAT!r}")
        arrays = {k: state[k].numpy() for k in ("z_matrix", "rigid_block", "positions")}
        return cls(state["solvent"], energy=state["energy"], **arrays)


def load_offline_dataset(settings: ReplicaExchangeSettings, cache_dir: str | Path, energy: TorchEnergy,
                         n_checks: int = 20) -> Dataset:
    """The cached dataset for ``settings``, its stored energies checked against ``energy``
    (a TorchEnergy of the same system) on ``n_checks`` frames instead of OpenMM.

    Raises
    ------
    FileNotFoundError
        The cache holds no dataset for ``settings``.
    DatasetError
        The file is damaged, or its energies differ from ``energy``'s.
    """
    dataset = load_dataset(dataset_path(cache_dir, settings))
    idx = np.unique(np.linspace(0, len(dataset.positions) - 1, min(n_checks, len(dataset.positions))).astype(int))
    x = torch.as_tensor(np.asarray(dataset.positions[idx], dtype=np.float64))
    diff = np.abs(energy.potential(x).view(-1).numpy() - np.asarray(dataset.energies[idx], dtype=np.float64))
    if not (diff <= ENERGY_TOLERANCE_KJMOL).all():
        raise DatasetError(f"{dataset.path}: stored energies differ from the snapshot's TorchEnergy by up to "
                           f"{np.nanmax(diff):.3g} kJ/mol; write the cache again with 'bgflow-gate data'")
    return dataset
