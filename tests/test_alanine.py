"""The alanine dipeptide system: offline, unconstrained, phi/psi, energy model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openmmtools")
mdtraj = pytest.importorskip("mdtraj")

from bgflow_gate.systems.alanine import (  # noqa: E402
    PHI_ATOMS,
    PSI_ATOMS,
    RIGID_BLOCK,
    alanine_dipeptide,
    phi_psi,
)


@pytest.fixture(scope="module")
def vacuum():
    return alanine_dipeptide("vacuum")


def test_the_system_has_22_unconstrained_atoms_and_the_documented_atom_order(vacuum):
    assert vacuum.n_atoms == 22 and vacuum.dim == 66
    assert vacuum.system.getNumConstraints() == 0
    names = [vacuum.topology.atom(i).name for i in PHI_ATOMS + PSI_ATOMS[-1:]]
    assert names == ["C", "N", "CA", "C", "N"]
    assert [vacuum.topology.atom(i).name for i in RIGID_BLOCK] == ["N", "CA", "HA", "CB", "C"]


def test_implicit_solvent_adds_a_gb_force(vacuum):
    implicit = alanine_dipeptide("implicit")
    forces = {type(f).__name__ for f in implicit.system.getForces()}
    assert implicit.system.getNumForces() > vacuum.system.getNumForces()
    assert any("GB" in name for name in forces)
    with pytest.raises(ValueError, match="solvent must be one of vacuum, implicit"):
        alanine_dipeptide("water")


def test_phi_psi_match_mdtraj_on_perturbed_frames(vacuum):
    gen = torch.Generator().manual_seed(0)
    x = vacuum.positions_tensor().repeat(16, 1) + 0.05 * torch.randn(16, 66, generator=gen, dtype=torch.float64)
    phi, psi = phi_psi(x)
    traj = mdtraj.Trajectory(x.reshape(16, 22, 3).numpy(), vacuum.topology)
    ref = mdtraj.compute_dihedrals(traj, [PHI_ATOMS, PSI_ATOMS])
    assert np.allclose(phi.numpy(), ref[:, 0], atol=1e-5) and np.allclose(psi.numpy(), ref[:, 1], atol=1e-5)
    assert phi.abs().max() <= np.pi and psi.abs().max() <= np.pi


def test_the_energy_model_is_in_kt_at_the_given_temperature(vacuum):
    e300 = vacuum.energy(temperature=300.0, platform_name="Reference")
    e600 = vacuum.energy(temperature=600.0, platform_name="Reference")
    x = vacuum.positions_tensor()
    assert e300.energy(x).item() == pytest.approx(2 * e600.energy(x).item(), rel=1e-9)
    assert e300.bridge.temperature == 300.0


def test_the_z_matrix_comes_from_the_bond_graph_and_round_trips_unaligned_frames_energy_exactly(vacuum):
    from bgflow_gate.host.ic import MixedCoordinateTransformation
    from bgflow_gate.systems.zmatrix import validate_z_matrix

    z = vacuum.z_matrix
    assert z.shape == (17, 4)
    validate_z_matrix(z, 22, fixed_atoms=RIGID_BLOCK)
    gen = torch.Generator().manual_seed(3)
    n = 32
    x = vacuum.positions_tensor().repeat(n, 1) + 0.005 * torch.randn(n, 66, generator=gen, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))  # random orientations
    x = (x.reshape(n, 22, 3) @ rot + torch.randn(n, 1, 3, generator=gen, dtype=torch.float64)).reshape(n, 66)
    transform = MixedCoordinateTransformation(x, z, vacuum.rigid_block)
    *ics, _ = transform(x)
    back, _ = transform(*ics, inverse=True)
    energy = vacuum.energy(platform_name="Reference")
    assert torch.allclose(energy.energy(back), energy.energy(x), atol=1e-6)  # kT
