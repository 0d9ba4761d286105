"""Z-matrices built from a molecule's bond graph, for the internal-coordinate transforms.

A z-matrix row ``[atom, bond_ref, angle_ref, torsion_ref]`` places ``atom`` by its
distance to ``bond_ref``, the angle ``atom-bond_ref-angle_ref`` and the dihedral
``atom-bond_ref-angle_ref-torsion_ref`` (bgflow's convention).  Two kinds are built:

* **relative** (``fixed_atoms`` given, at least 3): one row per atom outside the fixed
  block, no ``-1``; for :class:`~bgflow_gate.host.ic.MixedCoordinateTransformation` (or
  bgflow's ``MixedCoordinateTransformation`` / ``RelativeInternalCoordinateTransformation``).
* **global** (``fixed_atoms=None``): one row per atom; the first three rows are
  ``[a, -1, -1, -1]``, ``[b, a, -1, -1]``, ``[c, b, a, -1]`` (``-1`` = missing
  reference); for ``GlobalInternalCoordinateTransformation``.

Rows are ordered so that every reference is placed before it is used (by the fixed block
or an earlier row).  The references are chosen from the graph only; a torsion whose three
reference atoms are collinear (e.g. along an alkyne) is ill-defined and should be avoided by
hand.  :func:`validate_z_matrix` is the host's
(:func:`bgflow_gate.host.zmatrix.validate_z_matrix`), the one rule of the package: like
bgflow it accepts rows in any order that can be placed.

Examples
--------
Isobutane's carbon skeleton (a central carbon 1 bonded to 0, 2 and 3):

>>> build_z_matrix(4, [(0, 1), (1, 2), (1, 3)])
array([[ 1, -1, -1, -1],
       [ 0,  1, -1, -1],
       [ 2,  1,  0, -1],
       [ 3,  1,  0,  2]])
>>> z = build_z_matrix(6, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], fixed_atoms=[1, 2, 3])
>>> z
array([[0, 1, 2, 3],
       [4, 3, 2, 1],
       [5, 4, 3, 2]])
>>> validate_z_matrix(z, 6, fixed_atoms=[1, 2, 3]).shape
(3, 4)
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

import numpy as np

from ..host.zmatrix import as_index_array, check_fixed_atoms, validate_z_matrix

__all__ = ["build_z_matrix", "z_matrix_from_topology", "validate_z_matrix"]


# --------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------


class _Graph:
    """Adjacency and cached graph distances of a bond graph."""

    def __init__(self, n_atoms: int, bonds: Iterable, heavy: np.ndarray):
        self.n = n_atoms
        self.heavy = heavy
        self.neighbors: list[set[int]] = [set() for _ in range(n_atoms)]
        for k, bond in enumerate(bonds):
            pair = as_index_array(bond, "bonds").reshape(-1).tolist()
            if len(pair) != 2:
                raise ValueError(f"bond {k} must be a pair of atom indices, got {bond!r}")
            i, j = pair
            if not (0 <= i < n_atoms and 0 <= j < n_atoms):
                raise ValueError(f"bond {k} ({i}, {j}) has an atom index out of range [0, {n_atoms})")
            if i == j:
                raise ValueError(f"bond {k} ({i}, {j}) bonds an atom to itself")
            self.neighbors[i].add(j)
            self.neighbors[j].add(i)
        self._distances: dict[int, np.ndarray] = {}

    def distances(self, source: int) -> np.ndarray:
        if source not in self._distances:
            dist = np.full(self.n, np.iinfo(np.int64).max, dtype=np.int64)
            dist[source] = 0
            queue = deque([source])
            while queue:
                i = queue.popleft()
                for j in self.neighbors[i]:
                    if dist[j] > dist[i] + 1:
                        dist[j] = dist[i] + 1
                        queue.append(j)
            self._distances[source] = dist
        return self._distances[source]

    def rank(self, atoms: Iterable[int], near: int | None = None) -> list[int]:
        """Sort atoms: closest to ``near`` first (if given), heavy first, then by index."""
        dist = self.distances(near) if near is not None else None
        return sorted(
            atoms,
            key=lambda a: (0 if dist is None else int(dist[a]), not self.heavy[a], a),
        )


def _choose_references(graph: _Graph, atom: int, bond_ref: int, placed: set[int]) -> list[int]:
    """Angle and torsion references for ``atom`` bonded to the placed ``bond_ref``.

    Prefers a bonded chain ``atom-bond_ref-angle_ref-torsion_ref``; then an improper
    torsion reference (another placed neighbour of ``bond_ref``); then any placed atoms,
    closest in the graph first.  The three references are always distinct.
    """
    nb = graph.neighbors
    angle_candidates = graph.rank(n for n in nb[bond_ref] if n in placed and n != atom)
    for angle_ref in angle_candidates:
        chain = graph.rank(n for n in nb[angle_ref] if n in placed and n not in (atom, bond_ref))
        if chain:
            return [angle_ref, chain[0]]
    if angle_candidates:
        angle_ref = angle_candidates[0]
        improper = [n for n in angle_candidates[1:]]
        if improper:
            return [angle_ref, improper[0]]
    else:
        others = [p for p in placed if p not in (atom, bond_ref)]
        angle_ref = graph.rank(others, near=bond_ref)[0]
    others = [p for p in placed if p not in (atom, bond_ref, angle_ref)]
    return [angle_ref, graph.rank(others, near=angle_ref)[0]]


def build_z_matrix(n_atoms: int, bonds: Iterable[Sequence[int]], fixed_atoms: Sequence[int] | None = None,
                   heavy: Sequence[bool] | None = None) -> np.ndarray:
    """Build a z-matrix from a molecule's bond graph.

    Atoms are placed breadth-first outward from the fixed block (or, for a global
    z-matrix, from a central heavy atom), each bonded to its bond reference.  The angle and
    torsion references continue the bonded chain ``atom-bond_ref-angle_ref-torsion_ref``
    where the graph allows; otherwise the torsion reference is another placed neighbour of
    ``bond_ref`` (an improper torsion), and failing that any placed atoms, closest in the
    graph first, always distinct.  Heavy atoms are preferred as references and placed first.

    Parameters
    ----------
    n_atoms : int
        Number of atoms.
    bonds : iterable of (int, int)
        The bonds (pairs of atom indices).  All atoms must be connected to the fixed
        block (or, for a global z-matrix, to each other).
    fixed_atoms : sequence of int, optional
        The block kept Cartesian (at least 3 atoms).  ``None`` builds a global
        z-matrix.
    heavy : sequence of bool, optional
        Per atom, whether it is a heavy (non-hydrogen) atom; default: all heavy.

    Returns
    -------
    np.ndarray
        ``int64`` array of shape ``[n_atoms - len(fixed_atoms), 4]`` (relative) or
        ``[n_atoms, 4]`` (global, first rows with ``-1``), valid by
        :func:`validate_z_matrix`.

    Raises
    ------
    ValueError
        For invalid indices, fewer than 3 fixed atoms, a ``heavy`` of the wrong length, or
        atoms that are not connected by bonds to the fixed block / the rest of the
        molecule.
    """
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, (int, np.integer)) or n_atoms < 1:
        raise ValueError(f"n_atoms must be a positive integer, got {n_atoms!r}")
    n_atoms = int(n_atoms)
    graph = _Graph(n_atoms, bonds, _heavy_flags(heavy, n_atoms))
    if fixed_atoms is not None:
        rows, order = [], check_fixed_atoms(fixed_atoms, n_atoms).tolist()
    else:
        rows, order = _global_initial_rows(graph)
    start = "the fixed atoms" if fixed_atoms is not None else f"atom {order[0]}"
    rows += _rows_outward(graph, order, start)
    z = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return validate_z_matrix(z, n_atoms, fixed_atoms)


def _heavy_flags(heavy: Sequence[bool] | None, n_atoms: int) -> np.ndarray:
    """Per atom, whether it is heavy; all atoms when ``heavy`` is ``None``."""
    if heavy is None:
        return np.ones(n_atoms, dtype=bool)
    heavy_arr = np.asarray(heavy, dtype=bool).reshape(-1)
    if len(heavy_arr) != n_atoms:
        raise ValueError(f"heavy must have one entry per atom ({n_atoms}), got {len(heavy_arr)}")
    return heavy_arr


def _global_initial_rows(graph: _Graph) -> tuple[list[list[int]], list[int]]:
    """The (up to) three rows with ``-1`` of a global z-matrix, and their atoms."""
    order = _initial_atoms(graph)
    a = order[0]
    rows = [[a, -1, -1, -1]]
    if len(order) > 1:
        rows.append([order[1], a, -1, -1])
    if len(order) > 2:
        b, c = order[1], order[2]
        rows.append([c, b, a, -1] if b in graph.neighbors[c] else [c, a, b, -1])
    return rows, order


def _rows_outward(graph: _Graph, start: list[int], name: str) -> list[list[int]]:
    """Rows for every atom, breadth-first along the bonds from the placed atoms ``start``
    (``name`` says what they are); an error names the atoms that cannot be reached."""
    rows = []
    placed = set(start)
    queue = deque(start)
    while queue:
        bond_ref = queue.popleft()
        for atom in graph.rank(n for n in graph.neighbors[bond_ref] if n not in placed):
            rows.append([atom, bond_ref, *_choose_references(graph, atom, bond_ref, placed)])
            placed.add(atom)
            queue.append(atom)
    unreached = sorted(set(range(graph.n)) - placed)
    if unreached:
        raise ValueError(f"atoms {unreached} are not connected by bonds to {name}")
    return rows


def _initial_atoms(graph: _Graph) -> list[int]:
    """First (up to) three atoms of a global z-matrix: a central heavy atom ``a``, a
    neighbour ``b`` of it and a neighbour ``c`` of ``b`` (or of ``a``)."""
    candidates = [i for i in range(graph.n) if graph.heavy[i]] or list(range(graph.n))

    def key(i):
        dist = graph.distances(i)
        reachable = dist[dist < np.iinfo(np.int64).max]
        n_heavy_nb = sum(bool(graph.heavy[j]) for j in graph.neighbors[i])
        return (-len(reachable), int(reachable.max()), -n_heavy_nb, i)

    a = min(candidates, key=key)
    if not graph.neighbors[a]:
        return [a]
    # b bonded to a; c bonded to b (a chain c-b-a) or else to a; heavy atoms first
    pairs = []
    for b in graph.neighbors[a]:
        pairs += [(b, c, True) for c in graph.neighbors[b] - {a}]
        pairs += [(b, c, False) for c in graph.neighbors[a] - {b}]
    if not pairs:
        return [a, graph.rank(graph.neighbors[a])[0]]
    b, c, _ = min(
        pairs,
        key=lambda p: (not graph.heavy[p[0]], not graph.heavy[p[1]], not p[2], p[0], p[1]),
    )
    return [a, b, c]


def _topology_graph(topology):
    """``(n_atoms, bonds, heavy)`` of an mdtraj or openmm.app topology."""
    if hasattr(topology, "getNumAtoms") and hasattr(topology, "bonds"):  # openmm.app
        atoms = list(topology.atoms())
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    elif hasattr(topology, "n_atoms") and hasattr(topology, "bonds"):  # mdtraj
        atoms = list(topology.atoms)
        bonds = [(b[0].index, b[1].index) for b in topology.bonds]
    else:
        raise TypeError(
            f"topology must be an mdtraj.Topology or an openmm.app.Topology, got {type(topology).__name__}"
        )

    def is_heavy(atom) -> bool:
        element = getattr(atom, "element", None)
        symbol = getattr(element, "symbol", None)
        return symbol not in ("H", "D")

    heavy = [is_heavy(atom) for atom in atoms]
    return len(atoms), bonds, heavy


def z_matrix_from_topology(topology, fixed_atoms: Sequence[int] | None = None) -> np.ndarray:
    """Build a z-matrix from the bonds of an mdtraj or openmm topology.

    Parameters
    ----------
    topology : mdtraj.Topology or openmm.app.Topology
        Must contain the bonds (e.g. from a PDB with CONECT records or a force-field
        topology).  Hydrogens (element H or D) are not used as references when a heavy
        atom can be.
    fixed_atoms : sequence of int, optional
        The block kept Cartesian (at least 3 atoms); ``None`` for a global z-matrix.

    Returns
    -------
    np.ndarray
        The z-matrix, see :func:`build_z_matrix`.

    Raises
    ------
    TypeError
        If ``topology`` is neither kind of topology.
    ValueError
        As :func:`build_z_matrix`, e.g. when the topology has no bonds.
    """
    n_atoms, bonds, heavy = _topology_graph(topology)
    return build_z_matrix(n_atoms, bonds, fixed_atoms=fixed_atoms, heavy=heavy)
