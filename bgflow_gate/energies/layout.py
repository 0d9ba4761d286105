"""The difference vectors a system's terms need, for a whole batch at once.

Every bond, angle leg, torsion leg and atom pair is a difference ``x[plus] - x[minus]`` of
two atoms. :class:`Layout` lists them as columns, per term, and computes each term's columns
for the whole batch as one matrix product with a fixed matrix of +1 / -1 entries (exact:
each column adds one coordinate and subtracts another; its gradient is a matrix product
too), or, where float32 matrix products may run in reduced
precision (``torch.get_float32_matmul_precision() != "highest"``: TF32 / bfloat16), as two
index selections.
"""

from __future__ import annotations

import torch

__all__ = ["Layout", "PairAtomMap", "exact_matmul"]


class Layout:
    """Columns of difference vectors, grouped into named segments (float64 on the CPU until :meth:`to`).

    Parameters
    ----------
    n_atoms : int
        Atoms in the system.
    segments : dict of str to (plus, minus)
        For each segment, the atoms whose positions are added and subtracted, two integer
        tensors of equal length.

    Examples
    --------
    >>> layout = Layout(3, {"bonds": (torch.tensor([1, 2]), torch.tensor([0, 1]))}).to("cpu", torch.float32)
    >>> x, y, z = layout(torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 2, 0]]]))["bonds"]
    >>> x, y
    (tensor([[1., 0.]]), tensor([[0., 2.]]))
    """

    def __init__(self, n_atoms: int, segments: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.n_atoms = n_atoms
        self.atoms = {name: (p.long(), m.long()) for name, (p, m) in segments.items()}
        self.matrices = {name: self._matrix(n_atoms, p, m) for name, (p, m) in self.atoms.items()}

    @staticmethod
    def _matrix(n_atoms: int, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(len(plus))
        matrix = torch.zeros(n_atoms, len(plus), dtype=torch.float64)
        matrix.index_put_((plus, columns), torch.ones(len(plus), dtype=torch.float64), accumulate=True)
        matrix.index_put_((minus, columns), -torch.ones(len(plus), dtype=torch.float64), accumulate=True)
        return matrix

    def to(self, device: torch.device, dtype: torch.dtype) -> "Layout":
        """A copy on ``device`` with the matrices in ``dtype``."""
        copy = object.__new__(Layout)
        copy.n_atoms = self.n_atoms
        copy.atoms = {name: (p.to(device), m.to(device)) for name, (p, m) in self.atoms.items()}
        copy.matrices = {name: m.to(device=device, dtype=dtype) for name, m in self.matrices.items()}
        return copy

    def __call__(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per segment, the x, y and z components ``[batch, n_columns]`` of its difference vectors.

        ``positions``: ``[batch, n_atoms, 3]``.
        """
        batch = positions.shape[0]
        if exact_matmul(positions.dtype):
            rows = positions.permute(2, 0, 1).reshape(3 * batch, self.n_atoms)
            return {name: (rows @ m).view(3, batch, -1).unbind(0) for name, m in self.matrices.items()}
        return {
            name: (positions.index_select(1, p) - positions.index_select(1, m)).permute(2, 0, 1).unbind(0)
            for name, (p, m) in self.atoms.items()
        }


def exact_matmul(dtype: torch.dtype) -> bool:
    """Whether matrix products in ``dtype`` run in full precision (float32 may use TF32 / bfloat16)."""
    return dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest"


class PairAtomMap:
    """Moves values between atom pairs ``(i, j)`` and atoms, for a batch.

    Parameters
    ----------
    i, j : torch.Tensor
        The pairs' atoms.
    n_atoms : int
    device, dtype
        Where the values live.
    """

    def __init__(self, i: torch.Tensor, j: torch.Tensor, n_atoms: int, device: torch.device, dtype: torch.dtype):
        self.i, self.j = i.to(device), j.to(device)
        self.n_atoms = n_atoms
        pairs = torch.arange(len(i), device=device)
        self.one_hot_i = torch.zeros(len(i), n_atoms, device=device, dtype=dtype).index_put_((pairs, self.i), torch.ones((), device=device, dtype=dtype))
        self.one_hot_j = torch.zeros(len(i), n_atoms, device=device, dtype=dtype).index_put_((pairs, self.j), torch.ones((), device=device, dtype=dtype))

    def to_atoms(self, at_i: torch.Tensor, at_j: torch.Tensor) -> torch.Tensor:
        """``[batch, n_atoms]``: for each atom the sum of ``at_i`` over its pairs as i and of ``at_j`` as j."""
        if exact_matmul(at_i.dtype):
            return at_i @ self.one_hot_i + at_j @ self.one_hot_j
        total = torch.zeros(at_i.shape[0], self.n_atoms, dtype=at_i.dtype, device=at_i.device)
        return total.index_add(1, self.i, at_i).index_add(1, self.j, at_j)

    def to_pairs(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Atom values ``[batch, n_atoms]`` at atoms i and j of every pair, ``[batch, n_pairs]`` each."""
        if exact_matmul(values.dtype):
            return values @ self.one_hot_i.T, values @ self.one_hot_j.T
        return values.index_select(1, self.i), values.index_select(1, self.j)
