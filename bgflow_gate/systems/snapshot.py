"""What ``bgflow-gate train`` needs of alanine dipeptide on a machine without OpenMM.

A :class:`SystemSnapshot` holds the z-matrix and rigid block of the spline generator, the
starting structure, what the physical generator needs (the global z-matrix, the bonds and the
energy minimum, :class:`~bgflow_gate.systems.physical.PhysicalInputs`) and the system's
:class:`~bgflow_gate.TorchEnergy` parameters, as plain arrays and tensors. ``bgflow-gate
data`` writes one beside the dataset in the data cache (:func:`snapshot_path`); a run where
``openmm`` does not import reads it, and reads the cached dataset with
:func:`load_offline_dataset`, which checks the stored energies against the snapshot's
TorchEnergy instead of OpenMM. Only :meth:`SystemSnapshot.of` needs OpenMM.
A snapshot of an older format (before the physical generator's inputs) is refused with a
``ValueError`` that says to write it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..energies import TorchEnergy
from .data import ENERGY_TOLERANCE_KJMOL, Dataset, DatasetError, ReplicaExchangeSettings, load_dataset
from .physical import PhysicalInputs

__all__ = ["SNAPSHOT_FORMAT", "SystemSnapshot", "snapshot_path", "dataset_path", "load_offline_dataset"]

#: Name and version of a snapshot file (2: with the physical generator's inputs).
SNAPSHOT_FORMAT = "bgflow_gate.SystemSnapshot/2"
_FORMAT_NAME = SNAPSHOT_FORMAT.rsplit("/", 1)[0]
#: The arrays of a snapshot file, and those of its ``physical`` (keys ``physical_<name>``).
_ARRAYS = ("z_matrix", "rigid_block", "positions")
_PHYSICAL = ("z_matrix", "bonds", "minimum")


def snapshot_path(cache_dir: str | Path, solvent: str) -> Path:
    """Where the data cache ``cache_dir`` keeps the snapshot of the ``solvent`` system."""
    return Path(cache_dir) / f"alanine_{solvent}_system.pt"


def dataset_path(cache_dir: str | Path, settings: ReplicaExchangeSettings) -> Path:
    """The cache file of the dataset for ``settings`` (the name
    :func:`~bgflow_gate.systems.data.generate_dataset` gives it)."""
    return Path(cache_dir) / f"alanine_{settings.solvent}_{settings.key}.npz"


@dataclass(frozen=True)
class SystemSnapshot:
    """Alanine dipeptide without OpenMM: enough for both generators and a TorchEnergy.

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
    physical : PhysicalInputs
        The physical generator's global z-matrix, bonds and energy minimum (float64), so
        :func:`~bgflow_gate.systems.physical.physical_generator` of the snapshot is the
        generator of the system.
    """

    solvent: str
    z_matrix: np.ndarray
    rigid_block: np.ndarray
    positions: np.ndarray
    energy: dict
    physical: PhysicalInputs

    @classmethod
    def of(cls, system, temperature: float = 300.0) -> "SystemSnapshot":
        """The snapshot of an :class:`~bgflow_gate.systems.alanine.AlanineDipeptide` (needs OpenMM)."""
        energy = TorchEnergy.from_openmm(system.system, temperature=temperature)
        return cls(system.solvent, np.asarray(system.z_matrix), np.asarray(system.rigid_block),
                   np.asarray(system.positions), energy.to_dict(), PhysicalInputs.of(system))

    def torch_energy(self, temperature: float) -> TorchEnergy:
        """The system's energy in kT at ``temperature`` K."""
        return TorchEnergy(self.energy, temperature)

    def save(self, path: str | Path) -> Path:
        """Write the snapshot (atomically; loads with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": SNAPSHOT_FORMAT, "solvent": self.solvent, "energy": self.energy,
                 **{k: torch.as_tensor(getattr(self, k)) for k in _ARRAYS},
                 **{f"physical_{k}": torch.as_tensor(getattr(self.physical, k)) for k in _PHYSICAL}}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, experiment: str | None = None) -> "SystemSnapshot":
        """Read a snapshot written by :meth:`save`.

        Parameters
        ----------
        path : str or Path
        experiment : str, optional
            The experiment whose ``bgflow-gate data`` writes the file, for the advice in
            the error about a snapshot of an older format.

        Raises
        ------
        FileNotFoundError
        ValueError
            Naming the file: not a snapshot, or one of another format (an older one: write
            it again with ``bgflow-gate data --experiment NAME`` where OpenMM is installed).
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways
            raise ValueError(f"{path} is not a system snapshot ({' '.join(str(err).split())[:100]})") from None
        _check_format(state, path, experiment)
        arrays = {k: state[k].numpy() for k in _ARRAYS}
        physical = PhysicalInputs(**{k: state[f"physical_{k}"].numpy() for k in _PHYSICAL})
        return cls(state["solvent"], energy=state["energy"], physical=physical, **arrays)


def _check_format(state, path, experiment: str | None) -> None:
    """A ``ValueError`` unless ``state`` (a loaded file) is a snapshot of :data:`SNAPSHOT_FORMAT`."""
    found = state.get("format") if isinstance(state, dict) else None
    if found == SNAPSHOT_FORMAT:
        return
    name, _, version = str(found).rpartition("/")
    if name != _FORMAT_NAME:
        raise ValueError(f"{path} is not a system snapshot of format {SNAPSHOT_FORMAT!r}")
    if version.isdigit() and int(version) > int(SNAPSHOT_FORMAT.rsplit("/", 1)[1]):
        raise ValueError(f"{path} was written by a newer bgflow-gate (format {found!r}; this one reads "
                         f"{SNAPSHOT_FORMAT!r}); update bgflow-gate")
    raise ValueError(f"{path} was written by an older bgflow-gate (format {found!r}, without the physical "
                     f"generator's inputs; this one reads {SNAPSHOT_FORMAT!r}); write it again with "
                     f"'bgflow-gate data --experiment {experiment or 'NAME'}' where OpenMM is installed")


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
