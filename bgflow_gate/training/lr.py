"""The learning rate over a run: linear warm-up, and the schedulers stepped per iteration or per epoch."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from ..validation import check_number

__all__ = ["LinearWarmup", "step_iteration_schedulers", "step_epoch_schedulers"]


class LinearWarmup:
    """Scales the learning rate of iteration ``it`` by ``min(1, (it + 1) / (epochs * iters_per_epoch))``.

    The factor is applied to the optimiser's rates for one step only and taken back after
    it, so it multiplies whatever the schedulers set. ``epochs=0``: no warm-up.
    """

    def __init__(self, epochs: float = 0.0):
        self.epochs = check_number(epochs, "lr_warmup_epochs", "number of epochs", lower=0)

    def factor(self, iteration: int, iters_per_epoch: int) -> float:
        """The factor of ``iteration`` (1 after the warm-up)."""
        if self.epochs <= 0:
            return 1.0
        return min(1.0, (iteration + 1) / (self.epochs * iters_per_epoch))

    def step(self, optimizer, factor: float) -> None:
        """``optimizer.step()`` with every group's rate scaled by ``factor`` for this step."""
        if factor == 1.0:
            optimizer.step()
            return
        for group in optimizer.param_groups:
            group["lr"] *= factor
        try:
            optimizer.step()
        finally:
            for group in optimizer.param_groups:
                group["lr"] /= factor


def step_iteration_schedulers(schedulers: Iterable, iteration: int) -> None:
    """Step each ``(interval, scheduler)`` after the optimiser step of every ``interval``-th
    iteration (counted from 1), so the first rate is used for the first steps."""
    for interval, scheduler in schedulers:
        if (iteration + 1) % interval == 0:
            scheduler.step()


def step_epoch_schedulers(schedulers: Sequence, record: dict) -> None:
    """Step per-epoch schedulers; ``ReduceLROnPlateau`` on the epoch's KL loss (or its NLL)."""
    for scheduler in schedulers:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            metric = record["kll"] if math.isfinite(record["kll"]) else record["nll"]
            if math.isfinite(metric):
                scheduler.step(metric)
        else:
            scheduler.step()
