"""The physically initialised alanine dipeptide generator (no MD data): z-matrix, rotors,
untrained energies, inverse consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")
pytest.importorskip("openmmtools")
pytest.importorskip("mdtraj")

from bgflow_gate import bg  # noqa: E402
from bgflow_gate.systems.alanine import alanine_dipeptide, phi_psi  # noqa: E402
from bgflow_gate.systems.physical import (  # noqa: E402
    ALL_ROTORS, BACKBONE_ROTORS, CHIRAL_FRAME, PhysicalInputs, Spreads, TorsionLayout, bond_array, global_z_matrix,
    minimized_positions, physical_generator, physical_inputs, reference_siblings, rotor_rows,
)
from bgflow_gate.units import kt_in_kjmol  # noqa: E402

KT = kt_in_kjmol(300.0)
N = 1000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def system():
    return alanine_dipeptide("vacuum")


@pytest.fixture(scope="module")
def minimum(system):
    return minimized_positions(system)


@pytest.fixture(scope="module")
def target(system):
    return system.energy(300.0, platform_name="Reference")


@pytest.fixture(scope="module")
def samples(system, target, minimum):
    torch.manual_seed(0)
    generator = physical_generator(system, target, positions=minimum, hidden=32, dtype=torch.float64)
    with torch.no_grad():
        x = generator.sample(N)
    return x, target.energy(x).view(-1).numpy() * KT


def test_minimised_structure_lies_below_the_starting_structure_in_energy(system, target, minimum):
    start = target.energy(torch.as_tensor(system.positions).reshape(1, -1)).item()
    lowest = target.energy(torch.as_tensor(minimum).reshape(1, -1)).item()
    assert lowest < start - 10.0 / KT


def test_global_z_matrix_starts_from_the_chiral_frame_and_places_ha_cb_against_c(system):
    z = global_z_matrix(system.topology)
    assert z.shape == (22, 4)
    centre, a, b = CHIRAL_FRAME
    # the chain N-CA-C, as bgflow reads its first three atoms
    assert z[:3].tolist() == [[a, -1, -1, -1], [centre, a, -1, -1], [b, centre, a, -1]]
    rows = {int(row[0]): row.tolist() for row in z}
    assert rows[9] == [9, 8, 6, 14] and rows[10] == [10, 8, 6, 14]  # HA, CB: improper against C


def test_siblings_are_referenced_to_the_first_sibling():
    z = np.array([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0], [4, 2, 1, 0], [5, 2, 1, 0]])
    assert reference_siblings(z)[4:].tolist() == [[4, 2, 1, 3], [5, 2, 1, 3]]


def test_one_proper_torsion_per_rotor_bond_is_a_rotor(system):
    ic = bg.GlobalInternalCoordinateTransformation(global_z_matrix(system.topology))
    mask = rotor_rows(ic.torsion_indices, system.topology, ALL_ROTORS)
    assert int(mask.sum()) == 5
    axes = {frozenset(row[1:3]) for row in ic.torsion_indices[mask].tolist()}
    assert axes == {frozenset(p) for p in ([6, 8], [8, 14], [1, 4], [16, 18], [8, 10])}


def test_the_bond_array_tells_the_same_rotors_as_the_topology(system):
    bonds = bond_array(system.topology)
    assert bonds.shape == (21, 2) and bonds.dtype == np.int64 and (bonds[:, 0] < bonds[:, 1]).all()
    ic = bg.GlobalInternalCoordinateTransformation(global_z_matrix(system.topology))
    for rotors in (ALL_ROTORS, BACKBONE_ROTORS):
        mask = rotor_rows(ic.torsion_indices, bonds, rotors)
        assert np.array_equal(mask, rotor_rows(ic.torsion_indices, system.topology, rotors))


def test_physical_inputs_take_what_is_given_and_compute_the_rest(system, minimum):
    start = np.asarray(system.positions, dtype=np.float64)
    inputs = physical_inputs(system, positions=start)  # no minimisation
    assert np.array_equal(inputs.minimum, start) and np.array_equal(inputs.z_matrix, global_z_matrix(system.topology))
    stored = PhysicalInputs(inputs.z_matrix, inputs.bonds, minimum)
    assert physical_inputs(stored) is stored
    assert np.array_equal(physical_inputs(stored, positions=start).minimum, start)
    with pytest.raises(ValueError, match=r"minimum must have shape \[n, 3\]"):
        PhysicalInputs(inputs.z_matrix, inputs.bonds, minimum.reshape(-1))


def test_the_transform_outputs_the_bonds_and_angles_of_the_global_z_matrix(system, minimum):
    # bgflow reads the first three atoms as a chain: with another header the second "bond"
    # was the 1-3 distance N...C and the angle spread stretched CA-C (0.06 nm off)
    z = global_z_matrix(system.topology)
    ic = bg.GlobalInternalCoordinateTransformation(z, normalize_angles=False)
    expected = [[a, b] for a, b, _, _ in z.tolist() if b >= 0]
    assert sorted(map(sorted, ic.bond_indices.tolist())) == sorted(map(sorted, expected))
    assert {frozenset(p) for p in ic.bond_indices.tolist()} == {
        frozenset((bond[0].index, bond[1].index)) for bond in system.topology.bonds
    }
    x = torch.as_tensor(minimum).reshape(1, -1)
    bonds, angles, *_ = ic(x)
    pos = x.reshape(-1, 3)
    i, j = torch.as_tensor(ic.bond_indices).T
    assert torch.allclose(bonds[0], (pos[i] - pos[j]).norm(dim=-1))
    i, j, k = torch.as_tensor(ic.angle_indices).T
    u, v = pos[i] - pos[j], pos[k] - pos[j]
    assert torch.allclose(angles[0], torch.acos((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))))


def test_turning_angles_and_torsions_of_the_minimum_keeps_its_bonds(system, minimum):
    ic = bg.GlobalInternalCoordinateTransformation(global_z_matrix(system.topology))
    bonds, angles, torsions, x0, orientation, _ = ic(torch.as_tensor(minimum).reshape(1, -1))
    g = torch.Generator().manual_seed(3)
    angles = angles + 0.05 * torch.randn(angles.shape, generator=g, dtype=angles.dtype)
    torsions = torch.remainder(torsions + 0.1 * torch.randn(torsions.shape, generator=g, dtype=torsions.dtype), 1.0)
    x, _ = ic(bonds, angles, torsions, x0, orientation, inverse=True)
    pos, ref = x.reshape(-1, 3), torch.as_tensor(minimum)
    pairs = torch.tensor([[b[0].index, b[1].index] for b in system.topology.bonds])
    lengths = (pos[pairs[:, 0]] - pos[pairs[:, 1]]).norm(dim=-1)
    assert (lengths - (ref[pairs[:, 0]] - ref[pairs[:, 1]]).norm(dim=-1)).abs().max().item() < 1e-6


def test_an_unknown_rotor_is_an_error(system):
    ic = bg.GlobalInternalCoordinateTransformation(global_z_matrix(system.topology))
    with pytest.raises(ValueError, match="unknown rotor 'omega'"):
        rotor_rows(ic.torsion_indices, system.topology, ["omega"])


def test_spreads_must_be_positive():
    with pytest.raises(ValueError, match="'bond'"):
        Spreads(bond=0.0)


def test_untrained_samples_are_finite(samples):
    x, energies = samples
    assert bool(torch.isfinite(x).all())
    assert np.isfinite(energies).mean() == 1.0


def test_untrained_median_energy_is_physical(samples):
    # measured: median 408 kJ/mol, 0.6 % above 1e8 (4,000 samples, seed 0, either host)
    _, energies = samples
    assert np.median(energies) < 1000.0
    assert np.mean(energies > 1e8) < 0.02
    assert np.mean(energies < 500.0) > 0.4


def test_untrained_bonds_lie_within_six_spreads_of_the_minimum(system, samples, minimum):
    x, _ = samples
    pos = x.reshape(N, -1, 3)
    ref = torch.as_tensor(minimum)
    pairs = torch.tensor([[b[0].index, b[1].index] for b in system.topology.bonds])
    lengths = (pos[:, pairs[:, 0]] - pos[:, pairs[:, 1]]).norm(dim=-1)
    ref_lengths = (ref[pairs[:, 0]] - ref[pairs[:, 1]]).norm(dim=-1)
    assert (lengths - ref_lengths).abs().max().item() < 6 * Spreads().bond


def test_untrained_phi_is_uniform(samples):
    x, _ = samples
    phi, _ = phi_psi(x)
    quarters = torch.histc(phi, bins=4, min=-math.pi, max=math.pi) / N
    assert (quarters - 0.25).abs().max().item() < 0.05


def test_the_inverse_recovers_the_latent_and_the_log_densities_agree(system, target, minimum):
    torch.manual_seed(1)
    generator = physical_generator(system, target, positions=minimum, hidden=32, dtype=torch.float64)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
        z = generator.prior.sample(64)
        x, dlogp = generator.flow(z)
        z_back, dlogp_back = generator.flow(x, inverse=True)
        neg_log_q = generator.prior.energy(z) + dlogp
    assert (z_back - z).abs().max().item() < 1e-6
    assert (dlogp + dlogp_back).abs().max().item() < 1e-6
    assert (generator.energy(x) - neg_log_q).abs().max().item() < 1e-6


def test_torsion_layout_unwraps_other_torsions_to_within_half_a_turn_of_their_mean():
    layout = TorsionLayout(np.array([True, False]), torch.tensor([0.98], dtype=torch.float64))
    one = torch.zeros(1, 1, dtype=torch.float64)
    torsions = torch.tensor([[0.5, 0.03]], dtype=torch.float64)
    bonds, angles, rotors, others, dlogp = layout(one, one, torsions, one.new_zeros(1, 1, 3), one.new_zeros(1, 3), inverse=True)
    assert rotors.item() == 0.5
    assert others.item() == pytest.approx(1.03)
    assert dlogp.item() == 0.0
