"""Skip policies: what gated samples do to the KL term of a batch.

A policy answers two questions, from numbers that (under a process group) are summed over
all ranks first, so every rank decides alike:

* :meth:`SkipPolicy.includes` -- which of a batch's samples enter the KL sum;
* :meth:`SkipPolicy.applies` -- whether the batch's KL term applies, and the count its sum
  is divided by.

``skips_step`` says whether a KL term that does not apply also skips the NLL step.
"""

from __future__ import annotations

import torch

from ..validation import check_fraction

__all__ = ["SkipPolicy", "DropGated", "SkipBatch", "SkipStep", "KeepGated", "SKIP_POLICIES", "skip_policy"]


class SkipPolicy:
    """Base class; subclasses set ``name`` and ``description``."""

    name = ""
    description = ""
    #: a KL term that does not apply skips the whole optimisation step, NLL included
    skips_step = False

    def includes(self, gated: torch.Tensor) -> torch.Tensor:
        """Bool ``[n]``: the samples that enter the KL sum (default: all)."""
        return torch.ones_like(gated)

    def applies(self, included: torch.Tensor, gated: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether the KL term applies (a bool tensor) and the divisor of its sum, from the
        counts of included and gated samples of the whole batch of ``total`` samples."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DropGated(SkipPolicy):
    """``"drop"``: gated samples leave the KL mean; the term is skipped when fewer than
    ``min_keep_fraction`` of the batch remain."""

    name = "drop"
    description = (
        "gated samples leave the KL mean; the KL term is skipped when fewer than "
        "min_keep_fraction of the batch remain"
    )

    def __init__(self, min_keep_fraction: float = 0.5):
        self.min_keep_fraction = check_fraction(min_keep_fraction, "min_keep_fraction")

    def includes(self, gated):
        return ~gated

    def applies(self, included, gated, total):
        ok = (included >= self.min_keep_fraction * total) & (included > 0)
        return ok, included.clamp(min=1)

    def __repr__(self) -> str:
        return f"DropGated(min_keep_fraction={self.min_keep_fraction:g})"


class SkipBatch(SkipPolicy):
    """``"batch"``: any gated sample skips the batch's KL term."""

    name = "batch"
    description = "any gated sample skips the batch's KL term"

    def applies(self, included, gated, total):
        return gated == 0, torch.full_like(included, float(total))


class SkipStep(SkipBatch):
    """``"step"``: any gated sample skips the whole optimisation step (the seed's failing
    semantics, kept to reproduce it)."""

    name = "step"
    description = (
        "any gated sample skips the whole optimisation step, NLL included "
        "(the original failing semantics; not recommended)"
    )
    skips_step = True


class KeepGated(SkipPolicy):
    """``"clamp"``: gated samples keep the gate's constant energy and their -log|det J|
    term, like bgflow's ``LinLogCutEnergy``; the term always applies."""

    name = "clamp"
    description = (
        "gated samples keep the gate's constant energy and their -log|det J| term "
        "(bgflow's LinLogCutEnergy behaviour)"
    )

    def applies(self, included, gated, total):
        return torch.ones_like(included, dtype=torch.bool), torch.full_like(included, float(total))


_POLICIES = {cls.name: cls for cls in (DropGated, SkipBatch, SkipStep, KeepGated)}

#: The skip policies and what they do with gated samples of a KL batch.
SKIP_POLICIES = {name: cls.description for name, cls in _POLICIES.items()}


def skip_policy(name: str, min_keep_fraction: float = 0.5) -> SkipPolicy:
    """The policy called ``name`` (``min_keep_fraction`` is used by ``"drop"``)."""
    if name not in _POLICIES:
        raise ValueError(f"skip_policy must be one of {', '.join(_POLICIES)}, got {name!r}")
    min_keep_fraction = check_fraction(min_keep_fraction, "min_keep_fraction")
    return DropGated(min_keep_fraction) if name == "drop" else _POLICIES[name]()
