"""The difference vectors a system's terms need, for a whole batch at once, and their gradient.

Every bond, angle leg, torsion leg and atom pair is a difference ``x[plus] - x[minus]`` of
two atoms. :class:`Layout` lists them all as the columns of one fixed matrix of +1 / -1
entries, named segments of consecutive columns, and computes every column for the whole batch
as one matrix product (exact: each column adds one coordinate and subtracts another); the
gradient with respect to the positions is one product with the transpose. Where float32
matrix products may run in reduced precision (``torch.get_float32_matmul_precision() !=
"highest"``: TF32 / bfloat16) it uses index selection and index addition instead.
"""

from __future__ import annotations

import torch

from .scratch import FRESH, Scratch

__all__ = ["Layout", "PairAtomMap", "exact_matmul"]


def exact_matmul(dtype: torch.dtype) -> bool:
    """Whether matrix products in ``dtype`` run in full precision (float32 may use TF32 / bfloat16)."""
    return dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest"


def _signed_matrix(n_rows: int, plus: torch.Tensor, minus: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n_rows, n]``: +1 at ``(plus[c], c)``, -1 at ``(minus[c], c)``."""
    columns = torch.arange(len(plus))
    matrix = torch.zeros(n_rows, len(plus), dtype=dtype)
    matrix.index_put_((plus, columns), torch.ones(len(plus), dtype=dtype), accumulate=True)
    matrix.index_put_((minus, columns), -torch.ones(len(plus), dtype=dtype), accumulate=True)
    return matrix


class Layout:
    """Columns of difference vectors in named segments, on one device in one dtype.

    Parameters
    ----------
    n_atoms : int
        Atoms in the system.
    segments : dict of str to (plus, minus)
        For each segment, the atoms whose positions are added and subtracted, two integer
        tensors of equal length.
    device, dtype
        Where and in which precision the vectors are computed.

    Examples
    --------
    >>> layout = Layout(3, {"bonds": (torch.tensor([1, 2]), torch.tensor([0, 1]))}, "cpu", torch.float32)
    >>> v = layout(torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 2, 0]]]))
    >>> layout.segment(v, "bonds")[:2]
    tensor([[[1., 0.]],
    <BLANKLINE>
            [[0., 2.]]])
    """

    def __init__(self, n_atoms: int, segments: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.n_atoms = n_atoms
        self.slices, start = {}, 0
        for name, (plus, _) in segments.items():
            self.slices[name] = slice(start, start + len(plus))
            start += len(plus)
        self.n_columns = start
        plus = torch.cat([p.long() for p, _ in segments.values()]) if segments else torch.zeros(0, dtype=torch.long)
        minus = torch.cat([m.long() for _, m in segments.values()]) if segments else torch.zeros(0, dtype=torch.long)
        self.plus, self.minus = plus.to(device), minus.to(device)
        self.matrix = _signed_matrix(n_atoms, plus, minus, torch.float64).to(device=device, dtype=dtype)

    def __call__(self, positions: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
        """All columns' vectors ``[3, batch, n_columns]`` (x, y, z first) of positions ``[batch, n_atoms, 3]``."""
        batch = positions.shape[0]
        if exact_matmul(positions.dtype):
            rows = positions.permute(2, 0, 1).reshape(3 * batch, self.n_atoms)
            out = scratch("columns", (3 * batch, self.n_columns), positions)
            return torch.mm(rows, self.matrix, out=out).view(3, batch, self.n_columns)
        difference = positions.index_select(1, self.plus) - positions.index_select(1, self.minus)
        return difference.permute(2, 0, 1)

    def segment(self, vectors: torch.Tensor, name: str) -> torch.Tensor:
        """One segment's columns ``[3, batch, n]`` of :meth:`__call__`'s output."""
        return vectors[:, :, self.slices[name]]

    def gradient(self, column_gradient: torch.Tensor) -> torch.Tensor:
        """The gradient ``[batch, n_atoms, 3]`` on the positions from one ``[3, batch, n_columns]`` on the columns."""
        _, batch, _ = column_gradient.shape
        if exact_matmul(column_gradient.dtype):
            rows = column_gradient.reshape(3 * batch, self.n_columns) @ self.matrix.T
            return rows.view(3, batch, self.n_atoms).permute(1, 2, 0)
        by_column = column_gradient.permute(1, 2, 0)
        total = torch.zeros(batch, self.n_atoms, 3, dtype=by_column.dtype, device=by_column.device)
        return total.index_add_(1, self.plus, by_column).index_add_(1, self.minus, by_column, alpha=-1)


class PairAtomMap:
    """Moves values between the two ends of every atom pair ``(i, j)`` and the atoms, for a batch.

    Pair values come stacked ``[batch, 2, n_pairs]``: row 0 belongs to atom i, row 1 to atom j.

    Parameters
    ----------
    i, j : torch.Tensor
        The pairs' atoms.
    n_atoms : int
    device, dtype
        Where the values live.
    """

    def __init__(self, i: torch.Tensor, j: torch.Tensor, n_atoms: int, device: torch.device, dtype: torch.dtype):
        self.ends = torch.cat([i, j]).long().to(device)
        self.n_atoms, self.n_pairs = n_atoms, len(i)
        self.one_hot = torch.nn.functional.one_hot(self.ends, n_atoms).to(dtype)  # [2 n_pairs, n_atoms]

    def to_atoms(self, stacked: torch.Tensor) -> torch.Tensor:
        """``[batch, n_atoms]``: for each atom the sum of the pair values ``[batch, 2, n_pairs]`` at its end."""
        flat = stacked.reshape(stacked.shape[0], 2 * self.n_pairs)
        if exact_matmul(flat.dtype):
            return flat @ self.one_hot
        total = torch.zeros(flat.shape[0], self.n_atoms, dtype=flat.dtype, device=flat.device)
        return total.index_add_(1, self.ends, flat)

    def to_pairs(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Atom values ``[batch, n_atoms]`` at both ends of every pair, ``[batch, 2, n_pairs]`` (into ``out`` if given)."""
        shape = (values.shape[0], 2 * self.n_pairs)
        flat = None if out is None else out.view(shape)
        if exact_matmul(values.dtype):
            flat = torch.mm(values, self.one_hot.T, out=flat)
        else:
            flat = torch.index_select(values, 1, self.ends, out=flat)
        return flat.view(values.shape[0], 2, self.n_pairs)
