"""The host's internal-coordinate transforms (``bgflow_gate.host.ic``).

``forward`` maps xyz -> (bonds, angles, torsions, ...), as in bgflow.  The mixed
transform drops exactly the six rigid-motion degrees of freedom, so round trips keep every
interatomic distance whatever the pose of the input, and its ``dlogp`` is the exact
log-det on shape space (autograd Jacobian plus the orbit factor ``log(r_ab^2 c_y)``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from bgflow_gate.host.flows import InverseFlow
from bgflow_gate.host.ic import (
    GlobalInternalCoordinateTransformation,
    MixedCoordinateTransformation,
    bond_angles,
    place_atoms,
    torsion_angles,
)
from molecules import alanine_openmm
from bgflow_gate.systems.zmatrix import z_matrix_from_topology

ALANINE_BLOCK = [6, 8, 9, 10, 14]

# a small branched molecule (8 atoms): block [0, 1, 2, 3], four atoms by z-matrix
SMALL_FIXED = [0, 1, 2, 3]
SMALL_Z = [[4, 3, 2, 1], [5, 2, 1, 0], [6, 5, 2, 1], [7, 1, 0, 2]]
SMALL_GLOBAL_Z = [
    [0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0],
    [4, 3, 2, 1], [5, 2, 1, 0], [6, 5, 2, 1], [7, 1, 0, 2],
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` uniformly random proper rotation matrices, float64."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.det(q) < 0, :, 0] *= -1.0
    return q


def random_rigid_motion(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate and translate each frame of ``x`` ([n, 3N]) randomly."""
    n = x.shape[0]
    xyz = x.reshape(n, -1, 3)
    rot = random_rotations(n, generator).to(x)
    shift = 5.0 * torch.randn(n, 1, 3, generator=generator, dtype=torch.float64).to(x)
    return (torch.einsum("nij,naj->nai", rot, xyz) + shift).reshape(n, -1)


def distances(x: torch.Tensor) -> torch.Tensor:
    xyz = x.reshape(x.shape[0], -1, 3)
    return torch.cdist(xyz, xyz)


