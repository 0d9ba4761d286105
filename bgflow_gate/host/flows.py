"""Normalizing-flow building blocks of the host, following bgflow's ``bgflow.nn.flow``.

Conventions (the same as bgflow's):

* A flow is a ``torch.nn.Module`` called as ``flow(*xs, inverse=False, **kwargs)``.
  It returns ``(*ys, dlogp)``: the transformed tensors followed by ``dlogp`` of shape
  ``[*batch, 1]``.
* ``dlogp`` is ``log|det J|`` of the map actually computed: ``log|det dy/dx|`` in the
  forward direction and ``log|det dx/dy|`` of the inverse map when ``inverse=True``.
  For a bijection the two directions' ``dlogp`` therefore add up to zero.
* Extra keyword arguments (for instance ``temperature=``, which bgflow's
  ``BoltzmannGenerator`` passes) are accepted by every flow and handed down to the
  blocks it contains.

Examples
--------
>>> import torch
>>> flow = SequentialFlow([SplitFlow(1), SwapFlow(), MergeFlow(3)])
>>> x = torch.arange(8.0).reshape(2, 4)
>>> y, dlogp = flow(x)
>>> y
tensor([[1., 2., 3., 0.],
        [5., 6., 7., 4.]])
>>> dlogp.shape
torch.Size([2, 1])
>>> x_back, _ = flow(y, inverse=True)
>>> torch.equal(x_back, x)
True
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import torch

from .energy import _is_int

__all__ = [
    "Flow",
    "SequentialFlow",
    "InverseFlow",
    "SplitFlow",
    "MergeFlow",
    "SwapFlow",
    "CouplingFlow",
    "Transformer",
    "AffineTransformer",
]

Conditioner = Callable[..., torch.Tensor]


def _zero_dlogp(x: torch.Tensor, n_batch_dims: int | None = None) -> torch.Tensor:
    """Zeros of shape ``[*batch, 1]`` where ``batch`` is the leading ``n_batch_dims`` of
    ``x`` (all but the last dimension by default)."""
    if n_batch_dims is None:
        n_batch_dims = x.dim() - 1
    return x.new_zeros((*x.shape[:n_batch_dims], 1))


# --------------------------------------------------------------------------------------
# base classes
# --------------------------------------------------------------------------------------


class Flow(torch.nn.Module):
    """Base class of all flows.

    Subclasses implement ``_forward(*xs, **kwargs)`` and ``_inverse(*xs, **kwargs)``,
    each returning ``(*ys, dlogp)`` with ``dlogp`` the log absolute Jacobian determinant
    of that direction, shaped ``[*batch, 1]``.
    """

    def _forward(self, *xs: torch.Tensor, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement _forward")

    def _inverse(self, *xs: torch.Tensor, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement _inverse")

    def forward(self, *xs: torch.Tensor, inverse: bool = False, **kwargs):
        """Transform the inputs in the forward or the inverse direction.

        Parameters
        ----------
        xs : torch.Tensor
            The input tensor(s).
        inverse : bool
            ``False`` for the forward map, ``True`` for the inverse map.
        **kwargs
            Passed on to ``_forward`` / ``_inverse`` (e.g. ``temperature``).

        Returns
        -------
        tuple
            ``(*ys, dlogp)``: the output tensor(s), then ``log|det J|`` of the computed
            map, shaped ``[*batch, 1]``.
        """
        if inverse:
            return self._inverse(*xs, **kwargs)
        return self._forward(*xs, **kwargs)


class InverseFlow(Flow):
    """The inverse of another flow: its forward is the delegate's inverse and vice versa.

    Parameters
    ----------
    delegate : Flow
        The flow to invert.
    """

    def __init__(self, delegate: Flow):
        super().__init__()
        self._delegate = delegate

    def _forward(self, *xs: torch.Tensor, **kwargs):
        return self._delegate._inverse(*xs, **kwargs)

    def _inverse(self, *xs: torch.Tensor, **kwargs):
        return self._delegate._forward(*xs, **kwargs)


class SequentialFlow(Flow):
    """A stack of flows applied one after the other.

    The forward direction runs the blocks in order, the inverse direction runs their
    inverses in reverse order; the blocks' ``dlogp`` are summed.

    Parameters
    ----------
    blocks : iterable of Flow
        The blocks, in forward order.
    """

    def __init__(self, blocks: Iterable[Flow]):
        super().__init__()
        self._blocks = torch.nn.ModuleList(blocks)

    def _run(self, xs: Sequence[torch.Tensor], inverse: bool, kwargs: dict):
        blocks = reversed(self._blocks) if inverse else self._blocks
        dlogp = None
        for block in blocks:
            *xs, block_dlogp = block(*xs, inverse=inverse, **kwargs)
            dlogp = block_dlogp if dlogp is None else dlogp + block_dlogp
        if dlogp is None:
            dlogp = _zero_dlogp(xs[0])
        return (*xs, dlogp)

    def _forward(self, *xs: torch.Tensor, **kwargs):
        return self._run(xs, inverse=False, kwargs=kwargs)

    def _inverse(self, *xs: torch.Tensor, **kwargs):
        return self._run(xs, inverse=True, kwargs=kwargs)

    def trigger(self, function_name: str) -> torch.Tensor:
        """Call the method ``function_name()`` on every block that has one.

        Parameters
        ----------
        function_name : str
            Name of a method taking no arguments.

        Returns
        -------
        torch.Tensor
            The results stacked along a new first dimension, or an empty tensor if no
            block has such a method or any of them returned ``None``.
        """
        results = []
        for block in self._blocks:
            method = getattr(block, function_name, None)
            if callable(method):
                results.append(method())
        if not results or any(r is None for r in results):
            return torch.zeros(0)
        return torch.stack(results)

    def __iter__(self):
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, index: int | slice | Sequence[int]):
        """A single block for an integer index, a new ``SequentialFlow`` (sharing the
        blocks) for a slice or a sequence of integers."""
        if _is_int(index):
            return self._blocks[index]
        if isinstance(index, slice):
            return SequentialFlow(list(self._blocks)[index])
        if isinstance(index, Sequence) and all(_is_int(i) for i in index):
            return SequentialFlow([self._blocks[i] for i in index])
        raise TypeError(
            f"SequentialFlow indices must be integers, slices or lists of integers; "
            f"got {index!r}"
        )


# --------------------------------------------------------------------------------------
# splitting, merging and swapping
# --------------------------------------------------------------------------------------


def _is_index_list(item) -> bool:
    if isinstance(item, torch.Tensor):
        return item.dim() == 1
    if hasattr(item, "tolist") and hasattr(item, "ndim"):  # numpy arrays
        return item.ndim == 1
    return isinstance(item, Sequence) and not isinstance(item, str)


def _as_int_list(item) -> list[int]:
    values = item.tolist() if hasattr(item, "tolist") else list(item)
    if not all(_is_int(v) and v >= 0 for v in values):
        raise ValueError(f"split indices must be non-negative integers; got {values!r}")
    return values


def _parse_split_indices(items: Sequence) -> list[list[int]]:
    """Check that index lists are disjoint and together cover ``0 .. n-1``."""
    index_lists = [_as_int_list(item) for item in items]
    seen: set[int] = set()
    for indices in index_lists:
        overlap = seen.intersection(indices)
        if overlap or len(set(indices)) != len(indices):
            repeated = sorted(overlap) or sorted({i for i in indices if indices.count(i) > 1})
            raise ValueError(
                f"split indices must not overlap; index(es) {repeated} occur more than once"
            )
        seen.update(indices)
    last = max(seen, default=-1)
    missing = sorted(set(range(last + 1)) - seen)
    if missing:
        raise ValueError(f"split indices must cover 0 .. {last} without gaps; missing {missing}")
    return index_lists


def _zeros_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zeros shaped like ``x`` with dimension ``dim`` reduced to 1 (a split's ``dlogp``)."""
    shape = list(x.shape)
    shape[dim] = 1
    return x.new_zeros(shape)


