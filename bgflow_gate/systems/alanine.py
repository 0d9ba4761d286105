"""Alanine dipeptide: the 22-atom system from openmmtools, offline.

``openmmtools`` ships the input files, so nothing is downloaded. The system is built with
``constraints=None`` (stretched X-H bonds must cost energy for a generator).

Atom order (openmmtools / amber): 0 H1, 1 CH3, 2 H2, 3 H3, 4 C, 5 O, 6 N, 7 H, 8 CA, 9 HA,
10 CB, 11 HB1, 12 HB2, 13 HB3, 14 C, 15 O, 16 N, 17 H, 18 C, 19 H1, 20 H2, 21 H3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "RIGID_BLOCK",
    "PHI_ATOMS",
    "PSI_ATOMS",
    "SOLVENTS",
    "AlanineDipeptide",
    "alanine_dipeptide",
    "dihedral",
    "phi_psi",
    "realnvp_generator",
    "realnvp_blocks",
]

#: The rigid block kept in Cartesian coordinates by the mixed IC transform (N, CA, HA, CB, C).
RIGID_BLOCK = (6, 8, 9, 10, 14)
#: Backbone dihedral phi: C(ACE) - N - CA - C.
PHI_ATOMS = (4, 6, 8, 14)
#: Backbone dihedral psi: N - CA - C - N(NME).
PSI_ATOMS = (6, 8, 14, 16)
#: Solvent models offered.
SOLVENTS = ("vacuum", "implicit")


def dihedral(x: torch.Tensor, atoms) -> torch.Tensor:
    """The dihedral angle (radians, in (-pi, pi]) of four atoms for a batch ``[n, 3 * n_atoms]``."""
    pos = x.reshape(x.shape[0], -1, 3)
    p0, p1, p2, p3 = (pos[:, i] for i in atoms)
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / b1.norm(dim=-1, keepdim=True)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    return torch.atan2((torch.cross(b1n, v, dim=-1) * w).sum(-1), (v * w).sum(-1))


def phi_psi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone dihedrals (phi, psi) in radians for a batch of configurations (nm)."""
    return dihedral(x, PHI_ATOMS), dihedral(x, PSI_ATOMS)


@dataclass
class AlanineDipeptide:
    """The system, its topology and a minimum-energy-ish starting configuration.

    Attributes
    ----------
    solvent : str
        ``"vacuum"`` or ``"implicit"`` (OBC GBSA).
    system : openmm.System
    topology : mdtraj.Topology
    positions : numpy.ndarray
        ``[22, 3]`` in nm, openmmtools' starting configuration.
    """

    solvent: str
    system: Any
    topology: Any
    positions: np.ndarray
    _z_matrix: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def dim(self) -> int:
        return 3 * self.n_atoms

    @property
    def rigid_block(self) -> np.ndarray:
        return np.array(RIGID_BLOCK)

    @property
    def z_matrix(self) -> np.ndarray:
        """A z-matrix for the atoms outside :data:`RIGID_BLOCK`, built from the bond graph."""
        if self._z_matrix is None:
            from .zmatrix import z_matrix_from_topology

            self._z_matrix = z_matrix_from_topology(self.topology, fixed_atoms=RIGID_BLOCK)
        return self._z_matrix

    def integrator(self, temperature: float = 300.0, friction: float = 1.0, timestep: float = 0.001):
        """A Langevin integrator at ``temperature`` K (friction 1/ps, step in ps)."""
        import openmm
        from openmm import unit

        return openmm.LangevinMiddleIntegrator(
            temperature * unit.kelvin, friction / unit.picosecond, timestep * unit.picosecond
        )

    def energy(
        self,
        temperature: float = 300.0,
        platform_name: str = "auto",
        n_workers: int = 1,
        err_handling: str = "warning",
    ):
        """The energy model: an ``OpenMMEnergy`` in kT at ``temperature`` K.

        ``platform_name="auto"`` times the available OpenMM platforms on this system and
        takes the fastest (Reference in vacuum, CPU in implicit solvent, measured).
        """
        from ..host.openmm import OpenMMBridge, OpenMMEnergy

        bridge = OpenMMBridge(
            self.system, self.integrator(temperature), platform_name=platform_name,
            err_handling=err_handling, n_workers=n_workers,
        )
        return OpenMMEnergy(bridge=bridge)

    def positions_tensor(self, dtype=torch.float64) -> torch.Tensor:
        """The starting configuration as ``[1, 66]`` (nm)."""
        return torch.as_tensor(self.positions, dtype=dtype).reshape(1, -1)


