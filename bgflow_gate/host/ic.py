"""Internal-coordinate (IC) transforms of the host, following bgflow's ``crd_transform.ic``.

Two flows map Cartesian coordinates (nm, flattened to ``[batch, 3 * n_atoms]``) to
bonds, angles and torsions defined by a z-matrix:

:class:`GlobalInternalCoordinateTransformation`
    every atom as bond/angle/torsion (``3N - 6`` ICs) plus the global pose: the position
    of the first atom and three Euler angles.  A bijection of ``R^(3N)``.
:class:`MixedCoordinateTransformation`
    a rigid block of ``fixed_atoms`` described by its ``3 n_fixed - 6`` internal
    (shape) coordinates, whitened with statistics from data, and every other atom as
    bond/angle/torsion.  The six global degrees of freedom (translation and rotation)
    are dropped exactly, so round trips preserve all interatomic distances whatever the
    pose of the input; the output is put in a canonical frame.

Conventions (those of bgflow)
-----------------------------
* ``forward`` maps **xyz to ICs**, ``inverse=True`` maps ICs to xyz.
* A z-matrix row ``[atom, bond_ref, angle_ref, torsion_ref]`` defines
  ``bond = |x_atom - x_bond_ref|``, ``angle = angle(atom, bond_ref, angle_ref)`` (at
  ``bond_ref``) and ``torsion = dihedral(atom, bond_ref, angle_ref, torsion_ref)`` (the
  IUPAC dihedral, as ``mdtraj.compute_dihedrals``).  In a global z-matrix the first three
  atoms are marked by ``-1`` for missing references: ``[a, -1, -1, -1]``,
  ``[b, a, -1, -1]``, ``[c, b, a, -1]``.  They always form the chain ``a - b - c``
  (bonds ``d(b, a)``, ``d(c, b)``, angle ``c - b - a``): bgflow reads only which atoms
  they are, not their references, so a row ``[c, a, b, -1]`` means ``[c, b, a, -1]``.
* With ``normalize_angles=True`` angles ``[0, pi]`` are divided by ``pi`` and torsions
  ``[-pi, pi)`` are mapped to ``[0, 1)`` by ``(t + pi) / (2 pi)``.
* ``dlogp`` is ``log|det J|`` of the computed direction, shaped ``[batch, 1]``; the two
  directions' ``dlogp`` add up to zero.

Examples
--------
>>> import torch
>>> z = [[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]]
>>> ic = GlobalInternalCoordinateTransformation(z)
>>> x = torch.tensor([[0.0, 0, 0, 0.15, 0, 0, 0.2, 0.14, 0, 0.35, 0.16, 0.05]],
...                  dtype=torch.float64)
>>> bonds, angles, torsions, x0, orientation, dlogp = ic(x)
>>> bonds.shape, angles.shape, torsions.shape, x0.shape, orientation.shape, dlogp.shape
(torch.Size([1, 3]), torch.Size([1, 2]), torch.Size([1, 1]),
 torch.Size([1, 1, 3]), torch.Size([1, 3]), torch.Size([1, 1]))
>>> x_back, dlogp_back = ic(bonds, angles, torsions, x0, orientation, inverse=True)
>>> bool(torch.allclose(x_back, x)) and bool(torch.allclose(dlogp + dlogp_back, 0 * dlogp))
True
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from .flows import Flow
from .zmatrix import (
    ArrayLike,
    as_index_array,
    as_z_matrix_array,
    placement_stages,
    split_global_z_matrix,
    validate_z_matrix,
)

__all__ = [
    "GlobalInternalCoordinateTransformation",
    "MixedCoordinateTransformation",
    "bond_lengths",
    "bond_angles",
    "torsion_angles",
    "place_atoms",
    "placement_stages",
]

_LOG_PI = math.log(math.pi)
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------


def _norm(v: torch.Tensor, eps: float, enforce_boundaries: bool, raise_warnings: bool, what: str):
    """Euclidean norm over the last axis (kept), optionally clamped to at least ``eps``."""
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    if raise_warnings and bool(torch.any(n < eps)):
        warnings.warn(f"near-singular geometry: {what} shorter than eps={eps}", stacklevel=3)
    if enforce_boundaries:
        n = n.clamp_min(eps)
    return n


def bond_lengths(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Distances ``|x1 - x2|`` between points given as ``[..., 3]`` tensors.

    Parameters
    ----------
    x1, x2 : torch.Tensor
        Points, shape ``[..., 3]``.

    Returns
    -------
    torch.Tensor
        Distances, shape ``[...]``.
    """
    return torch.linalg.vector_norm(x1 - x2, dim=-1)


