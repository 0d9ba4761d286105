"""Z-matrix arrays and the one rule that checks them, for the internal-coordinate transforms.

A z-matrix row ``[atom, bond_ref, angle_ref, torsion_ref]`` places ``atom`` by its distance
to ``bond_ref``, the angle ``atom-bond_ref-angle_ref`` and the dihedral
``atom-bond_ref-angle_ref-torsion_ref`` (bgflow's convention).  Two kinds exist:

* **relative** (``fixed_atoms`` given, at least 3): one row per atom outside the fixed
  block, no ``-1``.
* **global** (``fixed_atoms=None``): one row per atom; three rows (the initial atoms
  ``a, b, c``) have trailing ``-1`` for missing references: ``[a, -1, -1, -1]``,
  ``[b, a, -1, -1]`` and ``[c, b, a, -1]`` (or ``[c, a, b, -1]``, which bgflow's global
  transform reads as ``[c, b, a, -1]``: it takes the chain ``a - b - c``, see
  :func:`split_global_z_matrix`).

The rule (:func:`validate_z_matrix`) is bgflow's: rows may come in **any order**, as long
as some order places every atom from atoms already placed.  bgflow's
``decompose_z_matrix`` places the rows in stages (:func:`placement_stages` here) and only
fails when some rows can never be placed.

Examples
--------
>>> validate_z_matrix([[4, 3, 2, 1], [3, 2, 1, 0]], 5, fixed_atoms=[0, 1, 2]).shape
(2, 4)
>>> [s.tolist() for s in placement_stages([[4, 3, 2, 1], [3, 2, 1, 0]], [0, 1, 2])]
[[1], [0]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "as_index_array",
    "as_z_matrix_array",
    "check_fixed_atoms",
    "placement_stages",
    "validate_z_matrix",
    "split_global_z_matrix",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence


def as_index_array(values: ArrayLike, name: str) -> np.ndarray:
    """Atom indices as an ``int64`` array (floats holding whole numbers are accepted).

    Parameters
    ----------
    values : array_like or torch.Tensor
        The indices, any shape.
    name : str
        The argument's name, for the error message.

    Returns
    -------
    np.ndarray
        ``int64`` array of the same shape.

    Raises
    ------
    ValueError
        If the values are not whole numbers.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise ValueError(f"{name} must hold integer atom indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def as_z_matrix_array(z_matrix: ArrayLike) -> np.ndarray:
    """A z-matrix as an ``int64`` array ``[n_rows, 4]`` (an empty one as ``[0, 4]``).

    Raises
    ------
    ValueError
        If the indices are not integers or the shape is not ``[n_rows, 4]``.
    """
    z = as_index_array(z_matrix, "z_matrix")
    if z.size == 0:
        z = z.reshape(0, 4)
    if z.ndim != 2 or z.shape[1] != 4:
        raise ValueError(f"z_matrix must have shape [n_rows, 4], got {list(z.shape)}")
    return z


def placement_stages(z_matrix: ArrayLike, given: Sequence[int]) -> list[np.ndarray]:
    """Group z-matrix rows into stages that can be placed in parallel.

    A row joins the first stage at which all its references have been placed (either
    ``given`` or placed by an earlier stage), so rows need not be ordered.

    Parameters
    ----------
    z_matrix : array_like of int
        Rows ``[atom, bond_ref, angle_ref, torsion_ref]`` without ``-1`` entries.
    given : sequence of int
        Atoms placed before the first row (the fixed block or the first three atoms).

    Returns
    -------
    list of np.ndarray
        Row indices of each stage, in placement order.

    Raises
    ------
    ValueError
        If some rows can never be placed (a reference is never placed or the references
        form a cycle).
    """
    z_matrix = np.asarray(z_matrix, dtype=np.int64).reshape(-1, 4)
    placed = set(int(i) for i in given)
    remaining = list(range(len(z_matrix)))
    stages = []
    while remaining:
        ready = [r for r in remaining if all(int(ref) in placed for ref in z_matrix[r, 1:])]
        if not ready:
            bad = ", ".join(f"row {r} {z_matrix[r].tolist()}" for r in remaining)
            raise ValueError(
                "z-matrix rows whose references are never placed (unreachable from the "
                f"fixed/initial atoms, or placing each other in a cycle): {bad}"
            )
        stages.append(np.asarray(ready, dtype=np.int64))
        placed.update(int(z_matrix[r, 0]) for r in ready)
        ready_set = set(ready)
        remaining = [r for r in remaining if r not in ready_set]
    return stages


# --------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------


def _check_n_atoms(n_atoms) -> int:
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, (int, np.integer)) or n_atoms < 1:
        raise ValueError(f"n_atoms must be a positive integer, got {n_atoms!r}")
    return int(n_atoms)


