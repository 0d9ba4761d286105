"""Evaluating a target safely: only finite coordinates reach it, a sample it raises for is
isolated from the rest of the batch, and gated samples pass no gradient back through it."""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch

__all__ = ["GuardedTarget", "guard_gradients", "check_coordinates", "as_batch", "finite_samples"]


class _EveryFailure(Exception):
    """Internal: the target raised for every sample of a (sub)batch."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _GateGradient(torch.autograd.Function):
    """Identity on the inputs whose backward zeroes the rows of gated samples.

    The gated rows are only known after the target ran, so they are handed over in a
    one-element list filled in later. ``masked_fill`` (not a product) removes NaN and inf
    that the target's backward produces for those rows.
    """

    @staticmethod
    def forward(ctx, gated_box: list, *xs: torch.Tensor):
        ctx.gated_box = gated_box
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        gated = ctx.gated_box[0] if ctx.gated_box else None
        if gated is None:
            return (None, *grads)
        out = []
        for g in grads:
            if g is None:
                out.append(None)
            else:
                rows = gated.view(-1, *([1] * (g.dim() - 1)))
                out.append(g.masked_fill(rows, 0.0))
        return (None, *out)


def guard_gradients(xs: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], list]:
    """``xs`` through an identity whose backward zeroes the rows of gated samples, and the
    one-element list to put the bool ``[n]`` gated mask in once it is known."""
    box: list = []
    return _GateGradient.apply(box, *xs), box


def finite_samples(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bool ``[n]``: the samples whose coordinates (every tensor of ``xs``, ``[n, ...]``) are
    all finite. ``x * 0`` is 0 where ``x`` is finite and NaN elsewhere, so a row's sum of it
    is 0 exactly for finite rows: three operations per tensor (``isfinite().all()`` takes six)."""
    rows = None
    for x in xs:
        ok = (x * 0).flatten(1).sum(1).eq(0)
        rows = ok if rows is None else rows & ok
    return rows


class GuardedTarget:
    """Calls ``target.energy`` on the finite samples of a batch, isolating failures.

    Parameters
    ----------
    target : bgflow.Energy
    """

    def __init__(self, target: Any):
        self.target = target
        self.warned = False  # the first target error is warned about, later ones only counted

    def energies(self, xs: list[torch.Tensor], n: int, kwargs: dict):
        """The target's energies ``[n, 1]`` (NaN where it was not called), the samples it
        raised for and the samples with finite coordinates (``None`` for "none" / "all").

        The target only sees finite coordinates: one value is read back to the host to
        know whether the whole batch can go in one piece -- unless the target declares
        ``accepts_nonfinite = True`` (it returns a non-finite energy and a zero gradient for
        such rows, as :class:`~bgflow_gate.TorchEnergy` does): then the whole batch goes to it
        and nothing is read back, so a GPU is never synchronised.
        """
        finite_rows = finite_samples(xs)
        if getattr(self.target, "accepts_nonfinite", False):
            raw, errors = self.evaluate(xs, kwargs)
            return raw, errors, finite_rows
        if n == 0 or bool(finite_rows.all()):  # the one host read
            raw, errors = self.evaluate(xs, kwargs)
            return raw, errors, None
        first = xs[0]
        idx = torch.nonzero(finite_rows).squeeze(1)
        raw = torch.full((n, 1), math.nan, dtype=first.dtype, device=first.device)
        errors = None
        if idx.numel():
            sub, sub_errors = self.evaluate([x.index_select(0, idx) for x in xs], kwargs)
            raw = raw.index_copy(0, idx, sub)
            if sub_errors is not None:
                errors = torch.zeros(n, dtype=torch.bool, device=first.device).index_copy(0, idx, sub_errors)
        return raw, errors, finite_rows

    def evaluate(
        self, xs: Sequence[torch.Tensor], kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target energies ``[m, 1]`` and a bool ``[m]`` marking the samples the target raised
        for (``None`` when it raised for none).

        A batch the target raises for is split in halves until the failing samples are
        isolated, so the rest keep their energies. A target that raises for every sample
        (a bug rather than a bad configuration) or for an empty batch re-raises.
        """
        try:
            return self._isolating(xs, kwargs)
        except _EveryFailure as failure:
            raise failure.error

    def _isolating(self, xs, kwargs):
        m = xs[0].shape[0]
        try:
            energy = self.target.energy(*xs, **kwargs)
        except Exception as err:
            if m == 0:
                raise
            if m == 1:
                raise _EveryFailure(err) from err
            half = m // 2
            parts, failures = [], []
            for part in ([x[:half] for x in xs], [x[half:] for x in xs]):
                try:
                    parts.append(self._isolating(part, kwargs))
                except _EveryFailure as failure:
                    failures.append(failure)
                    n = part[0].shape[0]
                    nan = torch.full((n, 1), math.nan, dtype=xs[0].dtype, device=xs[0].device)
                    parts.append((nan, torch.ones(n, dtype=torch.bool, device=xs[0].device)))
            if len(failures) == 2:
                raise _EveryFailure(failures[0].error) from err
            if not self.warned:
                self.warned = True
                first = failures[0].error if failures else err
                warnings.warn(
                    f"the target raised {type(first).__name__}: {first} -- the samples it raised "
                    f"for are gated (reason TARGET_ERROR); later errors are only counted",
                    RuntimeWarning,
                    stacklevel=5,
                )
            errors = [
                e if e is not None else torch.zeros(len(r), dtype=torch.bool, device=r.device)
                for r, e in parts
            ]
            return torch.cat([r for r, _ in parts]), torch.cat(errors)
        if not isinstance(energy, torch.Tensor) or tuple(energy.shape) != (m, 1):
            shape = tuple(energy.shape) if isinstance(energy, torch.Tensor) else type(energy).__name__
            raise ValueError(
                f"the target's energy() returned {shape} for a batch of {m}; a bgflow "
                f"energy returns shape [batch, 1] = ({m}, 1)"
            )
        return energy.to(device=xs[0].device, dtype=xs[0].dtype), None


def check_coordinates(xs: Sequence[Any], event_shapes) -> None:
    """A clear error for inputs that are not batches of coordinates of ``event_shapes``."""
    for x, shape in zip(xs, event_shapes):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"coordinates must be torch tensors, got {type(x).__name__}; convert with torch.as_tensor(x)"
            )
        if not x.is_floating_point():
            raise TypeError(f"coordinates must be floating point, got {x.dtype}")
        if x.dim() <= len(shape) or tuple(x.shape[x.dim() - len(shape):]) != tuple(shape):
            raise ValueError(
                f"coordinates must have shape [batch, {', '.join(map(str, shape))}], got {tuple(x.shape)}; "
                f"a single configuration needs a batch dimension (x[None])"
            )


def as_batch(xs: Sequence[torch.Tensor], event_shapes) -> tuple[list[torch.Tensor], torch.Size]:
    """Checked coordinates as ``[n, *event_shape]`` tensors, and their batch shape."""
    first = xs[0]
    batch_shape = first.shape[: first.dim() - len(event_shapes[0])]
    return [x.reshape(-1, *shape) for x, shape in zip(xs, event_shapes)], batch_shape