def bond_angles(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """Angles ``x1-x2-x3`` at the vertex ``x2``, in ``[0, pi]``.

    Computed as ``atan2(|u x v|, u . v)`` with ``u = x1 - x2``, ``v = x3 - x2``, which is
    accurate near 0 and pi (unlike ``acos``) and cannot leave ``[0, pi]``.

    Parameters
    ----------
    x1, x2, x3 : torch.Tensor
        Points, shape ``[..., 3]``.

    Returns
    -------
    torch.Tensor
        Angles in radians, shape ``[...]``.
    """
    u = x1 - x2
    v = x3 - x2
    cross = torch.linalg.vector_norm(torch.linalg.cross(u, v, dim=-1), dim=-1)
    return torch.atan2(cross, (u * v).sum(dim=-1))


def torsion_angles(
    x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor
) -> torch.Tensor:
    """IUPAC dihedral angles ``x1-x2-x3-x4`` in ``[-pi, pi)``.

    The sign convention is that of ``mdtraj.compute_dihedrals`` and bgflow: looking
    along ``x2 -> x3``, the angle from ``x1`` to ``x4`` is positive when clockwise.

    Parameters
    ----------
    x1, x2, x3, x4 : torch.Tensor
        Points, shape ``[..., 3]``.

    Returns
    -------
    torch.Tensor
        Torsions in radians, shape ``[...]``.
    """
    b1 = x2 - x1
    b2 = x3 - x2
    b3 = x4 - x3
    n1 = torch.linalg.cross(b1, b2, dim=-1)
    n2 = torch.linalg.cross(b2, b3, dim=-1)
    y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(dim=-1)
    x = (n1 * n2).sum(dim=-1)
    t = torch.atan2(y, x)
    # atan2 returns (-pi, pi]; move the single point pi to -pi so the range is [-pi, pi)
    return torch.where(t >= math.pi, t - 2.0 * math.pi, t)


def place_atoms(
    p_bond: torch.Tensor,
    p_angle: torch.Tensor,
    p_torsion: torch.Tensor,
    bonds: torch.Tensor,
    angles: torch.Tensor,
    torsions: torch.Tensor,
    eps: float = 1e-7,
    enforce_boundaries: bool = True,
    raise_warnings: bool = True,
) -> torch.Tensor:
    """Place atoms from three reference points and their internal coordinates (NeRF).

    The new point ``p`` satisfies ``|p - p_bond| = bond``,
    ``angle(p, p_bond, p_angle) = angle`` and
    ``dihedral(p, p_bond, p_angle, p_torsion) = torsion`` (the inverse of
    :func:`bond_lengths`, :func:`bond_angles`, :func:`torsion_angles`).

    Parameters
    ----------
    p_bond, p_angle, p_torsion : torch.Tensor
        Reference points, shape ``[..., 3]``.
    bonds, angles, torsions : torch.Tensor
        Bond length, angle and torsion (radians), shape ``[...]``.
    eps, enforce_boundaries, raise_warnings
        Clamp the norms of the local frame's axes to at least ``eps`` / warn when they
        are shorter (collinear references).

    Returns
    -------
    torch.Tensor
        The placed points, shape ``[..., 3]``.
    """
    axis = p_bond - p_angle
    axis = axis / _norm(axis, eps, enforce_boundaries, raise_warnings, "angle_ref -> bond_ref vector")
    normal = torch.linalg.cross(p_angle - p_torsion, axis, dim=-1)
    normal = normal / _norm(normal, eps, enforce_boundaries, raise_warnings, "normal of collinear references")
    in_plane = torch.linalg.cross(normal, axis, dim=-1)
    r = bonds[..., None]
    sin_a = torch.sin(angles)[..., None]
    cos_a = torch.cos(angles)[..., None]
    sin_t = torch.sin(torsions)[..., None]
    cos_t = torch.cos(torsions)[..., None]
    return p_bond + r * (-cos_a * axis + sin_a * cos_t * in_plane + sin_a * sin_t * normal)


def _spherical_log_volume(
    bonds: torch.Tensor, angles: torch.Tensor, eps: float, enforce_boundaries: bool,
    raise_warnings: bool = False,
) -> torch.Tensor:
    """``sum log|r^2 sin(theta)|`` over the last axis, shaped ``[batch, 1]``.

    This is ``log|det d(xyz)/d(r, theta, phi)|`` of one placed atom, summed over atoms.
    """
    r = bonds.abs()
    s = torch.sin(angles).abs()
    if raise_warnings and bool(torch.any(s < eps)):
        warnings.warn(
            f"near-singular geometry: an angle is within eps={eps} of 0 or pi (its torsion is "
            "ill-defined)", stacklevel=3,
        )
    if enforce_boundaries:
        r = r.clamp_min(eps)
        s = s.clamp_min(eps)
    return (2.0 * torch.log(r) + torch.log(s)).sum(dim=-1, keepdim=True)


def _normalize_angles(angles: torch.Tensor) -> torch.Tensor:
    return angles / math.pi


def _unnormalize_angles(angles: torch.Tensor) -> torch.Tensor:
    return angles * math.pi


def _normalize_torsions(torsions: torch.Tensor) -> torch.Tensor:
    u = (torsions + math.pi) / (2.0 * math.pi)
    # rounding can push the image of a torsion just below pi onto 1.0
    return torch.where(u >= 1.0, u - 1.0, u)


def _unnormalize_torsions(torsions: torch.Tensor) -> torch.Tensor:
    return torsions * (2.0 * math.pi) - math.pi


def _canonical_axes(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    eps: float,
    enforce_boundaries: bool,
    raise_warnings: bool,
):
    """Orthonormal axes of the frame spanned by three points.

    ``e1`` points from ``a`` to ``b``; ``e2`` is the unit component of ``c - a``
    perpendicular to ``e1``; ``e3 = e1 x e2``.  A proper rotation whatever the pose.
    """
    e1 = b - a
    e1 = e1 / _norm(e1, eps, enforce_boundaries, raise_warnings, "first frame axis")
    u = c - a
    e2 = u - (u * e1).sum(dim=-1, keepdim=True) * e1
    e2 = e2 / _norm(e2, eps, enforce_boundaries, raise_warnings, "second frame axis (collinear frame atoms)")
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return e1, e2, e3


# --------------------------------------------------------------------------------------
# z-matrix handling
# --------------------------------------------------------------------------------------


def _flatten_batch(x: torch.Tensor, n_atoms: int, name: str = "x"):
    if x.dim() < 2 or x.shape[-1] != 3 * n_atoms:
        raise ValueError(
            f"{name} must have shape [batch, {3 * n_atoms}] (3 * n_atoms flattened "
            f"coordinates), got {list(x.shape)}"
        )
    batch_shape = x.shape[:-1]
    return x.reshape(-1, n_atoms, 3), batch_shape


def _check_last_dim(t: torch.Tensor, size: int, name: str, batch: int) -> torch.Tensor:
    if t.shape[-1] != size:
        raise ValueError(f"{name} must have {size} entries in its last dimension, got {list(t.shape)}")
    t = t.reshape(-1, size)
    if t.shape[0] != batch:
        raise ValueError(f"{name} has batch size {t.shape[0]}, expected {batch}")
    return t


def _euler_rotation(alpha, cos_beta, sin_beta, gamma) -> torch.Tensor:
    """``R = Rz(alpha) Rx(beta) Rz(gamma)`` (proper z-x-z Euler angles), ``[batch, 3, 3]``."""
    ca, sa, cg, sg = torch.cos(alpha), torch.sin(alpha), torch.cos(gamma), torch.sin(gamma)
    return torch.stack([
        torch.stack([ca * cg - sa * cos_beta * sg, -ca * sg - sa * cos_beta * cg, sa * sin_beta], -1),
        torch.stack([sa * cg + ca * cos_beta * sg, -sa * sg + ca * cos_beta * cg, -ca * sin_beta], -1),
        torch.stack([sin_beta * sg, sin_beta * cg, cos_beta], -1),
    ], dim=-2)


# --------------------------------------------------------------------------------------
# shared placement machinery
# --------------------------------------------------------------------------------------


class _ZMatrixICs(torch.nn.Module):
    """Bonds, angles and torsions of relative z-matrix rows and their inverse placement."""

    def __init__(self, rows: np.ndarray, given: Sequence[int], n_atoms: int,
                 normalize_angles: bool, eps: float, enforce_boundaries: bool, raise_warnings: bool):
        super().__init__()
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        self.n_atoms = int(n_atoms)
        self.normalize_angles = bool(normalize_angles)
        self.eps = float(eps)
        self.enforce_boundaries = bool(enforce_boundaries)
        self.raise_warnings = bool(raise_warnings)
        self.stages = placement_stages(self.rows, given)
        self.rows_t = torch.as_tensor(self.rows, dtype=torch.long)
        self.stages_t = [torch.as_tensor(s, dtype=torch.long) for s in self.stages]

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def row_ics(self, x: torch.Tensor):
        """Raw bonds, angles (rad) and torsions (rad) of the rows, each ``[batch, n_rows]``."""
        idx = self.rows_t.to(x.device)
        p0, p1, p2, p3 = (x[:, idx[:, k]] for k in range(4))
        if self.raise_warnings:
            _norm(p0 - p1, self.eps, False, True, "bond")
        return bond_lengths(p0, p1), bond_angles(p0, p1, p2), torsion_angles(p0, p1, p2, p3)

    def ic_constant(self, n: int) -> float:
        return n * (_LOG_PI + _LOG_2PI) if self.normalize_angles else 0.0

    def place(self, points: torch.Tensor, bonds, angles, torsions) -> torch.Tensor:
        """Place the rows' atoms into ``points`` ([batch, n_atoms, 3]) stage by stage."""
        rows = self.rows_t.to(points.device)
        for stage in self.stages_t:
            stage = stage.to(points.device)
            refs = rows[stage]
            new = place_atoms(
                points[:, refs[:, 1]], points[:, refs[:, 2]], points[:, refs[:, 3]],
                bonds[:, stage], angles[:, stage], torsions[:, stage],
                eps=self.eps, enforce_boundaries=self.enforce_boundaries,
                raise_warnings=self.raise_warnings,
            )
            points = points.index_copy(1, refs[:, 0], new)
        return points

    def to_output(self, bonds, angles, torsions):
        if self.normalize_angles:
            angles = _normalize_angles(angles)
            torsions = _normalize_torsions(torsions)
        return bonds, angles, torsions

    def from_input(self, angles, torsions):
        if self.normalize_angles:
            angles = _unnormalize_angles(angles)
            torsions = _unnormalize_torsions(torsions)
        return angles, torsions


class _ICProperties:
    """bgflow's descriptive attributes, shared by both transforms."""

    @property
    def dim_bonds(self) -> int:
        return len(self.bond_indices)

    @property
    def dim_angles(self) -> int:
        return len(self.angle_indices)

    @property
    def dim_torsions(self) -> int:
        return len(self.torsion_indices)

    @property
    def normalize_angles(self) -> bool:
        return self._ics.normalize_angles


# --------------------------------------------------------------------------------------
# global transform
# --------------------------------------------------------------------------------------


def _warn_unless_chain(z: np.ndarray, a: int, b: int, c: int) -> None:
    """Warn when the third atom's row names ``a`` as its bond reference: bgflow (and so
    the host) still bonds it to ``b``, with the angle at ``b``."""
    c_row = z[np.flatnonzero(z[:, 0] == c)[0]]
    if int(c_row[1]) != b:
        warnings.warn(
            f"z-matrix row {c_row.tolist()}: bgflow's global transform places the first three "
            f"atoms as the chain {a}-{b}-{c} (bond {c}-{b}, angle {c}-{b}-{a}) and ignores "
            f"this row's references; write [{c}, {b}, {a}, -1] or choose a chain of bonded atoms",
            UserWarning, stacklevel=3,
        )


class GlobalInternalCoordinateTransformation(_ICProperties, Flow):
    """All atoms as bonds, angles and torsions, plus the global pose.

    ``forward`` maps xyz coordinates ``[batch, 3N]`` to
    ``(bonds, angles, torsions, x0, orientation, dlogp)`` and ``inverse=True`` maps them
    back.  The map is a bijection of ``R^(3N)`` (away from collinear configurations) with
    an exact, analytic log-det.

    Parameters
    ----------
    z_matrix : array_like of int, shape [n_atoms, 4]
        Rows ``[atom, bond_ref, angle_ref, torsion_ref]``.  The first three atoms ``a, b,
        c`` have trailing ``-1`` entries: ``[a, -1, -1, -1]``, ``[b, a, -1, -1]`` and
        ``[c, b, a, -1]``; the rows may appear anywhere, as in bgflow.  As in bgflow the
        three form the chain ``a - b - c``: a row ``[c, a, b, -1]`` is read as
        ``[c, b, a, -1]`` (with a warning), since bgflow ignores its references.  Every
        other row has all three references.
    normalize_angles : bool
        Map angles and torsions (and the two azimuthal Euler angles) to ``[0, 1]``.
    eps : float
        Numerical epsilon used to keep norms and ``sin(angle)`` away from zero.
    enforce_boundaries : bool
        Clamp norms, ``|sin(angle)|`` in the log-det and the Euler ``cos(beta)`` input to
        their valid ranges (by ``eps``) instead of producing NaN/inf.
    raise_warnings : bool
        Warn when a geometry is within ``eps`` of a singularity.

    Attributes
    ----------
    z_matrix : np.ndarray
        The relative rows (all rows without ``-1``), as bgflow's attribute.
    fixed_atoms : np.ndarray
        Empty (no atom is kept Cartesian).
    dim_bonds, dim_angles, dim_torsions, dim_fixed : int
        ``N - 1``, ``N - 2``, ``N - 3`` and 0.
    bond_indices, angle_indices, torsion_indices : np.ndarray
        Atom indices of each output bond ``[dim_bonds, 2]``, angle ``[dim_angles, 3]``
        and torsion ``[dim_torsions, 4]``, in output order.
    normalize_angles : bool

    Notes
    -----
    Output order, as bgflow: ``bonds = [d(b, a), d(c, b), *rows]``,
    ``angles = [angle(c, b, a), *rows]``, ``torsions = rows``, in the
    order of the relative rows of ``z_matrix``.  ``x0`` (shape ``[batch, 1, 3]``) is the
    position of atom ``a``; ``orientation = [alpha, cos(beta), gamma]`` are proper z-x-z
    Euler angles of the frame ``R = [e2, e3, e1]`` with ``e1`` along ``b - a`` and
    ``e2`` towards ``c`` perpendicular to ``e1`` (``R = Rz(alpha) Rx(beta) Rz(gamma)``).
    ``alpha`` and ``gamma`` are torsion-like (normalized as torsions); ``cos(beta)`` stays
    in ``[-1, 1]`` as in bgflow.

    The log-det of the inverse is
    ``log(d_ab^2) + sum_i log(r_i^2 |sin(theta_i)|)`` over ``c`` and the relative rows,
    plus ``log(pi)`` per angle and ``log(2 pi)`` per torsion, ``alpha`` and ``gamma``
    when ``normalize_angles``; ``cos(beta)`` and ``alpha`` are the spherical coordinates
    of ``b - a``, which is why ``cos(beta)`` (not ``beta``) is the output.
    """

    def __init__(
        self,
        z_matrix: ArrayLike,
        normalize_angles: bool = True,
        eps: float = 1e-7,
        enforce_boundaries: bool = True,
        raise_warnings: bool = True,
    ):
        super().__init__()
        z = as_z_matrix_array(z_matrix)
        if len(z) < 3:
            raise ValueError(f"a global z-matrix needs at least 3 atoms, got {len(z)} rows")
        n_atoms = len(z)
        validate_z_matrix(z, n_atoms)
        (a, b, c), rows = split_global_z_matrix(z)
        _warn_unless_chain(z, a, b, c)
        self._initial = (a, b, c)
        self._ics = _ZMatrixICs(rows, [a, b, c], n_atoms, normalize_angles, eps,
                                enforce_boundaries, raise_warnings)

    # ---- bgflow attributes -----------------------------------------------------------

    @property
    def z_matrix(self) -> np.ndarray:
        return self._ics.rows.copy()

    @property
    def fixed_atoms(self) -> np.ndarray:
        return np.array([], dtype=np.int64)

    @property
    def dim_fixed(self) -> int:
        return 0

    @property
    def n_atoms(self) -> int:
        return self._ics.n_atoms

    @property
    def bond_indices(self) -> np.ndarray:
        a, b, c = self._initial
        first = np.array([[b, a], [c, b]], dtype=np.int64)
        return np.concatenate([first, self._ics.rows[:, :2]], axis=0)

    @property
    def angle_indices(self) -> np.ndarray:
        first = np.array([self._initial[::-1]], dtype=np.int64)
        return np.concatenate([first, self._ics.rows[:, :3]], axis=0)

    @property
    def torsion_indices(self) -> np.ndarray:
        return self._ics.rows[:, :4].copy()

    # ---- transform -----------------------------------------------------------------

    def _initial_ics(self, x: torch.Tensor):
        a, b, c = self._initial
        d_ab = bond_lengths(x[:, b], x[:, a])
        d_c = bond_lengths(x[:, c], x[:, b])
        angle_c = bond_angles(x[:, c], x[:, b], x[:, a])
        return d_ab, d_c, angle_c

    def _forward(self, x: torch.Tensor, *args, **kwargs):
        """xyz ``[batch, 3N]`` -> ``(bonds, angles, torsions, x0, orientation, dlogp)``."""
        ics = self._ics
        xs, batch_shape = _flatten_batch(x, self.n_atoms)
        a, b, c = self._initial
        bonds, angles, torsions = ics.row_ics(xs)
        d_ab, d_c, angle_c = self._initial_ics(xs)

        e1, e2, e3 = _canonical_axes(xs[:, a], xs[:, b], xs[:, c], ics.eps,
                                     ics.enforce_boundaries, ics.raise_warnings)
        alpha = torch.atan2(e1[:, 0], -e1[:, 1])
        cos_beta = e1[:, 2]
        gamma = torch.atan2(e2[:, 2], e3[:, 2])
        alpha = torch.where(alpha >= math.pi, alpha - 2 * math.pi, alpha)
        gamma = torch.where(gamma >= math.pi, gamma - 2 * math.pi, gamma)

        all_bonds = torch.cat([d_ab[:, None], d_c[:, None], bonds], dim=-1)
        all_angles = torch.cat([angle_c[:, None], angles], dim=-1)

        log_vol = (
            2.0 * torch.log(d_ab.clamp_min(ics.eps) if ics.enforce_boundaries else d_ab)[:, None]
            + _spherical_log_volume(all_bonds[:, 1:], all_angles, ics.eps,
                                    ics.enforce_boundaries, ics.raise_warnings)
        )
        if ics.normalize_angles:
            all_bonds, all_angles, torsions = ics.to_output(all_bonds, all_angles, torsions)
            alpha = _normalize_torsions(alpha)
            gamma = _normalize_torsions(gamma)
            log_vol = log_vol + all_angles.shape[-1] * _LOG_PI + (torsions.shape[-1] + 2) * _LOG_2PI
        orientation = torch.stack([alpha, cos_beta, gamma], dim=-1)
        x0 = xs[:, a].unsqueeze(-2)
        dlogp = -log_vol

        def shaped(t, tail):
            return t.reshape(*batch_shape, *tail)

        return (
            shaped(all_bonds, [-1]), shaped(all_angles, [-1]), shaped(torsions, [-1]),
            shaped(x0, [1, 3]), shaped(orientation, [3]), shaped(dlogp, [1]),
        )

    def _place_b_and_c(self, x0, d_ab, r_c, th_c, rot):
        """Positions of the second and third atoms from their ICs and the frame ``rot``.

        In the local frame ``a`` lies at 0, ``b`` on ``+z`` and ``c`` in the ``xz`` plane
        (``x > 0``), bonded to ``b`` with the angle ``th_c`` at ``b``; ``rot`` turns the
        local frame into the global one.
        """
        zero = torch.zeros_like(d_ab)
        local_b = torch.stack([zero, zero, d_ab], dim=-1)
        z_c = d_ab - r_c * torch.cos(th_c)
        local_c = torch.stack([r_c * torch.sin(th_c), zero, z_c], dim=-1)
        x_b = x0 + torch.einsum("nij,nj->ni", rot, local_b)
        x_c = x0 + torch.einsum("nij,nj->ni", rot, local_c)
        return x_b, x_c

    def _inverse(self, bonds, angles, torsions, x0, orientation, *args, **kwargs):
        """``(bonds, angles, torsions, x0, orientation)`` -> ``(xyz [batch, 3N], dlogp)``."""
        ics = self._ics
        n = self.n_atoms
        batch_shape = bonds.shape[:-1]
        batch = int(np.prod(batch_shape)) if len(batch_shape) else 1
        bonds = _check_last_dim(bonds, n - 1, "bonds", batch)
        angles = _check_last_dim(angles, n - 2, "angles", batch)
        torsions = _check_last_dim(torsions, n - 3, "torsions", batch)
        x0 = _check_last_dim(x0, 3, "x0", batch)
        orientation = _check_last_dim(orientation, 3, "orientation", batch)
        alpha, cos_beta, gamma = orientation.unbind(dim=-1)

        log_vol = x0.new_zeros(batch, 1)
        if ics.normalize_angles:
            angles, torsions = ics.from_input(angles, torsions)
            alpha = _unnormalize_torsions(alpha)
            gamma = _unnormalize_torsions(gamma)
            log_vol = log_vol + angles.shape[-1] * _LOG_PI + (torsions.shape[-1] + 2) * _LOG_2PI
        if ics.enforce_boundaries:
            cos_beta = cos_beta.clamp(-1.0 + ics.eps, 1.0 - ics.eps)
        sin_beta = torch.sqrt(1.0 - cos_beta ** 2)

        d_ab = bonds[:, 0]
        log_vol = log_vol + 2.0 * torch.log(
            d_ab.abs().clamp_min(ics.eps) if ics.enforce_boundaries else d_ab.abs()
        )[:, None]
        log_vol = log_vol + _spherical_log_volume(bonds[:, 1:], angles, ics.eps,
                                                  ics.enforce_boundaries, ics.raise_warnings)

        x_b, x_c = self._place_b_and_c(x0, bonds[:, 0], bonds[:, 1], angles[:, 0],
                                       _euler_rotation(alpha, cos_beta, sin_beta, gamma))
        a, b, c = self._initial
        points = x0.new_zeros(batch, n, 3)
        points = points.index_copy(
            1, torch.tensor([a, b, c], device=x0.device), torch.stack([x0, x_b, x_c], dim=1)
        )
        points = ics.place(points, bonds[:, 2:], angles[:, 1:], torsions)
        return points.reshape(*batch_shape, 3 * n), log_vol.reshape(*batch_shape, 1)


# --------------------------------------------------------------------------------------
# mixed transform
# --------------------------------------------------------------------------------------


def _principal_components(s: np.ndarray, keepdims: int):
    """Mean, the ``keepdims`` leading eigenvectors (columns) and standard deviations of ``s``.

    Raises
    ------
    ValueError
        If a kept component has (numerically) zero variance.
    """
    mean = s.mean(axis=0)
    cov = np.cov(s - mean, rowvar=False).reshape(s.shape[1], s.shape[1])
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:keepdims]
    eigval, eigvec = eigval[order], eigvec[:, order]
    tiny = max(float(np.max(eigval)), 0.0) * 1e-14
    if not np.all(np.isfinite(eigval)) or np.any(eigval <= tiny):
        raise ValueError(
            f"the block's internal coordinates have (numerically) zero variance along "
            f"{int(np.sum(~(eigval > tiny)))} of the {keepdims} kept principal "
            "components in data; provide more varied data or a smaller keepdims"
        )
    return mean, eigvec, np.sqrt(eigval)


