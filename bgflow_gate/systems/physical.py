"""A Boltzmann generator for alanine dipeptide that starts physical, built without MD data.

All 22 atoms are described by one global z-matrix (bonds, angles, torsions; the six
degrees of freedom of the pose are held constant, so the generator's density lives on
shape space, like the mixed transform's). Its flow, before training, draws

* every bond from a normal around the force field's energy-minimised structure with a
  spread of 0.005 nm, every angle with 0.15 rad and every torsion that is not a rotor with
  0.2 rad (fab-torch's spreads), and
* the rotors -- the first proper torsion about each rotatable bond of
  :data:`ROTOR_BONDS` -- uniformly on the circle.

The flow is :class:`~bgflow_gate.systems.generators.ICSplineFlow`: its circular spline
couplings act on the rotors, its affine couplings on the rest (the non-rotor torsions
take the slot of the rigid block there); both start as the identity, so the untrained
generator samples exactly the distribution above.

The z-matrix decides whether those samples are physical. :func:`global_z_matrix` places
the chiral centre's neighbours from the frame N-CA-C (:data:`CHIRAL_FRAME`) and
references every atom that shares its bond and angle atoms with an earlier atom (a
sibling, e.g. the three hydrogens of a methyl) to that sibling, so one rotor turns a whole
group and the rest stay rigid around it.

The generator needs three things of the system (:class:`PhysicalInputs`): the global
z-matrix, the bonds (which torsions are proper, hence rotors) and the energy-minimised
structure, which comes from OpenMM (:func:`minimized_positions`). Built from an
:class:`~bgflow_gate.systems.alanine.AlanineDipeptide` they are computed (OpenMM needed);
a :class:`~bgflow_gate.systems.snapshot.SystemSnapshot` stores them, so
:func:`physical_generator` builds the same generator from one on a machine without OpenMM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import torch

from .. import bg
from .generators import ICSplineFlow
from .zmatrix import z_matrix_from_topology

__all__ = [
    "ROTOR_BONDS",
    "ALL_ROTORS",
    "BACKBONE_ROTORS",
    "CHIRAL_FRAME",
    "Spreads",
    "minimized_positions",
    "global_z_matrix",
    "reference_siblings",
    "rotor_rows",
    "bond_array",
    "PhysicalInputs",
    "physical_inputs",
    "TorsionLayout",
    "physical_generator",
]

#: Rotatable bonds of alanine dipeptide (atom pairs, openmmtools' order).
ROTOR_BONDS = {
    "phi": (6, 8),  # N - CA
    "psi": (8, 14),  # CA - C
    "ace_methyl": (1, 4),  # CH3 - C of the acetyl cap
    "nme_methyl": (16, 18),  # N - C of the N-methyl cap
    "cb_methyl": (8, 10),  # CA - CB
}
#: Every rotor: the backbone dihedrals and the three methyl groups.
ALL_ROTORS = tuple(ROTOR_BONDS)
#: The backbone dihedrals only (methyls then stay in one of their three wells).
BACKBONE_ROTORS = ("phi", "psi")
#: The frame of the global z-matrix: CA (the chiral centre), N, C; its first three rows are
#: the chain N-CA-C (see :func:`global_z_matrix`).
CHIRAL_FRAME = (8, 6, 14)


@dataclass(frozen=True)
class Spreads:
    """Standard deviations of the untrained flow around the minimised structure.

    Attributes
    ----------
    bond : float
        nm (fab-torch: 0.005).
    angle : float
        rad (fab-torch: 0.15).
    torsion : float
        rad, torsions that are not rotors (fab-torch: 0.2).
    """

    bond: float = 0.005
    angle: float = 0.15
    torsion: float = 0.2

    def __post_init__(self):
        for name in ("bond", "angle", "torsion"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"spread {name!r} must be a positive number, got {value!r}")


def minimized_positions(system, tolerance: float = 1.0, max_iterations: int = 0) -> np.ndarray:
    """The force field's local energy minimum nearest the system's starting positions.

    Parameters
    ----------
    system : AlanineDipeptide
        Gives the OpenMM system and the starting positions.
    tolerance : float
        Root-mean-square force (kJ/mol/nm) at which the minimiser stops.
    max_iterations : int
        0 for no limit.

    Returns
    -------
    numpy.ndarray
        ``[n_atoms, 3]`` positions in nm.
    """
    import openmm
    from openmm import unit

    context = openmm.Context(
        system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(system.positions * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context, tolerance, max_iterations)
    state = context.getState(getPositions=True)
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)


def reference_siblings(z_matrix: np.ndarray) -> np.ndarray:
    """Reference every atom to its first sibling: an earlier atom with the same bond and
    angle atoms becomes its torsion atom.

    Parameters
    ----------
    z_matrix : numpy.ndarray
        Rows ``[atom, bond_ref, angle_ref, torsion_ref]`` (``-1`` for a missing reference).

    Returns
    -------
    numpy.ndarray
        A copy; a row's torsion is then the (nearly constant) dihedral between the atom
        and its sibling about their common bond, e.g. +-120 degrees between two methyl
        hydrogens, so turning the sibling's torsion turns the whole group.
    """
    z = np.array(z_matrix, dtype=np.int64, copy=True)
    first: dict[tuple[int, int], int] = {}
    for row in z:
        atom, bond_ref, angle_ref, _ = (int(v) for v in row)
        if bond_ref < 0 or angle_ref < 0:
            continue
        key = (bond_ref, angle_ref)
        if key in first and row[3] >= 0:
            row[3] = first[key]
        first.setdefault(key, atom)
    return z


def global_z_matrix(topology, frame: Sequence[int] | None = CHIRAL_FRAME, siblings: bool = True) -> np.ndarray:
    """A global z-matrix (one row per atom) built from the topology's bonds.

    Parameters
    ----------
    topology : mdtraj.Topology or openmm.app.Topology
    frame : sequence of three int, optional
        ``(centre, a, b)``, ``a`` and ``b`` bonded to ``centre``: the first three atoms,
        written as the chain ``a - centre - b`` (rows ``[a]``, ``[centre, a]``,
        ``[b, centre, a]``), because bgflow's ``GlobalInternalCoordinateTransformation``
        reads its first three atoms as a chain whatever their rows say; so the two bonds
        and the angle ``a - centre - b`` are coordinates, not a 1-3 distance (which would
        let the angle spread stretch the bond ``centre - b``).
        The other atoms are placed outward from them by the builder of
        :mod:`bgflow_gate.systems.zmatrix`. ``None`` takes the builder's own choice of
        first atoms (for alanine dipeptide CA, N and the acetyl C, which places CB and HA
        from the acetyl carbon).
    siblings : bool
        Apply :func:`reference_siblings`.

    Returns
    -------
    numpy.ndarray
        ``[n_atoms, 4]``, the first three rows with ``-1`` (bgflow's global convention).
    """
    if frame is None:
        z = z_matrix_from_topology(topology)
    else:
        centre, a, b = (int(i) for i in frame)
        header = np.array([[a, -1, -1, -1], [centre, a, -1, -1], [b, centre, a, -1]])
        z = np.concatenate([header, z_matrix_from_topology(topology, fixed_atoms=[centre, a, b])])
    return reference_siblings(z) if siblings else z


def bond_array(topology) -> np.ndarray:
    """The bonds of a topology as atom pairs.

    Parameters
    ----------
    topology : mdtraj.Topology or openmm.app.Topology

    Returns
    -------
    numpy.ndarray
        ``[n_bonds, 2]`` int64, each pair ascending, the pairs sorted.
    """
    bonds = topology.bonds() if callable(topology.bonds) else topology.bonds
    pairs = sorted({tuple(sorted((b[0].index, b[1].index))) for b in bonds})
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _bond_set(bonds) -> set[frozenset[int]]:
    """``bonds`` (a topology or ``[n_bonds, 2]`` atom pairs) as a set of atom pairs."""
    pairs = bonds if isinstance(bonds, np.ndarray) else bond_array(bonds)
    return {frozenset(int(i) for i in pair) for pair in pairs.tolist()}


def rotor_rows(torsion_indices: np.ndarray, bonds, rotors: Iterable[str] = ALL_ROTORS) -> np.ndarray:
    """Which torsions are rotors: for every named rotor, the first proper torsion about its bond.

    Parameters
    ----------
    torsion_indices : numpy.ndarray
        ``[n_torsions, 4]`` atoms of each torsion, as the IC transform outputs them.
    bonds : mdtraj.Topology or openmm.app.Topology or numpy.ndarray
        A topology or its :func:`bond_array`: the bonds tell a proper torsion (``t``
        bonded to ``k`` in ``i-j-k-t``) from an improper one.
    rotors : iterable of str
        Keys of :data:`ROTOR_BONDS`.

    Returns
    -------
    numpy.ndarray
        Bool ``[n_torsions]``.

    Raises
    ------
    ValueError
        For an unknown rotor name, or a rotor bond that no proper torsion turns.
    """
    bonds = _bond_set(bonds)
    mask = np.zeros(len(torsion_indices), dtype=bool)
    for name in rotors:
        if name not in ROTOR_BONDS:
            raise ValueError(f"unknown rotor {name!r}; known: {', '.join(ROTOR_BONDS)}")
        axis = frozenset(ROTOR_BONDS[name])
        rows = [
            r for r, (_, j, k, t) in enumerate(np.asarray(torsion_indices).tolist())
            if frozenset((j, k)) == axis and frozenset((k, t)) in bonds
        ]
        if not rows:
            raise ValueError(f"no proper torsion of the z-matrix turns the {name} bond {ROTOR_BONDS[name]}")
        mask[rows[0]] = True
    return mask


@dataclass(frozen=True)
class PhysicalInputs:
    """What :func:`physical_generator` needs of alanine dipeptide, as plain arrays.

    Attributes
    ----------
    z_matrix : numpy.ndarray
        ``[n_atoms, 4]`` int64, the global z-matrix (:func:`global_z_matrix`).
    bonds : numpy.ndarray
        ``[n_bonds, 2]`` int64, :func:`bond_array` of the topology (for :func:`rotor_rows`).
    minimum : numpy.ndarray
        ``[n_atoms, 3]`` float64 nm, the structure the flow is centred on
        (:func:`minimized_positions`).
    """

    z_matrix: np.ndarray
    bonds: np.ndarray
    minimum: np.ndarray

    def __post_init__(self):
        for name, dtype, width in (("z_matrix", np.int64, 4), ("bonds", np.int64, 2), ("minimum", np.float64, 3)):
            value = np.array(getattr(self, name), dtype=dtype, copy=True)
            if value.ndim != 2 or value.shape[1] != width:
                raise ValueError(f"{name} must have shape [n, {width}], got {value.shape}")
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, system) -> "PhysicalInputs":
        """Computed from an :class:`~bgflow_gate.systems.alanine.AlanineDipeptide` (needs OpenMM)."""
        return cls(global_z_matrix(system.topology), bond_array(system.topology), minimized_positions(system))


def physical_inputs(system, z_matrix: np.ndarray | None = None, positions: np.ndarray | None = None) -> PhysicalInputs:
    """The inputs of :func:`physical_generator` for ``system``, the given ones in place of its own.

    Parameters
    ----------
    system : AlanineDipeptide or SystemSnapshot or PhysicalInputs
        An ``AlanineDipeptide`` computes them from its topology and OpenMM system (the
        minimum only where ``positions`` is not given); a ``SystemSnapshot`` holds them
        (its ``physical``), computed so where OpenMM is installed.
    z_matrix : numpy.ndarray, optional
        A global z-matrix in place of the system's.
    positions : numpy.ndarray, optional
        ``[n_atoms, 3]`` nm in place of the system's minimum.

    Returns
    -------
    PhysicalInputs
    """
    given = {k: v for k, v in (("z_matrix", z_matrix), ("minimum", positions)) if v is not None}
    stored = system if isinstance(system, PhysicalInputs) else getattr(system, "physical", None)
    if stored is not None:
        return replace(stored, **given) if given else stored
    topology = system.topology
    z = given["z_matrix"] if "z_matrix" in given else global_z_matrix(topology)
    minimum = given["minimum"] if "minimum" in given else minimized_positions(system)
    return PhysicalInputs(z, bond_array(topology), minimum)


class TorsionLayout(bg.Flow):
    """``(bonds, angles, rotors, other torsions)`` -> the inputs of the global IC transform's inverse.

    Forward, the rotor and non-rotor torsions (turns) are merged into the z-matrix's torsion
    order and a constant pose is added (the first atom at the origin, a fixed orientation).
    Inverse, the torsions are split again and every non-rotor torsion is unwrapped to
    within half a turn of its mean, where the flow's normal density lives. ``dlogp`` is 0:
    the generator's density is one on shape space, the pose carries no volume.

    Parameters
    ----------
    rotor_mask : numpy.ndarray
        Bool ``[n_torsions]``, see :func:`rotor_rows`.
    other_mean : torch.Tensor
        ``[n_torsions - n_rotors]``: the non-rotor torsions' means in turns.
    """

    #: The constant orientation (normalised Euler angles alpha, cos beta, gamma).
    ORIENTATION = (0.5, 0.0, 0.5)

    def __init__(self, rotor_mask: np.ndarray, other_mean: torch.Tensor):
        super().__init__()
        mask = torch.as_tensor(np.asarray(rotor_mask, dtype=bool))
        if other_mean.shape != (int((~mask).sum()),):
            raise ValueError(f"other_mean must have shape [{int((~mask).sum())}] (the non-rotor torsions)")
        self.register_buffer("rotor_index", torch.nonzero(mask).view(-1))
        self.register_buffer("other_index", torch.nonzero(~mask).view(-1))
        self.register_buffer("other_mean", other_mean.detach().clone())

    def _forward(self, bonds, angles, rotors, others, **kwargs):
        n = bonds.shape[0]
        torsions = bonds.new_empty(n, len(self.rotor_index) + len(self.other_index))
        torsions = torsions.index_copy(1, self.rotor_index, rotors).index_copy(1, self.other_index, others)
        x0 = bonds.new_zeros(n, 1, 3)
        orientation = bonds.new_tensor(self.ORIENTATION).expand(n, 3)
        return bonds, angles, torsions, x0, orientation, bonds.new_zeros(n, 1)

    def _inverse(self, bonds, angles, torsions, x0, orientation, **kwargs):
        rotors = torsions.index_select(1, self.rotor_index)
        others = torsions.index_select(1, self.other_index)
        others = self.other_mean + torch.remainder(others - self.other_mean + 0.5, 1.0) - 0.5
        return bonds, angles, rotors, others, bonds.new_zeros(bonds.shape[0], 1)


def _physical_scale(ic, positions: np.ndarray, mask: np.ndarray, spreads: Spreads):
    """Mean and spread of ``[bonds, angles, non-rotor torsions]`` in the IC transform's
    (normalised) units, the mean from the structure ``positions``."""
    x = torch.as_tensor(positions, dtype=torch.float64).reshape(1, -1)
    with torch.no_grad():
        bonds, angles, torsions, *_ = ic(x)
    others = torsions[0, torch.as_tensor(~mask)]
    mean = torch.cat([bonds[0], angles[0], others])
    std = torch.cat([
        torch.full_like(bonds[0], spreads.bond),
        torch.full_like(angles[0], spreads.angle / math.pi),  # angles in units of pi
        torch.full_like(others, spreads.torsion / (2 * math.pi)),  # torsions in turns
    ])
    return mean, std, others


def physical_generator(
    system, target, rotors: Iterable[str] = ALL_ROTORS, z_matrix: np.ndarray | None = None,
    positions: np.ndarray | None = None, spreads: Spreads = Spreads(), n_torsion_layers: int = 4,
    n_rest_layers: int = 4, hidden: int = 128, n_bins: int = 8, dtype: torch.dtype = torch.float32,
    rest_spline_bins: int = 0,
):
    """A Boltzmann generator for alanine dipeptide that needs no MD data.

    Parameters
    ----------
    system : AlanineDipeptide or SystemSnapshot or PhysicalInputs
        Gives the z-matrix, the bonds (proper torsions) and the minimum
        (:func:`physical_inputs`); from a ``SystemSnapshot`` no OpenMM is needed, and the
        generator is the same as from the system it was written of.
    target : Energy
        The generator's target energy (e.g. ``system.energy()``, in kT).
    rotors : iterable of str
        Keys of :data:`ROTOR_BONDS` whose torsion starts uniform.
    z_matrix : numpy.ndarray, optional
        A global z-matrix; default the system's (:func:`global_z_matrix` of the topology).
    positions : numpy.ndarray, optional
        ``[n_atoms, 3]`` nm, the structure the flow is centred on; default the system's
        minimum (:func:`minimized_positions`).
    spreads : Spreads
        The untrained flow's spreads.
    n_torsion_layers, n_rest_layers, hidden, n_bins, rest_spline_bins
        See :class:`~bgflow_gate.systems.generators.ICSplineFlow`.
    dtype : torch.dtype
        Of the flow's parameters and samples.

    Returns
    -------
    BoltzmannGenerator
        Normal prior, the flow, the inverse of bgflow's
        ``GlobalInternalCoordinateTransformation``; samples are Cartesian (nm).
    """
    inputs = physical_inputs(system, z_matrix=z_matrix, positions=positions)
    ic = bg.GlobalInternalCoordinateTransformation(inputs.z_matrix, normalize_angles=True)
    mask = rotor_rows(ic.torsion_indices, inputs.bonds, rotors)
    mean, std, other_mean = _physical_scale(ic, inputs.minimum, mask, spreads)
    sizes = (ic.dim_bonds, ic.dim_angles, int(mask.sum()), int((~mask).sum()))
    flow = ICSplineFlow(sizes, mean, std, n_torsion_layers=n_torsion_layers, n_rest_layers=n_rest_layers,
                        hidden=hidden, n_bins=n_bins, rest_spline_bins=rest_spline_bins)
    flow = bg.SequentialFlow([flow, TorsionLayout(mask, other_mean), bg.InverseFlow(ic)]).to(dtype)
    prior = bg.NormalDistribution(sum(sizes), mean=torch.zeros(sum(sizes), dtype=dtype))
    return bg.BoltzmannGenerator(prior, flow, target)
