"""The host's ``Energy`` base class, following bgflow's ``Energy`` conventions.

An energy is a ``torch.nn.Module`` defined over events of a fixed shape. Inputs carry
any number of leading batch dimensions; ``energy`` returns a tensor shaped
``[*batch, 1]`` and divides the model's energy by ``temperature``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

__all__ = ["Energy", "DoubleWellEnergy"]

Dim = int | Sequence[int] | Sequence[Sequence[int]]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_event_shapes(dim: Dim) -> list[torch.Size]:
    """Turn bgflow's ``dim`` argument into a list of event shapes."""
    if _is_int(dim):
        return [torch.Size([dim])]
    if isinstance(dim, Sequence) and len(dim) > 0:
        if all(_is_int(d) for d in dim):
            return [torch.Size(dim)]
        if all(
            isinstance(d, Sequence) and len(d) > 0 and all(_is_int(e) for e in d)
            for d in dim
        ):
            return [torch.Size(d) for d in dim]
    raise ValueError(
        f"dim must be an integer, a non-empty list of integers, or a non-empty list of "
        f"non-empty lists of integers (one event shape per input); got {dim!r}"
    )


class Energy(torch.nn.Module):
    """Base class of energy models.

    Parameters
    ----------
    dim : int or sequence of int or sequence of sequences of int
        The event shape: an integer ``D`` for vector states ``[..., D]``, a list
        ``[D1, ..., Dn]`` for tensor states, or a list of such lists for states made of
        several tensors ``(x1, x2, ...)``.

    Notes
    -----
    Subclasses implement ``_energy(*xs)`` returning ``[*batch, 1]`` at temperature 1.
    """

    def __init__(self, dim: Dim, **kwargs):
        super().__init__(**kwargs)
        self._event_shapes = _parse_event_shapes(dim)

    @property
    def event_shapes(self) -> list[torch.Size]:
        """The event shape of every input."""
        return self._event_shapes

    @property
    def event_shape(self) -> torch.Size:
        """The event shape of the single input (error for multi-input energies)."""
        if len(self._event_shapes) > 1:
            raise ValueError(
                "this energy takes several inputs, so it has no single event shape; "
                "use event_shapes"
            )
        return self._event_shapes[0]

    @property
    def dim(self) -> int:
        """Number of degrees of freedom of the single input event."""
        shape = self.event_shape
        if len(shape) > 1:
            warnings.warn(
                "this energy is defined on multidimensional events; dim is the product of "
                "event_shape",
                UserWarning,
            )
        n = 1
        for s in shape:
            n *= s
        return n

    def _energy(self, *xs: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _energy")

    def _check_inputs(self, xs: Sequence[torch.Tensor]) -> None:
        if len(xs) != len(self._event_shapes):
            raise ValueError(
                f"{type(self).__name__} expects {len(self._event_shapes)} input tensor(s), "
                f"got {len(xs)}"
            )
        batch_shape = None
        for i, (x, shape) in enumerate(zip(xs, self._event_shapes)):
            n = len(shape)
            if x.dim() < n or tuple(x.shape[x.dim() - n:]) != tuple(shape):
                raise ValueError(
                    f"input {i} has shape {tuple(x.shape)}; its trailing dimensions must be "
                    f"the event shape {tuple(shape)}"
                )
            this_batch = tuple(x.shape[: x.dim() - n])
            if batch_shape is None:
                batch_shape = this_batch
            elif this_batch != batch_shape:
                raise ValueError(
                    f"input {i} has batch shape {this_batch}, input 0 has {batch_shape}"
                )

    def energy(self, *xs: torch.Tensor, temperature: float = 1.0, **kwargs) -> torch.Tensor:
        """Energy of a batch, divided by ``temperature``; shape ``[*batch, 1]``."""
        self._check_inputs(xs)
        energy = self._energy(*xs, **kwargs)
        return energy if temperature == 1.0 else energy / temperature  # x / 1 is x: one operation less

    def force(
        self,
        *xs: torch.Tensor,
        temperature: float = 1.0,
        ignore_indices: Sequence[int] | None = None,
        no_grad: bool | Sequence[int] = False,
        **kwargs,
    ):
        """Forces ``-dE/dx`` for every input.

        Parameters
        ----------
        xs : torch.Tensor
            The input tensor(s).
        temperature : float
            Temperature the energy is divided by.
        ignore_indices : sequence of int, optional
            Inputs for which no force is computed (``None`` is returned in their place).
        no_grad : bool or sequence of int
            ``True`` to return forces without a graph (no higher-order gradients), or the
            indices of the inputs whose forces are returned without a graph.

        Returns
        -------
        torch.Tensor or tuple
            One force per input, shaped like the input; a single tensor when the energy
            has one input.
        """
        ignore = set(ignore_indices or ())
        with torch.enable_grad():
            leaves = [
                x if i in ignore else x.detach().requires_grad_(True)
                for i, x in enumerate(xs)
            ]
            energy = self.energy(*leaves, temperature=temperature, **kwargs).sum()
            wanted = [i for i in range(len(xs)) if i not in ignore]
            forces: list = [None] * len(xs)
            for i in wanted:
                keep_graph = (not no_grad) if isinstance(no_grad, bool) else i not in no_grad
                (grad,) = torch.autograd.grad(
                    energy, leaves[i], create_graph=keep_graph, retain_graph=True
                )
                forces[i] = -grad
        if len(self._event_shapes) == 1:
            return forces[0]
        return tuple(forces)


class DoubleWellEnergy(Energy):
    """A double well in the first coordinate, harmonic in the others.

    ``E(x) = a x0 + b x0^2 + c x0^4 + 1/2 sum_{i>0} x_i^2`` (defaults a=0, b=-4, c=1).
    """

    def __init__(self, dim: int, a: float = 0.0, b: float = -4.0, c: float = 1.0):
        super().__init__(dim)
        self._a, self._b, self._c = a, b, c

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        d = x[..., :1]
        rest = x[..., 1:]
        return self._a * d + self._b * d.pow(2) + self._c * d.pow(4) + 0.5 * rest.pow(2).sum(-1, keepdim=True)