def check_fixed_atoms(fixed_atoms: ArrayLike, n_atoms: int) -> np.ndarray:
    """A fixed block of at least 3 distinct atoms of ``range(n_atoms)``, as ``int64``.

    Raises
    ------
    ValueError
        Naming the atoms out of range, repeated atoms, or a block of fewer than 3 atoms.
    """
    fixed = as_index_array(fixed_atoms, "fixed_atoms").reshape(-1)
    bad = [int(i) for i in fixed if not 0 <= i < n_atoms]
    if bad:
        raise ValueError(f"fixed_atoms {bad} out of range [0, {n_atoms})")
    if len(set(fixed.tolist())) != len(fixed):
        raise ValueError(f"fixed_atoms must be distinct, got {fixed.tolist()}")
    if len(fixed) < 3:
        raise ValueError(
            f"fixed_atoms needs at least 3 atoms to define a frame, got {fixed.tolist()} "
            "(fixed_atoms=None for a global z-matrix)"
        )
    return fixed


def _check_row_entries(r: int, row: list[int], n_atoms: int) -> None:
    """Index ranges of one row, and ``-1`` only as trailing references."""
    atom, refs = row[0], row[1:]
    where = f"z-matrix row {r} {row}"
    if not 0 <= atom < n_atoms:
        raise ValueError(f"{where}: atom index {atom} out of range [0, {n_atoms})")
    for ref in refs:
        if ref != -1 and not 0 <= ref < n_atoms:
            raise ValueError(
                f"{where}: reference {ref} out of range [0, {n_atoms}) (use -1 for a "
                "missing reference)"
            )
    n_given = sum(ref != -1 for ref in refs)
    if any(ref == -1 for ref in refs[:n_given]):
        raise ValueError(f"{where}: missing references (-1) must be the trailing entries")


def _check_row_references(r: int, row: list[int], n_required: int) -> None:
    """The number of references of one row, and distinct atoms."""
    where = f"z-matrix row {r} {row}"
    n_given = sum(ref != -1 for ref in row[1:])
    if n_given != n_required:
        raise ValueError(
            f"{where}: has {n_given} reference(s) but {n_required} are required (-1 marks a "
            "missing reference, only in the first three rows of a global z-matrix)"
        )
    if len(set(row[: 1 + n_given])) != 1 + n_given:
        raise ValueError(f"{where}: the atom and its references must be distinct")


def _required_references(z: np.ndarray, n_atoms: int, is_global: bool) -> list[int]:
    """References each row must have: 3, except the initial rows of a global z-matrix."""
    if not is_global:
        return [3] * len(z)
    n_missing = np.sum(z[:, 1:] == -1, axis=1)
    for k in (3, 2, 1)[: min(3, n_atoms)]:
        rows = np.flatnonzero(n_missing == k)
        if len(rows) != 1:
            raise ValueError(
                f"a global z-matrix needs exactly one row with {k} missing reference(s) (-1); "
                f"found {len(rows)}: rows {rows.tolist()}"
            )
    initial = set(range(4 - min(3, n_atoms), 4))
    return [3 - int(k) if int(k) in initial else 3 for k in n_missing]


def _check_placed_once(z: np.ndarray, n_atoms: int, given: Sequence[int]) -> None:
    placed_by = {int(atom): "fixed_atoms" for atom in given}
    for r, row in enumerate(z.tolist()):
        if row[0] in placed_by:
            raise ValueError(
                f"z-matrix row {r} {row}: atom {row[0]} is placed twice (also by "
                f"{placed_by[row[0]]})"
            )
        placed_by[row[0]] = f"row {r}"
    missing = sorted(set(range(n_atoms)) - set(placed_by))
    if missing:
        raise ValueError(
            f"atoms {missing} are never placed (neither in fixed_atoms nor in any z-matrix row)"
        )