def small_frames(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    base = 0.15 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    frames = base + 0.01 * torch.randn(n, 8, 3, generator=g, dtype=torch.float64)
    return frames.reshape(n, -1).to(dtype)


def small_mixed(**kwargs) -> MixedCoordinateTransformation:
    return MixedCoordinateTransformation(small_frames(64), SMALL_Z, SMALL_FIXED, **kwargs)


def ic_inputs(outputs):
    """Drop dlogp from a forward's outputs."""
    return tuple(outputs[:-1])


def inverse_log_det_on_shape_space(transform, ic_values):
    """log|det| of the square Jacobian of (ICs of one frame) -> the 3N-6 canonical
    coordinates that are not identically zero, plus log(r_ab^2 c_y)."""
    sizes = [t.shape[-1] for t in ic_values]
    flat = torch.cat([t[:1] for t in ic_values], dim=-1)[0]
    n_atoms = transform.n_atoms
    frame = transform.frame_atoms
    keep = torch.ones(n_atoms, 3, dtype=torch.bool)
    keep[frame[0]] = False
    keep[frame[1], 1:] = False
    keep[frame[2], 2] = False

    def canonical(v):
        parts = torch.split(v[None], sizes, dim=-1)
        x, _ = transform(*parts, inverse=True)
        return x.reshape(n_atoms, 3)[keep]

    jac = torch.autograd.functional.jacobian(canonical, flat)
    assert jac.shape == (3 * n_atoms - 6, 3 * n_atoms - 6)
    xyz, _ = transform(*[t[:1] for t in ic_values], inverse=True)
    xyz = xyz.reshape(n_atoms, 3)
    orbit = math.log(xyz[frame[1], 0].item() ** 2 * xyz[frame[2], 1].item())
    return torch.linalg.slogdet(jac)[1].item() + orbit


@pytest.fixture(scope="module")
def alanine():
    """Alanine dipeptide (vacuum, no constraints): openmm topology and positions (nm)."""
    return alanine_openmm()


def alanine_frames(positions: np.ndarray, n: int, seed: int, noise: float = 0.005) -> torch.Tensor:
    """Perturbed (``noise`` nm), randomly rotated and translated alanine frames [n, 66]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.as_tensor(positions, dtype=torch.float64)
    frames = base + noise * torch.randn(n, *base.shape, generator=g, dtype=torch.float64)
    return random_rigid_motion(frames.reshape(n, -1), g)


@pytest.fixture(scope="module")
def alanine_mixed(alanine):
    topology, positions = alanine
    z = z_matrix_from_topology(topology, fixed_atoms=ALANINE_BLOCK)
    data = alanine_frames(positions, 200, seed=1)
    return MixedCoordinateTransformation(data, z, ALANINE_BLOCK)


# --------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------


def test_place_atoms_inverts_bond_angle_and_torsion():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(4, 50, 3, generator=g, dtype=torch.float64)
    bonds = torch.linalg.vector_norm(p[0] - p[1], dim=-1)
    angles = bond_angles(p[0], p[1], p[2])
    torsions = torsion_angles(p[0], p[1], p[2], p[3])
    placed = place_atoms(p[1], p[2], p[3], bonds, angles, torsions)
    assert torch.allclose(placed, p[0], atol=1e-12)


def test_ics_agree_with_mdtraj_conventions():
    md = pytest.importorskip("mdtraj")
    x = small_frames(5)
    ic = small_mixed(normalize_angles=False)
    bonds, angles, torsions, _, _ = ic(x)
    traj = md.Trajectory(x.numpy().reshape(5, 8, 3), None)
    z = np.asarray(SMALL_Z)
    np.testing.assert_allclose(bonds.numpy(), md.compute_distances(traj, z[:, :2]), atol=1e-6)
    np.testing.assert_allclose(angles.numpy(), md.compute_angles(traj, z[:, :3]), atol=1e-5)
    np.testing.assert_allclose(torsions.numpy(), md.compute_dihedrals(traj, z), atol=1e-5)


# --------------------------------------------------------------------------------------
# mixed transform
# --------------------------------------------------------------------------------------


def test_mixed_round_trip_preserves_every_distance_of_randomly_posed_alanine_frames(alanine, alanine_mixed):
    x = alanine_frames(alanine[1], 32, seed=2)
    *ics, _ = alanine_mixed(x)
    x_back, _ = alanine_mixed(*ics, inverse=True)
    assert x_back.shape == x.shape
    assert (distances(x_back) - distances(x)).abs().max().item() < 1e-8


def test_mixed_round_trip_preserves_distances_of_a_small_molecule_in_any_pose():
    ic = small_mixed()
    g = torch.Generator().manual_seed(5)
    x = random_rigid_motion(small_frames(16, seed=9), g)
    x_back, _ = ic(*ic_inputs(ic(x)), inverse=True)
    assert (distances(x_back) - distances(x)).abs().max().item() < 1e-10


def test_mixed_outputs_do_not_depend_on_the_pose_of_the_input(alanine, alanine_mixed):
    x = alanine_frames(alanine[1], 8, seed=3)
    moved = random_rigid_motion(x, torch.Generator().manual_seed(4))
    for a, b in zip(alanine_mixed(x), alanine_mixed(moved)):
        assert torch.allclose(a, b, atol=1e-9)


def test_mixed_inverse_builds_the_block_in_the_canonical_frame(alanine, alanine_mixed):
    x = alanine_frames(alanine[1], 8, seed=5)
    x_back, _ = alanine_mixed(*ic_inputs(alanine_mixed(x)), inverse=True)
    xyz = x_back.reshape(8, -1, 3)
    a, b, c = alanine_mixed.frame_atoms
    assert alanine_mixed.frame_atoms.tolist() == ALANINE_BLOCK[:3]
    assert xyz[:, a].abs().max().item() == 0.0
    assert xyz[:, b, 1:].abs().max().item() == 0.0 and bool(torch.all(xyz[:, b, 0] > 0))
    assert xyz[:, c, 2].abs().max().item() == 0.0 and bool(torch.all(xyz[:, c, 1] > 0))
    # the canonical frame is the pose the forward sees: a second round trip is the identity
    x_again, _ = alanine_mixed(*ic_inputs(alanine_mixed(x_back)), inverse=True)
    assert torch.allclose(x_again, x_back, atol=1e-12)


def test_mixed_dlogp_equals_autograd_log_det_plus_orbit_factor_small_molecule():
    ic = small_mixed()
    x = small_frames(3, seed=11)
    *ics, dlogp_fwd = ic(x)
    _, dlogp_inv = ic(*ics, inverse=True)
    expected = inverse_log_det_on_shape_space(ic, ics)
    assert dlogp_inv[0, 0].item() == pytest.approx(expected, abs=1e-9)
    assert dlogp_fwd[0, 0].item() == pytest.approx(-expected, abs=1e-9)


def test_mixed_dlogp_equals_autograd_log_det_plus_orbit_factor_alanine(alanine, alanine_mixed):
    x = alanine_frames(alanine[1], 2, seed=6)
    *ics, dlogp_fwd = alanine_mixed(x)
    expected = inverse_log_det_on_shape_space(alanine_mixed, ics)
    assert dlogp_fwd[0, 0].item() == pytest.approx(-expected, abs=1e-8)


def test_mixed_dlogp_without_angle_normalization_is_exact_too():
    ic = small_mixed(normalize_angles=False)
    *ics, dlogp_fwd = ic(small_frames(2, seed=12))
    assert dlogp_fwd[0, 0].item() == pytest.approx(-inverse_log_det_on_shape_space(ic, ics), abs=1e-9)


def test_mixed_forward_and_inverse_dlogp_sum_to_zero(alanine, alanine_mixed):
    x = alanine_frames(alanine[1], 16, seed=7)
    *ics, dlogp_fwd = alanine_mixed(x)
    _, dlogp_inv = alanine_mixed(*ics, inverse=True)
    assert dlogp_fwd.shape == (16, 1) and dlogp_inv.shape == (16, 1)
    assert (dlogp_fwd + dlogp_inv).abs().max().item() < 1e-10


def test_mixed_normalization_adds_log_pi_and_log_2pi_per_row():
    x = small_frames(4, seed=13)
    normalized = small_mixed()(x)[-1]
    raw = small_mixed(normalize_angles=False)(x)[-1]
    expected = -len(SMALL_Z) * (math.log(math.pi) + math.log(2 * math.pi))
    assert torch.allclose(normalized - raw, torch.full_like(raw, expected), atol=1e-12)


def test_mixed_dlogp_is_the_placed_atoms_jacobian_plus_the_block_log_volume():
    ic = small_mixed(normalize_angles=False)
    x = small_frames(4, seed=14)
    bonds, angles, _, _, dlogp = ic(x)
    spherical = (2 * torch.log(bonds) + torch.log(torch.sin(angles))).sum(dim=-1, keepdim=True)
    assert ic.block_log_volume(x).shape == (4, 1)
    assert (dlogp + spherical + ic.block_log_volume(x)).abs().max().item() < 1e-10


def test_mixed_whitened_block_coordinates_of_the_data_have_zero_mean_and_unit_covariance():
    data = small_frames(64)
    ic = MixedCoordinateTransformation(data, SMALL_Z, SMALL_FIXED)
    z_fixed = ic(data)[3]
    assert z_fixed.shape == (64, 6)
    assert z_fixed.mean(dim=0).abs().max().item() < 1e-10
    cov = torch.cov(z_fixed.T)
    assert (cov - torch.eye(6, dtype=cov.dtype)).abs().max().item() < 1e-10


def test_mixed_whitening_does_not_depend_on_the_poses_of_the_data():
    data = small_frames(64)
    moved = random_rigid_motion(data, torch.Generator().manual_seed(8))
    x = small_frames(4, seed=14)
    a = MixedCoordinateTransformation(data, SMALL_Z, SMALL_FIXED)(x)
    b = MixedCoordinateTransformation(moved, SMALL_Z, SMALL_FIXED)(x)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-8)


def test_mixed_keepdims_sets_dim_fixed_and_projects_the_block():
    ic = small_mixed(keepdims=4)
    assert ic.dim_fixed == 4
    x = small_frames(5, seed=15)
    *ics, dlogp = ic(x)
    assert ics[3].shape == (5, 4)
    x_back, dlogp_back = ic(*ics, inverse=True)
    assert x_back.shape == x.shape
    # the inverse is exact on the projected configurations: they map to the same outputs
    *ics_again, dlogp_again = ic(x_back)
    for a, b in zip(ics, ics_again):
        assert torch.allclose(a, b, atol=1e-10)
    assert (dlogp_again + dlogp_back).abs().max().item() < 1e-10
    # the projection loses the two smallest principal components: close, not exact
    err = (distances(x_back) - distances(x)).abs().max().item()
    assert 1e-12 < err < 0.05


@pytest.mark.parametrize("normalize", [True, False])
def test_mixed_angles_and_torsions_stay_in_their_domains(normalize):
    g = torch.Generator().manual_seed(16)
    x = 0.15 * torch.randn(500, 8, 3, generator=g, dtype=torch.float64)
    # a planar frame: all torsions are exactly 0 or pi
    x[0, :, 2] = 0.0
    x = x.reshape(500, -1)
    ic = MixedCoordinateTransformation(x, SMALL_Z, SMALL_FIXED, normalize_angles=normalize)
    _, angles, torsions, _, _ = ic(x)
    upper_angle, low_t, high_t = (1.0, 0.0, 1.0) if normalize else (math.pi, -math.pi, math.pi)
    assert angles.min().item() >= 0.0 and angles.max().item() <= upper_angle
    assert torsions.min().item() >= low_t and torsions.max().item() < high_t
    # torsions cover the whole circle
    assert torsions.min().item() < low_t + 0.01 * (high_t - low_t)
    assert torsions.max().item() > high_t - 0.01 * (high_t - low_t)


def test_mixed_works_in_float32(alanine):
    topology, positions = alanine
    z = z_matrix_from_topology(topology, fixed_atoms=ALANINE_BLOCK)
    data = alanine_frames(positions, 200, seed=1).float()
    ic = MixedCoordinateTransformation(data, z, ALANINE_BLOCK)
    x = alanine_frames(positions, 16, seed=17).float()
    *ics, dlogp = ic(x)
    assert all(t.dtype == torch.float32 for t in (*ics, dlogp))
    x_back, dlogp_back = ic(*ics, inverse=True)
    assert x_back.dtype == torch.float32
    assert (distances(x_back) - distances(x)).abs().max().item() < 1e-4
    assert (dlogp + dlogp_back).abs().max().item() < 1e-3
    ic64 = MixedCoordinateTransformation(data.double(), z, ALANINE_BLOCK)
    assert torch.allclose(dlogp.double(), ic64(x.double())[-1], atol=1e-3)


def test_mixed_attributes_follow_bgflow():
    ic = small_mixed()
    assert ic.dim_bonds == ic.dim_angles == ic.dim_torsions == len(SMALL_Z)
    assert ic.dim_fixed == 3 * len(SMALL_FIXED) - 6
    np.testing.assert_array_equal(ic.z_matrix, SMALL_Z)
    np.testing.assert_array_equal(ic.fixed_atoms, SMALL_FIXED)
    np.testing.assert_array_equal(ic.bond_indices, np.asarray(SMALL_Z)[:, :2])
    np.testing.assert_array_equal(ic.angle_indices, np.asarray(SMALL_Z)[:, :3])
    np.testing.assert_array_equal(ic.torsion_indices, np.asarray(SMALL_Z))
    assert ic.normalize_angles is True


def test_mixed_output_order_is_bonds_angles_torsions_fixed_dlogp():
    ic = small_mixed(normalize_angles=False)
    x = small_frames(3, seed=18)
    bonds, angles, torsions, z_fixed, dlogp = ic(x)
    xyz = x.reshape(3, 8, 3)
    z = np.asarray(SMALL_Z)
    assert torch.allclose(bonds, torch.linalg.vector_norm(xyz[:, z[:, 0]] - xyz[:, z[:, 1]], dim=-1))
    assert torch.allclose(angles, bond_angles(xyz[:, z[:, 0]], xyz[:, z[:, 1]], xyz[:, z[:, 2]]))
    assert (z_fixed.shape, dlogp.shape) == ((3, 6), (3, 1))


def test_mixed_ics_to_xyz_direction_composes_with_the_host_inverse_flow():
    ic = small_mixed()
    x = small_frames(4, seed=19)
    ics = ic_inputs(ic(x))
    x_back, dlogp = InverseFlow(ic)(*ics)
    assert torch.allclose(distances(x_back), distances(x), atol=1e-10)
    assert torch.allclose(dlogp, ic(*ics, inverse=True)[1])


def test_mixed_row_order_of_the_z_matrix_does_not_matter_for_reconstruction():
    shuffled = [SMALL_Z[k] for k in (3, 2, 1, 0)]  # row 1 references atom 5, placed by row 2
    ic = MixedCoordinateTransformation(small_frames(64), shuffled, SMALL_FIXED)
    x = small_frames(4, seed=20)
    x_back, _ = ic(*ic_inputs(ic(x)), inverse=True)
    assert torch.allclose(distances(x_back), distances(x), atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fixed_atoms=[0, 1]), "at least 3 atoms"),
        (dict(fixed_atoms=[0, 1, 1, 3]), "distinct"),
        (dict(z_matrix=[[4, 3, 2, 1], [5, 2, 1, 0], [6, 5, 2, 1], [3, 1, 0, 2]]), r"atom 3 is placed twice \(also by fixed_atoms\)"),
        (dict(z_matrix=[[4, 3, 2, 1], [5, 2, 1, 0], [6, 5, 2, 1], [6, 1, 0, 2]]), r"atom 6 is placed twice \(also by row 2\)"),
        (dict(z_matrix=[[4, 3, 2, 1], [5, 2, 1, 0], [6, 5, 2, 2], [7, 1, 0, 2]]), "distinct"),
        (dict(z_matrix=[[4, 3, 2, 1], [5, 2, 1, 0], [6, 5, 2, 1], [7, 1, 0, 9]]), r"\[0, 8\)"),
        (dict(z_matrix=[[4, 3, 2, 1], [5, 6, 1, 0], [6, 5, 2, 1], [7, 1, 0, 2]]), "never placed"),
        (dict(z_matrix=[[4, 3, 2, 1], [5, 2, 1, 0], [6, 5, 2, 1]]), r"data must have shape \[n_frames, 21\]"),
        (dict(keepdims=7), "keepdims"),
        (dict(keepdims=0), "keepdims"),
        (dict(data=small_frames(6)), "at least 7"),
        (dict(fixed_atoms=[0, 1, 7, 3], z_matrix=[[4, 3, 1, 0], [5, 1, 0, 3], [6, 5, 1, 0], [2, 1, 0, 3]],
              data=small_frames(64).reshape(64, 8, 3)[:, [0, 1, 0, 3, 4, 5, 6, 1]].reshape(64, -1)
              + 1e-6 * small_frames(64, seed=1)), "collinear"),
    ],
)
def test_mixed_rejects_invalid_setups_with_clear_errors(kwargs, message):
    args = dict(data=small_frames(64), z_matrix=SMALL_Z, fixed_atoms=SMALL_FIXED)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MixedCoordinateTransformation(**args)


def test_mixed_rejects_inputs_of_the_wrong_width():
    ic = small_mixed()
    with pytest.raises(ValueError, match=r"\[batch, 24\]"):
        ic(torch.zeros(2, 21, dtype=torch.float64))
    bonds, angles, torsions, z_fixed, _ = ic(small_frames(2))
    with pytest.raises(ValueError, match="z_fixed"):
        ic(bonds, angles, torsions, z_fixed[:, :5], inverse=True)
    with pytest.raises(ValueError, match="torsions"):
        ic(bonds, angles, torsions[:, :3], z_fixed, inverse=True)


def test_mixed_warns_on_a_straight_angle_and_stays_finite():
    ic = small_mixed()
    x = small_frames(1).reshape(1, 8, 3)
    x[0, 6] = 2 * x[0, 5] - x[0, 2]  # angle 6-5-2 is exactly pi: torsion of row 2 undefined
    with pytest.warns(UserWarning, match="near-singular"):
        outputs = ic(x.reshape(1, -1))
    assert all(bool(torch.isfinite(t).all()) for t in outputs)
    quiet = small_mixed(raise_warnings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(x.reshape(1, -1))


def test_mixed_forward_has_finite_gradients_for_training_by_example():
    ic = small_mixed()
    x = small_frames(4, seed=32).requires_grad_(True)
    sum(t.sum() for t in ic(x)).backward()
    assert bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum().item() > 0


# --------------------------------------------------------------------------------------
# global transform
# --------------------------------------------------------------------------------------


def test_global_round_trip_recovers_coordinates_including_the_pose():
    ic = GlobalInternalCoordinateTransformation(SMALL_GLOBAL_Z)
    x = random_rigid_motion(small_frames(16, seed=21), torch.Generator().manual_seed(22))
    *ics, dlogp = ic(x)
    x_back, dlogp_back = ic(*ics, inverse=True)
    assert (x_back - x).abs().max().item() < 1e-12
    assert (dlogp + dlogp_back).abs().max().item() < 1e-12


@pytest.mark.parametrize("normalize", [True, False])
def test_global_dlogp_equals_the_autograd_log_det_of_the_full_jacobian(normalize):
    ic = GlobalInternalCoordinateTransformation(SMALL_GLOBAL_Z, normalize_angles=normalize)
    x = random_rigid_motion(small_frames(2, seed=23), torch.Generator().manual_seed(24))

    def flat_ics(v):
        out = ic(v[None])
        return torch.cat([t.reshape(-1) for t in out[:-1]])

    jac = torch.autograd.functional.jacobian(flat_ics, x[0])
    assert jac.shape == (24, 24)
    assert ic(x)[-1][0, 0].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-9)


def test_global_output_order_and_shapes_follow_bgflow():
    ic = GlobalInternalCoordinateTransformation(SMALL_GLOBAL_Z, normalize_angles=False)
    x = small_frames(3, seed=25)
    bonds, angles, torsions, x0, orientation, dlogp = ic(x)
    assert (bonds.shape, angles.shape, torsions.shape) == ((3, 7), (3, 6), (3, 5))
    assert (x0.shape, orientation.shape, dlogp.shape) == ((3, 1, 3), (3, 3), (3, 1))
    xyz = x.reshape(3, 8, 3)
    assert torch.allclose(x0[:, 0], xyz[:, 0])
    assert torch.allclose(bonds[:, 0], torch.linalg.vector_norm(xyz[:, 1] - xyz[:, 0], dim=-1))
    assert torch.allclose(bonds[:, 1], torch.linalg.vector_norm(xyz[:, 2] - xyz[:, 1], dim=-1))
    assert torch.allclose(angles[:, 0], bond_angles(xyz[:, 2], xyz[:, 1], xyz[:, 0]))
    assert torch.allclose(torsions[:, 0], torsion_angles(xyz[:, 3], xyz[:, 2], xyz[:, 1], xyz[:, 0]))
    # cos(beta) is the z component of the unit vector from atom 0 to atom 1
    e1 = (xyz[:, 1] - xyz[:, 0]) / bonds[:, :1]
    assert torch.allclose(orientation[:, 1], e1[:, 2])
    assert (ic.dim_bonds, ic.dim_angles, ic.dim_torsions, ic.dim_fixed) == (7, 6, 5, 0)
    np.testing.assert_array_equal(ic.bond_indices[:2], [[1, 0], [2, 1]])
    np.testing.assert_array_equal(ic.angle_indices[0], [2, 1, 0])
    np.testing.assert_array_equal(ic.z_matrix, np.asarray(SMALL_GLOBAL_Z)[3:])
    assert ic.fixed_atoms.shape == (0,)


def test_global_orientation_and_ics_stay_in_their_domains():
    g = torch.Generator().manual_seed(26)
    x = 0.15 * torch.randn(400, 24, generator=g, dtype=torch.float64)
    ic = GlobalInternalCoordinateTransformation(SMALL_GLOBAL_Z)
    _, angles, torsions, _, orientation, _ = ic(x)
    assert angles.min().item() >= 0 and angles.max().item() <= 1
    assert torsions.min().item() >= 0 and torsions.max().item() < 1
    alpha, cos_beta, gamma = orientation.unbind(-1)
    for t in (alpha, gamma):
        assert t.min().item() >= 0 and t.max().item() < 1
    assert cos_beta.min().item() >= -1 and cos_beta.max().item() <= 1


def _global_transforms(z):
    """The host's global transform of ``z``, and bgflow's where bgflow is the host."""
    from bgflow_gate import HOST, bg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transforms = [GlobalInternalCoordinateTransformation(z, normalize_angles=False)]
        if HOST == "bgflow":
            transforms.append(bg.GlobalInternalCoordinateTransformation(np.asarray(z), normalize_angles=False))
    return transforms


@pytest.mark.parametrize("third_row", [[2, 1, 0, -1], [2, 0, 1, -1]])
def test_global_reads_the_first_three_atoms_as_a_chain_as_bgflow(third_row):
    # bgflow reads only which atoms the three rows with -1 place, not their references:
    # bonds d(1, 0), d(2, 1), angle 2-1-0 even for a row [2, 0, 1, -1]
    z = [list(r) for r in SMALL_GLOBAL_Z]
    z[2] = third_row
    x = small_frames(3, seed=27)
    xyz = x.reshape(3, 8, 3)
    outputs = []
    for ic in _global_transforms(z):
        np.testing.assert_array_equal(ic.bond_indices[:2], [[1, 0], [2, 1]])
        np.testing.assert_array_equal(ic.angle_indices[0], [2, 1, 0])
        bonds, angles, *rest = ic(x)
        assert torch.allclose(bonds[:, 1], torch.linalg.vector_norm(xyz[:, 2] - xyz[:, 1], dim=-1))
        assert torch.allclose(angles[:, 0], bond_angles(xyz[:, 2], xyz[:, 1], xyz[:, 0]))
        x_back, _ = ic(bonds, angles, *rest[:-1], inverse=True)
        assert (x_back - x).abs().max().item() < 1e-6
        outputs.append((bonds, angles, rest[0], rest[-1]))
    for other in outputs[1:]:  # bgflow's: the same bonds, angles, torsions and dlogp
        for ours, theirs in zip(outputs[0], other):
            assert (ours - theirs).abs().max().item() < 1e-8


def test_global_warns_that_a_third_row_bonded_to_the_first_atom_is_read_as_a_chain():
    z = [list(r) for r in SMALL_GLOBAL_Z]
    z[2] = [2, 0, 1, -1]
    with pytest.warns(UserWarning, match=r"chain 0-1-2 \(bond 2-1, angle 2-1-0\)"):
        ic = GlobalInternalCoordinateTransformation(z)
    x = small_frames(3, seed=27)
    *ics, dlogp = ic(x)
    x_back, dlogp_back = ic(*ics, inverse=True)
    assert (x_back - x).abs().max().item() < 1e-12
    assert (dlogp + dlogp_back).abs().max().item() < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GlobalInternalCoordinateTransformation(SMALL_GLOBAL_Z)


def test_global_works_on_alanine_with_a_built_z_matrix(alanine):
    topology, positions = alanine
    ic = GlobalInternalCoordinateTransformation(z_matrix_from_topology(topology))
    x = alanine_frames(positions, 8, seed=28)
    x_back, _ = ic(*ic_inputs(ic(x)), inverse=True)
    assert (x_back - x).abs().max().item() < 1e-10
    x32 = x.float()
    x32_back, _ = ic(*ic_inputs(ic(x32)), inverse=True)
    assert (distances(x32_back) - distances(x32)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "z_matrix, message",
    [
        ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, 3], [3, 2, 1, 0]], "exactly one row with 1"),
        ([[0, -1, -1, -1], [1, 2, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]], "bonded to the first"),
        ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 3, -1], [3, 2, 1, 0]], "first two atoms"),
        ([[0, -1, -1, -1], [1, 0, -1, -1], [2, -1, 0, 1], [3, 2, 1, 0]], "exactly one row with 2|trailing"),
        ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 1]], "distinct"),
        ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [2, 1, 0, 3]], r"atom 2 is placed twice \(also by row 2\)"),
        ([[0, -1, -1, -1], [1, 0, -1, -1]], "at least 3 atoms"),
        ([[0, 1, 2], [1, 0, 2]], r"\[n_rows, 4\]"),
    ],
)
def test_global_rejects_invalid_z_matrices(z_matrix, message):
    with pytest.raises(ValueError, match=message):
        GlobalInternalCoordinateTransformation(z_matrix)


# --------------------------------------------------------------------------------------
# against real bgflow (skipped unless it imports)
# --------------------------------------------------------------------------------------


def _import_bgflow():
    try:
        import bgflow  # noqa: F401
    except Exception as error:  # bgflow can fail with errors other than ImportError
        pytest.skip(f"bgflow does not import: {type(error).__name__}: {error}")
    return bgflow


@pytest.mark.bgflow
def test_mixed_bonds_angles_torsions_match_bgflow_on_the_same_frames(request):
    bgflow = _import_bgflow()
    try:
        topology, positions = request.getfixturevalue("alanine")
        z = z_matrix_from_topology(topology, fixed_atoms=ALANINE_BLOCK)
        fixed = np.asarray(ALANINE_BLOCK)
        data = alanine_frames(positions, 200, seed=1)
        x = alanine_frames(positions, 16, seed=29)
    except pytest.skip.Exception:
        z, fixed = np.asarray(SMALL_Z), np.asarray(SMALL_FIXED)
        data, x = small_frames(64), small_frames(16, seed=29)
    host = MixedCoordinateTransformation(data, z, fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = bgflow.MixedCoordinateTransformation(data, z, fixed, keepdims=host.dim_fixed)
        real_out = real(x)
    host_out = host(x)
    for name, a, b in zip(("bonds", "angles", "torsions"), host_out[:3], real_out[:3]):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() < 1e-8, name
    # dlogp differs by the orbit factor and the whitening constants only
    host_ic_part = host_out[-1] + host.block_log_volume(x)
    real_ic_part = real_out[-1] - real._whiten.jacobian_xz
    assert (host_ic_part - real_ic_part).abs().max().item() < 1e-6


@pytest.mark.bgflow
def test_global_matches_bgflow_outputs_dlogp_and_inverse():
    bgflow = _import_bgflow()
    x = random_rigid_motion(small_frames(16, seed=30), torch.Generator().manual_seed(31))
    z = np.asarray(SMALL_GLOBAL_Z)
    host = GlobalInternalCoordinateTransformation(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = bgflow.GlobalInternalCoordinateTransformation(z)
        real_out = real(x)
        host_out = host(x)
        for a, b in zip(host_out, real_out):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() < 1e-8
        real_back, real_dlogp = real(*host_out[:-1], inverse=True)
    host_back, host_dlogp = host(*host_out[:-1], inverse=True)
    assert (host_back - real_back.detach()).abs().max().item() < 1e-6
    assert (host_dlogp - real_dlogp.detach()).abs().max().item() < 1e-8
