"""Gradients of an iteration: the KL part kept apart from the NLL / custom part, combined
across ranks in one collective with the iteration's numbers, then merged into ``p.grad``."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..distributed import Ranks

__all__ = ["GradientSet", "split_gradients", "all_finite", "combine", "add_kl", "clip_total_norm", "total_norm"]


@dataclasses.dataclass
class GradientSet:
    """Per parameter: the KL gradient and the other (NLL + custom) gradient; ``None`` where absent."""

    kl: list
    other: list

    @classmethod
    def empty(cls, n: int) -> "GradientSet":
        return cls([None] * n, [None] * n)

    def scaled_kl(self, denominator: torch.Tensor) -> "GradientSet":
        """The KL sums' gradients turned into the mean's (divided by ``denominator``)."""
        return GradientSet([None if g is None else g / denominator for g in self.kl], self.other)


def split_gradients(params: list, kl_grads: Sequence | None) -> GradientSet:
    """The KL gradients (from ``autograd.grad``) and what ``backward`` left in ``p.grad``."""
    return GradientSet(list(kl_grads) if kl_grads is not None else [None] * len(params), [p.grad for p in params])


if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused kernel per device
    def total_norm(grads: list) -> torch.Tensor:
        """The 2-norm of all ``grads`` together (a tensor; nothing is read back)."""
        return torch.nn.utils.get_total_norm(grads)
else:  # pragma: no cover - older torch
    def total_norm(grads: list) -> torch.Tensor:
        """The 2-norm of all ``grads`` together (a tensor; nothing is read back)."""
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def all_finite(grads: list) -> torch.Tensor:
    """A bool tensor: every present gradient is finite (true when none is present)."""
    present = [g for g in grads if g is not None]
    if not present:
        return torch.ones((), dtype=torch.bool)
    return total_norm(present).isfinite()


def combine(ranks: Ranks, params: list, grads: GradientSet, numbers: torch.Tensor, layout) -> tuple[GradientSet, torch.Tensor]:
    """Sum the local results of all ranks in one collective (nothing in a single process).

    A gradient absent on every rank stays ``None``; the other gradients and the fields of
    ``layout.MEANS`` become means over ranks, the KL sums stay sums, and the fields of
    ``layout.FLAGS`` become 1 only if they are 1 on every rank.
    """
    if not ranks.distributed:
        return grads, numbers
    n = len(params)
    both = grads.kl + grads.other
    has = torch.tensor([g is not None for g in both], dtype=numbers.dtype, device=numbers.device)
    dense = [torch.zeros_like(p) if g is None else g for p, g in zip(params + params, both)]
    out = ranks.all_reduce(dense + [numbers, has])
    summed, numbers, has = out[: 2 * n], out[2 * n].clone(), out[2 * n + 1].tolist()
    kl = [g if h > 0 else None for g, h in zip(summed[:n], has[:n])]
    other = [g / ranks.size if h > 0 else None for g, h in zip(summed[n:], has[n:])]
    for name in layout.MEANS:
        numbers[layout._fields.index(name)] /= ranks.size
    for name in layout.FLAGS:
        i = layout._fields.index(name)
        numbers[i] = (numbers[i] > ranks.size - 0.5).to(numbers.dtype)
    return GradientSet(kl, other), numbers


def add_kl(params: list, grads: GradientSet, with_kl: bool) -> list:
    """Put each parameter's gradient in ``p.grad`` (the KL part only ``with_kl``); returns
    the gradients present."""
    present = []
    for p, g_kl, g in zip(params, grads.kl, grads.other):
        if with_kl and g_kl is not None:
            g = g_kl if g is None else g.add_(g_kl)  # in place: the other gradient is this step's own
        p.grad = g
        if g is not None:
            present.append(g)
    return present


def clip_total_norm(grads: list, max_norm: float) -> None:
    """Scale ``grads`` in place so that their total 2-norm is at most ``max_norm`` (on the
    device; nothing is read back)."""
    factor = (max_norm / (total_norm(grads) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