class SplitFlow(Flow):
    """Split one tensor into several along a dimension (the inverse concatenates).

    Parameters
    ----------
    *sizes_or_indices : int or sequence of int
        Either the sizes of the pieces along ``dim``, or one list of indices (positions
        along ``dim``) per piece. Sizes may leave out the last piece, whose size is then
        whatever remains of the input. Index lists must be disjoint and together cover
        ``0 .. n-1``; each piece takes the input's entries at its indices, in the order
        given.
    dim : int
        The dimension along which to split.

    Raises
    ------
    ValueError
        At construction, if no sizes are given, sizes and index lists are mixed, sizes
        are negative, or index lists overlap or leave gaps. When called, if the sizes add
        up to more than the input's length along ``dim``, or the index lists do not
        match that length.

    Notes
    -----
    Splitting is a permutation of the coordinates, so ``dlogp`` is zero. Its shape is
    bgflow's: the input's shape with the split dimension reduced to 1 (``[*batch, 1]``
    along the last dimension; ``[1, 4]`` for a ``[3, 4]`` input split along ``dim=0``).
    """

    def __init__(self, *sizes_or_indices: int | Sequence[int], dim: int = -1):
        super().__init__()
        if len(sizes_or_indices) == 0:
            raise ValueError("SplitFlow needs at least one size or one list of indices")
        is_list = [_is_index_list(item) for item in sizes_or_indices]
        if all(is_list):
            self._sizes = None
            self._indices = _parse_split_indices(sizes_or_indices)
            order = [i for indices in self._indices for i in indices]
            self.register_buffer("_order", torch.tensor(order, dtype=torch.long), persistent=False)
            self.register_buffer(
                "_inverse_order", torch.argsort(self._order), persistent=False
            )
        elif not any(is_list):
            if not all(_is_int(s) and s >= 0 for s in sizes_or_indices):
                raise ValueError(
                    f"split sizes must be non-negative integers; got {sizes_or_indices!r}"
                )
            self._sizes = list(sizes_or_indices)
            self._indices = None
        else:
            raise ValueError(
                "SplitFlow takes either sizes (integers) or index lists, not a mixture; "
                f"got {sizes_or_indices!r}"
            )
        if not _is_int(dim):
            raise ValueError(f"dim must be an integer; got {dim!r}")
        self._split_dim = dim

    def _dim(self, x: torch.Tensor) -> int:
        if not -x.dim() <= self._split_dim < x.dim():
            raise ValueError(
                f"cannot split along dim {self._split_dim}: the input has only "
                f"{x.dim()} dimension(s)"
            )
        return self._split_dim % x.dim()

    def _piece_sizes(self, length: int) -> list[int]:
        if self._indices is not None:
            sizes = [len(indices) for indices in self._indices]
            if sum(sizes) != length:
                raise ValueError(
                    f"the split indices cover {sum(sizes)} entries, but the input has "
                    f"{length} along dim {self._split_dim}"
                )
            return sizes
        remainder = length - sum(self._sizes)
        if remainder < 0:
            raise ValueError(
                f"cannot split {length} entries along dim {self._split_dim} into sizes "
                f"{self._sizes}: the sizes add up to {sum(self._sizes)}"
            )
        return self._sizes + [remainder] if remainder > 0 else list(self._sizes)

    def _forward(self, x: torch.Tensor, **kwargs):
        dim = self._dim(x)
        sizes = self._piece_sizes(x.shape[dim])
        if self._indices is not None:
            x = x.index_select(dim, self._order.to(x.device))
        pieces = torch.split(x, sizes, dim=dim)
        return (*pieces, _zeros_along(x, dim))

    def _inverse(self, *xs: torch.Tensor, **kwargs):
        dim = self._dim(xs[0])
        y = torch.cat(xs, dim=dim)
        if self._indices is not None:
            self._piece_sizes(y.shape[dim])
            y = y.index_select(dim, self._inverse_order.to(y.device))
        return y, _zeros_along(y, dim)