def validate_z_matrix(z_matrix: ArrayLike, n_atoms: int, fixed_atoms: ArrayLike | None = None) -> np.ndarray:
    """Check that a z-matrix places every atom exactly once, in some order.

    Parameters
    ----------
    z_matrix : array_like of int, shape [n_rows, 4]
        Rows ``[atom, bond_ref, angle_ref, torsion_ref]``; ``-1`` marks a missing
        reference (only in the three initial rows of a global z-matrix).
    n_atoms : int
        Number of atoms of the system.
    fixed_atoms : array_like of int, optional
        The block placed before any row (kept Cartesian, at least 3 atoms).  ``None`` for a
        global z-matrix.

    Returns
    -------
    np.ndarray
        The z-matrix as an ``int64`` array of shape ``[n_rows, 4]``, rows as given.

    Raises
    ------
    ValueError
        Naming the offending row when: the shape is not ``[n_rows, 4]``; an index is out
        of range; a row's atoms are not distinct; ``-1`` appears outside the initial rows
        of a global z-matrix, or not trailing; a global z-matrix lacks exactly one row with
        3, 2 and 1 missing references, or its second and third atoms do not refer to the
        first two; an atom is placed twice (by two rows, or by a row and ``fixed_atoms``)
        or never; some rows can never be placed (a reference never placed, or a cycle).

    Notes
    -----
    Row order is free, as in bgflow: a row may refer to an atom that a later row places.
    """
    n_atoms = _check_n_atoms(n_atoms)
    z = as_z_matrix_array(z_matrix)
    is_global = fixed_atoms is None
    given = [] if is_global else check_fixed_atoms(fixed_atoms, n_atoms).tolist()
    for r, row in enumerate(z.tolist()):
        _check_row_entries(r, row, n_atoms)
    required = _required_references(z, n_atoms, is_global)
    for r, row in enumerate(z.tolist()):
        _check_row_references(r, row, required[r])
    _check_placed_once(z, n_atoms, given)
    if not is_global:
        placement_stages(z, given)
    elif n_atoms >= 3:
        initial, rows = split_global_z_matrix(z)
        placement_stages(rows, initial)
    return z


def split_global_z_matrix(z_matrix: ArrayLike):
    """The initial atoms of a global z-matrix (at least 3 atoms), and its other rows.

    Parameters
    ----------
    z_matrix : array_like of int
        A global z-matrix whose rows pass :func:`validate_z_matrix`'s row checks.

    Returns
    -------
    initial : tuple of int
        The atoms ``(a, b, c)`` of the rows with 3, 2 and 1 missing references.  As in
        bgflow they form the chain ``a - b - c``: a global transform outputs ``d(b, a)``,
        ``d(c, b)`` and the angle ``c - b - a`` whatever the references of ``c``'s row.
    rows : np.ndarray
        The rows without ``-1``, in their order.

    Raises
    ------
    ValueError
        If ``b`` does not refer to ``a``, or ``c`` does not refer to ``a`` and ``b``.
    """
    z = as_z_matrix_array(z_matrix)
    n_missing = np.sum(z[:, 1:] == -1, axis=1)
    index = {k: int(np.flatnonzero(n_missing == k)[0]) for k in (3, 2, 1)}
    a, b, c = (int(z[index[k], 0]) for k in (3, 2, 1))
    b_row, c_row = z[index[2]], z[index[1]]
    if int(b_row[1]) != a:
        raise ValueError(
            f"z-matrix row {index[2]} {b_row.tolist()}: the second atom must be bonded to "
            f"the first atom {a}"
        )
    if sorted(c_row[1:3].tolist()) != sorted([a, b]):
        raise ValueError(
            f"z-matrix row {index[1]} {c_row.tolist()}: the third atom's bond and angle "
            f"references must be the first two atoms {a} and {b}"
        )
    return (a, b, c), z[n_missing == 0]