class MixedCoordinateTransformation(_ICProperties, Flow):
    """A rigid block in whitened shape coordinates, every other atom as bond/angle/torsion.

    ``forward`` maps xyz coordinates ``[batch, 3N]`` to
    ``(bonds, angles, torsions, z_fixed, dlogp)``; ``inverse=True`` maps them back to xyz
    in a canonical frame.

    The block (``fixed_atoms``, at least 3 atoms) is expressed in the canonical frame of
    its first three atoms ``a, b, c = fixed_atoms[:3]``: ``a`` at the origin, ``b`` on the
    ``+x`` axis, ``c`` in the ``xy`` plane with ``y > 0``.  Its internal coordinates
    ``s = (b_x, c_x, c_y, xyz of the other block atoms)`` (``3 n_fixed - 6`` numbers, in
    the order of ``fixed_atoms``) are invariant under translations and rotations, so the
    six dropped degrees of freedom are exactly the global pose.  ``s`` is whitened with a
    fixed linear map estimated from ``data``: ``z_fixed = (s - mean) V / std`` with the
    top ``keepdims`` eigenvectors ``V`` and standard deviations ``std`` of ``s`` over the
    data.  The inverse builds the block from ``z_fixed`` in the canonical frame and
    places the z-matrix atoms from it; the input pose is not recovered (by design), but
    every interatomic distance is.

    Parameters
    ----------
    data : torch.Tensor or np.ndarray, shape [n_frames, 3N] (or [n_frames, N, 3])
        Configurations (any poses) used to estimate the whitening of the block's
        internal coordinates; needs more than ``keepdims`` frames.
    z_matrix : array_like of int, shape [N - n_fixed, 4]
        Rows ``[atom, bond_ref, angle_ref, torsion_ref]`` for every atom not in
        ``fixed_atoms`` (no ``-1``).  Rows may come in any order as long as every
        reference is eventually placed, as in bgflow.
    fixed_atoms : array_like of int
        The block's atoms (at least 3); the first three define the canonical frame and
        must not be collinear in the data.
    keepdims : int, optional
        Number of whitened block coordinates kept (default and maximum
        ``3 n_fixed - 6``).  With fewer, the block is projected onto the leading
        principal components and the inverse is no longer exact.
    normalize_angles : bool
        Map angles to ``[0, 1]`` (``/ pi``) and torsions to ``[0, 1)``.
    eps : float
        Numerical epsilon used to keep norms and ``sin(angle)`` away from zero.
    enforce_boundaries : bool
        Clamp norms and ``|sin(angle)|`` in the log-det to at least ``eps`` instead of
        producing NaN/inf at singular geometries.
    raise_warnings : bool
        Warn when a geometry is within ``eps`` of a singularity.

    Attributes
    ----------
    z_matrix : np.ndarray
    fixed_atoms : np.ndarray
    frame_atoms : np.ndarray
        ``fixed_atoms[:3]``, the atoms defining the canonical frame.
    dim_bonds, dim_angles, dim_torsions : int
        Number of z-matrix rows each.
    dim_fixed : int
        ``keepdims``: the number of whitened block coordinates.
    bond_indices, angle_indices, torsion_indices : np.ndarray
        ``z_matrix[:, :2]``, ``z_matrix[:, :3]``, ``z_matrix[:, :4]``.
    normalize_angles : bool

    Notes
    -----
    **Log-det convention.**  ``dlogp`` is exact for the map between
    ``(z_fixed, bonds, angles, torsions)`` and Cartesian coordinates *modulo rigid
    motion*.  Writing ``x = a + Q^T y`` with the canonical coordinates ``y`` and the
    frame's rotation ``Q``, the Cartesian volume element factorises as
    ``d^(3N) x = r_ab^2 c_y d^3a dQ d^(3N-6) y`` (``dQ`` the Haar measure of SO(3)), so a
    rotation- and translation-invariant density ``p(x)`` induces the shape-space
    density ``p(x) r_ab^2 c_y`` (up to the constant volume of SE(3)).  Accordingly the
    inverse's ``dlogp`` is::

        log(r_ab^2 c_y)                                  # rigid-motion orbit volume
        + sum(log std)                                   # un-whitening
        + sum_i log(r_i^2 |sin(theta_i)|)                # each placed atom, spherical
        + n_rows * (log(pi) + log(2 pi))                 # only if normalize_angles

    and the forward's is its negative.  Equivalently: the Jacobian of the inverse map
    from the ICs to the ``3N - 6`` canonical coordinates that are not identically zero
    (``b_x, c_x, c_y`` and all xyz of the other atoms) is square, and its log|det| plus
    ``log(r_ab^2 c_y)`` is the inverse's ``dlogp``.  Hence Boltzmann-generator importance
    weights computed with this ``dlogp`` and an invariant energy are exact on shape
    space.  With ``keepdims < 3 n_fixed - 6`` the whitening term is the log
    pseudo-determinant ``-sum(log std)`` over the kept components, as bgflow's.
    """

    def __init__(
        self,
        data: torch.Tensor | np.ndarray,
        z_matrix: ArrayLike,
        fixed_atoms: ArrayLike,
        keepdims: int | None = None,
        normalize_angles: bool = True,
        eps: float = 1e-7,
        enforce_boundaries: bool = True,
        raise_warnings: bool = True,
    ):
        super().__init__()
        fixed = as_index_array(fixed_atoms, "fixed_atoms").reshape(-1)
        z = as_z_matrix_array(z_matrix)
        n_atoms = len(fixed) + len(z)
        validate_z_matrix(z, n_atoms, fixed)
        self._fixed = fixed
        self._z = z
        self._ics = _ZMatrixICs(z, fixed, n_atoms, normalize_angles, eps,
                                enforce_boundaries, raise_warnings)
        self._fixed_t = torch.as_tensor(fixed, dtype=torch.long)
        self._dim_shape = 3 * len(fixed) - 6
        if keepdims is None:
            keepdims = self._dim_shape
        if not isinstance(keepdims, (int, np.integer)) or isinstance(keepdims, bool) \
                or not 1 <= keepdims <= self._dim_shape:
            raise ValueError(
                f"keepdims must be an integer in [1, {self._dim_shape}] (3 * n_fixed - 6), "
                f"got {keepdims!r}"
            )
        self._keepdims = int(keepdims)
        self._setup_whitening(data)

    # ---- whitening -----------------------------------------------------------------

    def _setup_whitening(self, data) -> None:
        if isinstance(data, np.ndarray):
            data = torch.as_tensor(data)
        if not isinstance(data, torch.Tensor) or not torch.is_floating_point(data):
            raise ValueError("data must be a floating-point tensor or array of configurations")
        n_atoms = self._ics.n_atoms
        if data.numel() % (3 * n_atoms) != 0 or data.dim() < 2:
            raise ValueError(
                f"data must have shape [n_frames, {3 * n_atoms}] or [n_frames, {n_atoms}, 3], "
                f"got {list(data.shape)}"
            )
        frames = data.detach().reshape(data.shape[0], n_atoms, 3).to(torch.float64)
        if frames.shape[0] <= self._keepdims:
            raise ValueError(
                f"data has {frames.shape[0]} frames; whitening {self._keepdims} block "
                f"coordinates needs at least {self._keepdims + 1}"
            )
        block = frames[:, self._fixed_t]
        s, sin_abc = self._shape_coordinates(block, check=False)
        if bool(torch.any(sin_abc < 1e-3)):
            raise ValueError(
                f"the frame atoms {self._fixed[:3].tolist()} (the first three fixed_atoms) are "
                "nearly collinear in some data frames; reorder fixed_atoms so that its first "
                "three atoms span a plane"
            )
        mean, eigvec, std = _principal_components(s.cpu().numpy(), self._keepdims)
        dtype = data.dtype
        self.register_buffer("_mean", torch.as_tensor(mean, dtype=dtype))
        self.register_buffer("_whiten_matrix", torch.as_tensor(eigvec / std, dtype=dtype))
        self.register_buffer("_blacken_matrix", torch.as_tensor(std[:, None] * eigvec.T, dtype=dtype))
        self.register_buffer("_std", torch.as_tensor(std, dtype=dtype))

    def _shape_coordinates(self, block: torch.Tensor, check: bool = True):
        """Canonical-frame coordinates ``s`` of the block ``[batch, n_fixed, 3]``.

        Returns ``s`` ``[batch, 3 n_fixed - 6]`` and ``sin(angle b-a-c)`` ``[batch]``.
        """
        ics = self._ics
        a, b, c = block[:, 0], block[:, 1], block[:, 2]
        e1, e2, e3 = _canonical_axes(
            a, b, c, ics.eps, ics.enforce_boundaries, ics.raise_warnings and check
        )
        q = torch.stack([e1, e2, e3], dim=-2)  # rows: canonical axes
        y = torch.einsum("nij,nkj->nki", q, block - a[:, None])
        s = torch.cat([y[:, 1, :1], y[:, 2, :2], y[:, 3:].reshape(len(block), -1)], dim=-1)
        u = c - a
        sin_abc = torch.linalg.vector_norm(torch.linalg.cross(e1, u, dim=-1), dim=-1) / (
            torch.linalg.vector_norm(u, dim=-1).clamp_min(ics.eps)
        )
        return s, sin_abc

    def _orbit_log_volume(self, s: torch.Tensor) -> torch.Tensor:
        """``log(r_ab^2 c_y)`` from shape coordinates, ``[batch, 1]``."""
        r_ab, c_y = s[:, 0].abs(), s[:, 2].abs()
        if self._ics.enforce_boundaries:
            r_ab, c_y = r_ab.clamp_min(self._ics.eps), c_y.clamp_min(self._ics.eps)
        return (2.0 * torch.log(r_ab) + torch.log(c_y))[:, None]

    def block_log_volume(self, x: torch.Tensor) -> torch.Tensor:
        """The block's share of ``-dlogp`` (forward): ``log(r_ab^2 c_y) + sum(log std)``.

        The rigid-motion orbit factor and the whitening term (see the class Notes); the rest
        of the forward ``dlogp`` is the placed atoms' spherical Jacobian and the angle
        normalisation, as in bgflow.

        Parameters
        ----------
        x : torch.Tensor
            Configurations ``[batch, 3N]``.

        Returns
        -------
        torch.Tensor
            ``[batch, 1]``.
        """
        xs, batch_shape = _flatten_batch(x, self.n_atoms)
        s, _ = self._shape_coordinates(xs[:, self._fixed_t.to(xs.device)])
        log_volume = self._orbit_log_volume(s) + torch.log(self._std.to(s)).sum()
        return log_volume.reshape(*batch_shape, 1)

    # ---- bgflow attributes -----------------------------------------------------------

    @property
    def z_matrix(self) -> np.ndarray:
        return self._z.copy()

    @property
    def fixed_atoms(self) -> np.ndarray:
        return self._fixed.copy()

    @property
    def frame_atoms(self) -> np.ndarray:
        return self._fixed[:3].copy()

    @property
    def dim_fixed(self) -> int:
        return self._keepdims

    @property
    def n_atoms(self) -> int:
        return self._ics.n_atoms

    @property
    def bond_indices(self) -> np.ndarray:
        return self._z[:, :2].copy()

    @property
    def angle_indices(self) -> np.ndarray:
        return self._z[:, :3].copy()

    @property
    def torsion_indices(self) -> np.ndarray:
        return self._z[:, :4].copy()

    # ---- transform -----------------------------------------------------------------

    def _forward(self, x: torch.Tensor, *args, **kwargs):
        """xyz ``[batch, 3N]`` -> ``(bonds, angles, torsions, z_fixed, dlogp)``."""
        ics = self._ics
        xs, batch_shape = _flatten_batch(x, self.n_atoms)
        bonds, angles, torsions = ics.row_ics(xs)
        s, _ = self._shape_coordinates(xs[:, self._fixed_t.to(xs.device)])
        z_fixed = (s - self._mean.to(s)) @ self._whiten_matrix.to(s)

        log_vol = (
            _spherical_log_volume(bonds, angles, ics.eps, ics.enforce_boundaries,
                                  ics.raise_warnings)
            + ics.ic_constant(ics.n_rows)
            + self._orbit_log_volume(s)
            + torch.log(self._std.to(s)).sum()
        )
        bonds, angles, torsions = ics.to_output(bonds, angles, torsions)
        dlogp = -log_vol
        return (
            bonds.reshape(*batch_shape, -1), angles.reshape(*batch_shape, -1),
            torsions.reshape(*batch_shape, -1), z_fixed.reshape(*batch_shape, -1),
            dlogp.reshape(*batch_shape, 1),
        )

    def _inverse(self, bonds, angles, torsions, z_fixed, *args, **kwargs):
        """``(bonds, angles, torsions, z_fixed)`` -> ``(xyz [batch, 3N], dlogp)``.

        The block is built in the canonical frame of ``fixed_atoms[:3]``.
        """
        ics = self._ics
        n_rows = ics.n_rows
        batch_shape = z_fixed.shape[:-1]
        batch = int(np.prod(batch_shape)) if len(batch_shape) else 1
        z_fixed = _check_last_dim(z_fixed, self._keepdims, "z_fixed", batch)
        bonds = _check_last_dim(bonds, n_rows, "bonds", batch)
        angles = _check_last_dim(angles, n_rows, "angles", batch)
        torsions = _check_last_dim(torsions, n_rows, "torsions", batch)
        angles, torsions = ics.from_input(angles, torsions)

        s = z_fixed @ self._blacken_matrix.to(z_fixed) + self._mean.to(z_fixed)
        zero = torch.zeros_like(s[:, 0])
        block = torch.cat([
            torch.stack([zero, zero, zero, s[:, 0], zero, zero, s[:, 1], s[:, 2], zero], dim=-1),
            s[:, 3:],
        ], dim=-1).reshape(batch, -1, 3)
        points = z_fixed.new_zeros(batch, self.n_atoms, 3)
        points = points.index_copy(1, self._fixed_t.to(points.device), block)
        points = ics.place(points, bonds, angles, torsions)

        log_vol = (
            _spherical_log_volume(bonds, angles, ics.eps, ics.enforce_boundaries,
                                  ics.raise_warnings)
            + ics.ic_constant(n_rows)
            + self._orbit_log_volume(s)
            + torch.log(self._std.to(s)).sum()
        )
        return points.reshape(*batch_shape, 3 * self.n_atoms), log_vol.reshape(*batch_shape, 1)
