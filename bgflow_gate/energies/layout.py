"""All difference vectors a system's terms need, from one tensor operation.

Every bond, angle leg, torsion leg and atom pair is a difference ``x[plus] - x[minus]`` of
two atoms. :class:`Layout` lists them as columns and computes them for a whole batch at
once: as one matrix product with a fixed matrix of +1 / -1 entries (exact: each column adds
one coordinate and subtracts another), or, where float32 matrix products may run in reduced
precision (``torch.get_float32_matmul_precision() != "highest"``: TF32 / bfloat16), as two
index selections.
"""

from __future__ import annotations

import torch

__all__ = ["Layout"]


class Layout:
    """Columns of difference vectors, grouped into named segments.

    Parameters
    ----------
    n_atoms : int
        Atoms in the system.
    segments : dict of str to (plus, minus)
        For each segment, the atoms whose positions are added and subtracted, two integer
        tensors of equal length.

    Examples
    --------
    >>> layout = Layout(3, {"bonds": (torch.tensor([1, 2]), torch.tensor([0, 1]))})
    >>> x = torch.tensor([[0.0, 0, 0, 1, 0, 0, 1, 2, 0]], dtype=torch.float64)
    >>> layout(x.reshape(1, 3, 3))["bonds"][0].T
    tensor([[1., 0., 0.],
            [0., 2., 0.]], dtype=torch.float64)
    """

    def __init__(self, n_atoms: int, segments: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        plus = torch.cat([p for p, _ in segments.values()]).long()
        minus = torch.cat([m for _, m in segments.values()]).long()
        self.n_atoms = n_atoms
        self.plus, self.minus = plus, minus
        columns = torch.arange(len(plus))
        matrix = torch.zeros(n_atoms, len(plus), dtype=torch.float64)
        matrix.index_put_((plus, columns), torch.ones(len(plus), dtype=torch.float64), accumulate=True)
        matrix.index_put_((minus, columns), -torch.ones(len(plus), dtype=torch.float64), accumulate=True)
        self.matrix = matrix
        self.slices: dict[str, slice] = {}
        start = 0
        for name, (p, _) in segments.items():
            self.slices[name] = slice(start, start + len(p))
            start += len(p)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Layout":
        """A copy on ``device`` with the matrix in ``dtype``."""
        copy = object.__new__(Layout)
        copy.n_atoms, copy.slices = self.n_atoms, self.slices
        copy.plus, copy.minus = self.plus.to(device), self.minus.to(device)
        copy.matrix = self.matrix.to(device=device, dtype=dtype)
        return copy

    def __call__(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Difference vectors ``[batch, 3, n_columns]`` per segment, from ``[batch, n_atoms, 3]``."""
        exact_matmul = positions.dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest"
        if exact_matmul:
            vectors = positions.transpose(1, 2) @ self.matrix
        else:
            vectors = (positions.index_select(1, self.plus) - positions.index_select(1, self.minus)).transpose(1, 2)
        return {name: vectors[..., s] for name, s in self.slices.items()}