class MergeFlow(InverseFlow):
    """Concatenate several tensors into one; the inverse of :class:`SplitFlow`.

    Parameters
    ----------
    *sizes : int or sequence of int
        As for :class:`SplitFlow` (sizes or index lists); they describe how the merged
        tensor splits back into the inputs.
    dim : int
        The dimension along which to concatenate.
    """

    def __init__(self, *sizes: int | Sequence[int], dim: int = -1):
        super().__init__(SplitFlow(*sizes, dim=dim))


class SwapFlow(Flow):
    """Exchange the first two inputs; any further inputs are passed through.

    Warns (and returns the input unchanged) when called with a single tensor.
    """

    @staticmethod
    def _swap(xs: Sequence[torch.Tensor]):
        dlogp = _zero_dlogp(xs[0])
        if len(xs) < 2:
            warnings.warn("applying swapping on a single tensor has no effect", UserWarning)
            return (*xs, dlogp)
        return (xs[1], xs[0], *xs[2:], dlogp)

    def _forward(self, *xs: torch.Tensor, **kwargs):
        return self._swap(xs)

    def _inverse(self, *xs: torch.Tensor, **kwargs):
        return self._swap(xs)


# --------------------------------------------------------------------------------------
# coupling layers and transformers
# --------------------------------------------------------------------------------------


