"""Z-matrices built from bond graphs (``bgflow_gate.systems.zmatrix``).

Every built z-matrix places each atom once, from atoms placed before it, bonded to its
bond reference, along bonded chains where the graph allows; ``validate_z_matrix`` names
the offending row of an invalid one.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bgflow_gate.host.ic import GlobalInternalCoordinateTransformation, MixedCoordinateTransformation
from molecules import alanine_openmm
from bgflow_gate.systems.zmatrix import build_z_matrix, validate_z_matrix, z_matrix_from_topology

ALANINE_BLOCK = [6, 8, 9, 10, 14]
ALANINE_HYDROGENS = {0, 2, 3, 7, 9, 11, 12, 13, 17, 19, 20, 21}

# 2,3-dimethylpentan-1-ol-like heavy-atom skeleton with shuffled indices:
# 5-0-3-1-7, branches 0-2, 3-6 and 1-4 (atom 4 is the OH oxygen)
BRANCHED_BONDS = [(5, 0), (0, 3), (3, 1), (1, 7), (0, 2), (3, 6), (1, 4)]


@pytest.fixture(scope="module")
def alanine():
    """Alanine dipeptide (vacuum, no constraints): openmm topology and positions (nm)."""
    return alanine_openmm()


def bond_set(bonds):
    return {frozenset(map(int, b)) for b in bonds}


def openmm_bonds(topology):
    return bond_set((b[0].index, b[1].index) for b in topology.bonds())


def chain_kinds(z, bonds):
    """Per row: whether (atom, bond_ref) is bonded, (bond_ref, angle_ref) is bonded and
    the torsion ref is bonded to angle_ref (proper) or to bond_ref (improper)."""
    out = []
    for atom, j, k, m in np.asarray(z):
        proper = frozenset((k, m)) in bonds
        improper = frozenset((j, m)) in bonds
        out.append((frozenset((atom, j)) in bonds, frozenset((j, k)) in bonds, proper or improper))
    return out


# --------------------------------------------------------------------------------------
# alanine dipeptide
# --------------------------------------------------------------------------------------


def test_alanine_relative_z_matrix_is_valid_and_follows_bonded_chains(alanine):
    topology, _ = alanine
    z = z_matrix_from_topology(topology, fixed_atoms=ALANINE_BLOCK)
    assert z.shape == (22 - len(ALANINE_BLOCK), 4) and z.dtype == np.int64
    assert validate_z_matrix(z, 22, ALANINE_BLOCK) is not None
    assert set(z[:, 0]) | set(ALANINE_BLOCK) == set(range(22))
    kinds = chain_kinds(z, openmm_bonds(topology))
    assert all(all(k) for k in kinds), kinds


def test_alanine_z_matrix_uses_no_hydrogen_as_a_reference(alanine):
    topology, _ = alanine
    for fixed in (ALANINE_BLOCK, None):
        z = z_matrix_from_topology(topology, fixed_atoms=fixed)
        refs = {int(r) for r in z[:, 1:].ravel() if r >= 0}
        assert not refs & ALANINE_HYDROGENS


def test_mdtraj_and_openmm_topologies_give_the_same_z_matrix(alanine):
    md = pytest.importorskip("mdtraj")
    topology, _ = alanine
    from_openmm = z_matrix_from_topology(topology, fixed_atoms=ALANINE_BLOCK)
    from_mdtraj = z_matrix_from_topology(md.Topology.from_openmm(topology), fixed_atoms=ALANINE_BLOCK)
    np.testing.assert_array_equal(from_openmm, from_mdtraj)


def test_alanine_global_z_matrix_starts_from_a_central_heavy_atom(alanine):
    topology, _ = alanine
    z = z_matrix_from_topology(topology)
    assert z.shape == (22, 4)
    validate_z_matrix(z, 22)
    np.testing.assert_array_equal((z == -1).sum(axis=1)[:4], [3, 2, 1, 0])
    assert z[0, 0] == 8  # the alpha carbon: every atom within 3 bonds
    assert not (z[:, 1:] == -1)[3:].any()
    kinds = chain_kinds(z[3:], openmm_bonds(topology))
    assert all(all(k) for k in kinds)


def test_alanine_mixed_transform_round_trips_real_configurations_with_the_built_z_matrix(alanine):
    topology, positions = alanine
    z = z_matrix_from_topology(topology, fixed_atoms=ALANINE_BLOCK)
    g = torch.Generator().manual_seed(0)
    base = torch.as_tensor(positions)
    data = (base + 0.005 * torch.randn(100, 22, 3, generator=g, dtype=torch.float64)).reshape(100, -1)
    ic = MixedCoordinateTransformation(data, z, ALANINE_BLOCK)
    x = data[:10]
    *ics, dlogp = ic(x)
    x_back, dlogp_back = ic(*ics, inverse=True)
    d = lambda y: torch.cdist(y.reshape(-1, 22, 3), y.reshape(-1, 22, 3))  # noqa: E731
    assert (d(x_back) - d(x)).abs().max().item() < 1e-10
    assert (dlogp + dlogp_back).abs().max().item() < 1e-10


# --------------------------------------------------------------------------------------
# hand-made bond lists
# --------------------------------------------------------------------------------------


def test_branched_chain_relative_z_matrix_places_atoms_outward_along_bonds():
    z = build_z_matrix(8, BRANCHED_BONDS, fixed_atoms=[0, 3, 1])
    assert z.shape == (5, 4)
    validate_z_matrix(z, 8, [0, 3, 1])
    assert all(all(k) for k in chain_kinds(z, bond_set(BRANCHED_BONDS)))
    # breadth-first: the neighbours of the block (5, 2, 6, 7, 4) in block order
    assert z[:, 0].tolist() == [2, 5, 6, 4, 7]


def test_branched_chain_global_z_matrix_starts_in_the_middle_and_is_valid():
    z = build_z_matrix(8, BRANCHED_BONDS)
    validate_z_matrix(z, 8)
    assert z[0, 0] == 3  # the graph centre
    assert z[:3].tolist() == [[3, -1, -1, -1], [0, 3, -1, -1], [2, 0, 3, -1]]
    assert all(all(k) for k in chain_kinds(z[3:], bond_set(BRANCHED_BONDS)))


def test_heavy_atoms_are_placed_and_used_as_references_before_hydrogens():
    # ethanol: C0-C1-O2, H3 H4 H5 on C0, H6 H7 on C1, H8 on O2
    bonds = [(0, 1), (1, 2), (0, 3), (0, 4), (0, 5), (1, 6), (1, 7), (2, 8)]
    heavy = [True, True, True] + [False] * 6
    z = build_z_matrix(9, bonds, heavy=heavy)
    validate_z_matrix(z, 9)
    assert z[:3, 0].tolist() == [1, 0, 2]
    refs = {int(r) for r in z[:, 1:].ravel() if r >= 0}
    assert refs <= {0, 1, 2}
    # without the heavy flags, a hydrogen may serve as a reference
    z_all = build_z_matrix(9, bonds)
    assert {int(r) for r in z_all[:, 1:].ravel() if r >= 0} - {0, 1, 2}


def test_falls_back_to_distinct_placed_atoms_when_the_bond_ref_has_no_placed_neighbour():
    # methane with a block of three hydrogens: the carbon's bond reference (a hydrogen)
    # has no other placed neighbour, so angle and torsion refs are other placed atoms
    bonds = [(0, 1), (0, 2), (0, 3), (0, 4)]
    z = build_z_matrix(5, bonds, fixed_atoms=[1, 2, 3])
    validate_z_matrix(z, 5, [1, 2, 3])
    assert z.tolist() == [[0, 1, 2, 3], [4, 0, 1, 2]]
    for row in z:
        assert len(set(row.tolist())) == 4


def test_fallback_z_matrix_works_in_the_mixed_transform():
    g = torch.Generator().manual_seed(1)
    tetra = torch.tensor([[0, 0, 0], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    base = 0.109 / 3 ** 0.5 * tetra
    data = (base + 0.005 * torch.randn(50, 5, 3, generator=g, dtype=torch.float64)).reshape(50, -1)
    z = build_z_matrix(5, [(0, 1), (0, 2), (0, 3), (0, 4)], fixed_atoms=[1, 2, 3])
    ic = MixedCoordinateTransformation(data, z, [1, 2, 3])
    x_back, _ = ic(*ic(data[:5])[:-1], inverse=True)
    d = lambda y: torch.cdist(y.reshape(-1, 5, 3), y.reshape(-1, 5, 3))  # noqa: E731
    assert (d(x_back) - d(data[:5])).abs().max().item() < 1e-10


def test_star_graph_global_z_matrix_uses_an_improper_torsion():
    z = build_z_matrix(5, [(0, 1), (0, 2), (0, 3), (0, 4)])
    assert z.tolist() == [[0, -1, -1, -1], [1, 0, -1, -1], [2, 0, 1, -1], [3, 0, 1, 2], [4, 0, 1, 2]]
    ic = GlobalInternalCoordinateTransformation(z)
    x = torch.randn(3, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_back, _ = ic(*ic(x)[:-1], inverse=True)
    assert (x_back - x).abs().max().item() < 1e-10


def test_accepts_bonds_as_arrays_and_returns_validated_int64():
    z = build_z_matrix(4, np.array([[0, 1], [1, 2], [2, 3]]), fixed_atoms=np.array([0, 1, 2]))
    assert z.dtype == np.int64 and z.tolist() == [[3, 2, 1, 0]]
    assert validate_z_matrix([[3.0, 2.0, 1.0, 0.0]], 4, [0, 1, 2]).dtype == np.int64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_atoms=4, bonds=[(0, 1), (2, 3)]), r"atoms \[2, 3\] are not connected"),
        (dict(n_atoms=5, bonds=[(0, 1), (1, 2), (3, 4)], fixed_atoms=[0, 1, 2]), r"atoms \[3, 4\] are not connected"),
        (dict(n_atoms=3, bonds=[(0, 3)]), "out of range"),
        (dict(n_atoms=3, bonds=[(1, 1)]), "to itself"),
        (dict(n_atoms=3, bonds=[(0, 1, 2)]), "pair"),
        (dict(n_atoms=4, bonds=[(0, 1), (1, 2), (2, 3)], fixed_atoms=[0, 1]), "at least 3"),
        (dict(n_atoms=4, bonds=[(0, 1), (1, 2), (2, 3)], fixed_atoms=[0, 1, 1]), "distinct"),
        (dict(n_atoms=4, bonds=[(0, 1), (1, 2), (2, 3)], fixed_atoms=[0, 1, 4]), "out of range"),
        (dict(n_atoms=4, bonds=[(0, 1), (1, 2), (2, 3)], heavy=[True] * 3), "one entry per atom"),
        (dict(n_atoms=0, bonds=[]), "positive integer"),
    ],
)
def test_build_z_matrix_rejects_invalid_graphs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_z_matrix(**kwargs)


def test_z_matrix_from_topology_rejects_other_objects():
    with pytest.raises(TypeError, match="mdtraj.Topology or an openmm.app.Topology"):
        z_matrix_from_topology(object())


# --------------------------------------------------------------------------------------
# validation errors
# --------------------------------------------------------------------------------------

VALID_RELATIVE = [[3, 2, 1, 0], [4, 3, 2, 1], [5, 4, 3, 2]]
VALID_GLOBAL = [[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0], [4, 3, 2, 1]]


def test_valid_z_matrices_pass_validation():
    assert validate_z_matrix(VALID_RELATIVE, 6, [0, 1, 2]).shape == (3, 4)
    assert validate_z_matrix(VALID_GLOBAL, 5).shape == (5, 4)


def test_rows_may_come_in_any_order_that_can_be_placed_as_in_bgflow():
    # row 1 refers to atom 4, which row 2 places: bgflow places the rows in stages
    shuffled = [[3, 2, 1, 0], [5, 4, 3, 2], [4, 3, 2, 1]]
    assert validate_z_matrix(shuffled, 6, [0, 1, 2]).tolist() == shuffled
    reversed_global = VALID_GLOBAL[::-1]
    assert validate_z_matrix(reversed_global, 5).tolist() == reversed_global


def test_the_host_transforms_and_the_builder_share_one_validator():
    from bgflow_gate.host import zmatrix

    assert validate_z_matrix is zmatrix.validate_z_matrix


@pytest.mark.parametrize(
    "z, fixed, message",
    [
        # an atom placed twice: by two rows, or by a row and fixed_atoms
        ([[3, 2, 1, 0], [4, 3, 2, 1], [3, 4, 2, 1]], [0, 1, 2], r"row 2 .*atom 3 is placed twice \(also by row 0\)"),
        ([[3, 2, 1, 0], [4, 3, 2, 1], [2, 4, 3, 1]], [0, 1, 2], r"row 2 .*placed twice \(also by fixed_atoms\)"),
        # rows that can never be placed: they place each other in a cycle
        ([[3, 2, 1, 0], [5, 4, 3, 2], [4, 5, 3, 2]], [0, 1, 2], r"never placed .*cycle.*: row 1 \[5, 4, 3, 2\], row 2"),
        # fewer than 3 fixed atoms
        ([[2, 1, 0, -1], [3, 2, 1, 0], [4, 3, 2, 1], [5, 4, 3, 2]], [0, 1], "fixed_atoms needs at least 3 atoms"),
        # references not distinct
        ([[3, 2, 1, 0], [4, 3, 2, 2], [5, 4, 3, 2]], [0, 1, 2], r"row 1 .*must be distinct"),
        ([[3, 2, 1, 0], [4, 4, 2, 1], [5, 4, 3, 2]], [0, 1, 2], r"row 1 .*must be distinct"),
        # indices out of range
        ([[3, 2, 1, 0], [4, 3, 2, 1], [6, 4, 3, 2]], [0, 1, 2], r"row 2 .*atom index 6 out of range"),
        ([[3, 2, 1, 0], [4, 3, 2, 7], [5, 4, 3, 2]], [0, 1, 2], r"row 1 .*reference 7 out of range"),
        ([[3, 2, 1, -2], [4, 3, 2, 1], [5, 4, 3, 2]], [0, 1, 2], r"row 0 .*reference -2 out of range"),
        ([[-1, 2, 1, 0], [4, 3, 2, 1], [5, 4, 3, 2]], [0, 1, 2], r"row 0 .*atom index -1 out of range"),
        # an atom never placed
        ([[3, 2, 1, 0], [4, 3, 2, 1]], [0, 1, 2], r"atoms \[5\] are never placed"),
        # -1 where references are available, or not trailing
        ([[3, 2, 1, -1], [4, 3, 2, 1], [5, 4, 3, 2]], [0, 1, 2], r"row 0 .*has 2 reference\(s\) but 3 are required"),
        ([[0, -1, -1, -1], [1, 0, -1, -1], [2, -1, 0, -1], [3, 2, 1, 0], [4, 3, 2, 1]], None, r"row 2 .*trailing"),
        ([[0, -1, -1, -1], [1, -1, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0], [4, 3, 2, 1]], None, r"exactly one row with 3 missing reference\(s\) \(-1\); found 2: rows \[0, 1\]"),
        ([[0, -1, -1, -1], [1, 2, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0], [4, 3, 2, 1]], None, r"row 1 .*bonded to the first atom 0"),
        # shape
        ([[3, 2, 1], [4, 3, 2]], [0, 1, 2], r"shape \[n_rows, 4\]"),
        # fixed atoms
        (VALID_RELATIVE, [0, 1, 9], r"fixed_atoms \[9\] out of range"),
        (VALID_RELATIVE, [0, 1, 1], "fixed_atoms must be distinct"),
    ],
)
def test_validate_z_matrix_names_the_offending_row(z, fixed, message):
    n_atoms = 6 if fixed is not None else 5
    with pytest.raises(ValueError, match=message):
        validate_z_matrix(z, n_atoms, fixed)


def test_validate_z_matrix_rejects_non_integer_indices():
    with pytest.raises(ValueError, match="integer"):
        validate_z_matrix([[3.5, 2, 1, 0]], 4, [0, 1, 2])