def alanine_dipeptide(solvent: str = "vacuum") -> AlanineDipeptide:
    """Build the system (offline) in ``"vacuum"`` or ``"implicit"`` solvent, no constraints."""
    if solvent not in SOLVENTS:
        raise ValueError(f"solvent must be one of {', '.join(SOLVENTS)}, got {solvent!r}")
    import mdtraj
    from openmm import unit
    from openmmtools import testsystems

    factory = testsystems.AlanineDipeptideVacuum if solvent == "vacuum" else testsystems.AlanineDipeptideImplicit
    test_system = factory(constraints=None)
    return AlanineDipeptide(
        solvent=solvent,
        system=test_system.system,
        topology=mdtraj.Topology.from_openmm(test_system.topology),
        positions=np.asarray(test_system.positions.value_in_unit(unit.nanometer)),
    )


def realnvp_blocks(dim: int, n_blocks: int, hidden: int) -> list:
    """``n_blocks`` RealNVP blocks on ``dim`` dimensions (split, affine coupling with two
    hidden SiLU layers of width ``hidden`` for shift and scale, swap, merge), from :mod:`bgflow_gate.bg`."""
    from .. import bg

    half = dim // 2
    layers = []
    for _ in range(n_blocks):
        layers += [
            bg.SplitFlow(half),
            bg.CouplingFlow(bg.AffineTransformer(
                shift_transformation=bg.DenseNet([half, hidden, hidden, dim - half], activation=torch.nn.SiLU()),
                scale_transformation=bg.DenseNet([half, hidden, hidden, dim - half], activation=torch.nn.SiLU()),
            )),
            bg.SwapFlow(),
            bg.InverseFlow(bg.SplitFlow(half)),
        ]
    return layers


def realnvp_generator(
    system: AlanineDipeptide,
    data: torch.Tensor,
    n_blocks: int = 5,
    hidden: int = 128,
    temperature: float = 300.0,
    platform_name: str = "Reference",
):
    """bgflow's alanine dipeptide generator: a normal prior, ``n_blocks`` RealNVP coupling
    blocks on the internal coordinates, the mixed internal-coordinate transform (fitted on
    ``data``) and the OpenMM energy at ``temperature`` as the target (kT).

    Built from :mod:`bgflow_gate.bg`, so it is a real bgflow generator when bgflow imports.

    Returns
    -------
    generator : BoltzmannGenerator
    target : OpenMMEnergy
    """
    from .. import bg

    ic = bg.MixedCoordinateTransformation(
        data=data, z_matrix=system.z_matrix, fixed_atoms=system.rigid_block, normalize_angles=True
    )
    sizes = [ic.dim_bonds, ic.dim_angles, ic.dim_torsions, ic.dim_fixed]
    dim_ics = sum(sizes)
    layers = realnvp_blocks(dim_ics, n_blocks, hidden)
    layers += [bg.SplitFlow(*sizes), bg.InverseFlow(ic)]  # internal coordinates -> Cartesian
    bridge = bg.OpenMMBridge(system.system, system.integrator(temperature), platform_name=platform_name, n_workers=1)
    target = bg.OpenMMEnergy(bridge=bridge)
    return bg.BoltzmannGenerator(bg.NormalDistribution(dim_ics), bg.SequentialFlow(layers), target), target