def _index_tuple(indices: Iterable[int], name: str) -> tuple[int, ...]:
    try:
        values = tuple(indices)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of input indices; got {indices!r}") from None
    if not values or not all(_is_int(i) and i >= 0 for i in values):
        raise ValueError(
            f"{name} must be a non-empty sequence of non-negative integers; got {indices!r}"
        )
    return values


class CouplingFlow(Flow):
    """A coupling layer: transform some inputs conditioned on others.

    The inputs at ``cond_indices`` are concatenated along ``cat_dim`` into the
    conditioner input ``x``; those at ``transformed_indices`` are concatenated into
    ``y``. The transformer maps ``y`` to ``y'`` given ``x``; ``y'`` is split back into
    pieces of the original sizes, which replace the transformed inputs. All other inputs
    pass through unchanged.

    Parameters
    ----------
    transformer : Transformer
        Called as ``transformer(x, y, inverse=..., **kwargs)``, returning ``(y', dlogp)``.
    transformed_indices : sequence of int
        Positions of the inputs that are transformed.
    cond_indices : sequence of int
        Positions of the inputs that the transformation is conditioned on.
    cat_dim : int
        Dimension along which inputs are concatenated.

    Raises
    ------
    ValueError
        If an input is both transformed and conditioned on, or an index set is empty.
    """

    def __init__(
        self,
        transformer: "Transformer",
        transformed_indices: Sequence[int] = (1,),
        cond_indices: Sequence[int] = (0,),
        cat_dim: int = -1,
    ):
        super().__init__()
        self.transformer = transformer
        self.transformed_indices = _index_tuple(transformed_indices, "transformed_indices")
        self.cond_indices = _index_tuple(cond_indices, "cond_indices")
        both = sorted(set(self.transformed_indices) & set(self.cond_indices))
        if both:
            raise ValueError(
                f"input(s) {both} cannot be both transformed and conditioned on"
            )
        self.cat_dim = cat_dim

    def _couple(self, xs: Sequence[torch.Tensor], inverse: bool, kwargs: dict):
        largest = max(self.transformed_indices + self.cond_indices)
        if largest >= len(xs):
            raise ValueError(
                f"CouplingFlow uses input {largest}, but was called with {len(xs)} input(s)"
            )
        transformed = [xs[i] for i in self.transformed_indices]
        lengths = [t.shape[self.cat_dim] for t in transformed]
        x = torch.cat([xs[i] for i in self.cond_indices], dim=self.cat_dim)
        y = torch.cat(transformed, dim=self.cat_dim)
        y, dlogp = self.transformer(x, y, inverse=inverse, **kwargs)
        outputs = list(xs)
        for i, piece in zip(self.transformed_indices, torch.split(y, lengths, self.cat_dim)):
            outputs[i] = piece
        return (*outputs, dlogp)

    def _forward(self, *xs: torch.Tensor, **kwargs):
        return self._couple(xs, inverse=False, kwargs=kwargs)

    def _inverse(self, *xs: torch.Tensor, **kwargs):
        return self._couple(xs, inverse=True, kwargs=kwargs)


class Transformer(Flow):
    """Base class of transformers: invertible maps of ``y`` conditioned on ``x``.

    Subclasses implement ``_forward(x, y, *cond, **kwargs)`` and
    ``_inverse(x, y, *cond, **kwargs)``, each returning ``(y', dlogp)`` where ``x`` is the
    conditioner input, ``y`` the transformed input and ``dlogp`` is ``log|det dy'/dy|``
    shaped ``[*batch, 1]``.
    """

    def _forward(self, x: torch.Tensor, y: torch.Tensor, *cond: torch.Tensor, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement _forward")

    def _inverse(self, x: torch.Tensor, y: torch.Tensor, *cond: torch.Tensor, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement _inverse")


def _wrap_unit_interval(y: torch.Tensor) -> torch.Tensor:
    """``y mod 1``, guaranteed to lie in ``[0, 1)`` (a tiny negative ``y`` would
    otherwise round to exactly 1)."""
    wrapped = torch.remainder(y, 1.0)
    return torch.where(wrapped >= 1.0, wrapped - 1.0, wrapped)


class AffineTransformer(Transformer):
    """Affine (RealNVP / NICE) transformer ``y' = exp(log_sigma(x)) * y + mu(x)``.

    Parameters
    ----------
    shift_transformation : callable, optional
        Network computing the shift ``mu`` from ``(x, *cond)``; output width must equal
        the width of ``y``. ``None`` means no shift.
    scale_transformation : callable, optional
        Network computing the raw log-scale from ``(x, *cond)``. The log-scale used is
        ``tanh(raw) * exp(log_alpha)`` with a learned scalar ``log_alpha``. ``None``
        means no scaling (a volume-preserving, NICE-style shift).
    init_downscale : float
        Initial value of ``-log_alpha``; larger values start closer to the identity.
    preserve_volume : bool
        Subtract the mean of the log-scale over the last dimension, so that the map
        preserves volume (``dlogp`` is zero) while still rescaling individual entries.
    is_circular : bool
        Treat ``y`` as periodic on ``[0, 1)``: only a shift is allowed and results are
        taken modulo 1.

    Raises
    ------
    ValueError
        If ``is_circular`` is combined with a ``scale_transformation``, or a network's
        output width does not match ``y``.
    """

    def __init__(
        self,
        shift_transformation: Conditioner | None = None,
        scale_transformation: Conditioner | None = None,
        init_downscale: float = 1.0,
        preserve_volume: bool = False,
        is_circular: bool = False,
    ):
        if is_circular and scale_transformation is not None:
            raise ValueError(
                "a circular AffineTransformer can only shift: scaling is not compatible "
                "with periodicity (pass scale_transformation=None)"
            )
        super().__init__()
        self._shift_transformation = shift_transformation
        self._scale_transformation = scale_transformation
        self._log_alpha = torch.nn.Parameter(torch.full((1,), -float(init_downscale)))
        self._preserve_volume = preserve_volume
        self._is_circular = is_circular

    @staticmethod
    def _check_width(name: str, value: torch.Tensor, y: torch.Tensor) -> None:
        if value.shape[-1] != y.shape[-1]:
            raise ValueError(
                f"the {name} network returned width {value.shape[-1]}, but the transformed "
                f"input has width {y.shape[-1]}"
            )

    def _shift(self, x: torch.Tensor, y: torch.Tensor, cond) -> torch.Tensor:
        if self._shift_transformation is None:
            return torch.zeros_like(y)
        mu = self._shift_transformation(x, *cond)
        self._check_width("shift", mu, y)
        return mu

    def _log_scale(self, x: torch.Tensor, y: torch.Tensor, cond) -> torch.Tensor:
        if self._scale_transformation is None:
            return torch.zeros_like(y)
        raw = self._scale_transformation(x, *cond)
        self._check_width("scale", raw, y)
        log_sigma = torch.tanh(raw) * torch.exp(self._log_alpha.to(raw))
        if self._preserve_volume:
            log_sigma = log_sigma - log_sigma.mean(dim=-1, keepdim=True)
        return log_sigma

    def _forward(self, x: torch.Tensor, y: torch.Tensor, *cond: torch.Tensor, **kwargs):
        mu = self._shift(x, y, cond)
        log_sigma = self._log_scale(x, y, cond)
        out = torch.exp(log_sigma) * y + mu
        if self._is_circular:
            out = _wrap_unit_interval(out)
        return out, log_sigma.sum(dim=-1, keepdim=True)

    def _inverse(self, x: torch.Tensor, y: torch.Tensor, *cond: torch.Tensor, **kwargs):
        mu = self._shift(x, y, cond)
        log_sigma = self._log_scale(x, y, cond)
        out = torch.exp(-log_sigma) * (y - mu)
        if self._is_circular:
            out = _wrap_unit_interval(out)
        return out, -log_sigma.sum(dim=-1, keepdim=True)
