"""Keeping the best epoch: ``on_epoch_end`` callbacks of the trainer.

Both measure one number after every epoch, keep the weights of the epoch where it was lowest
(in memory and, with ``path``, on disk, so a resumed run carries on from the same best), and
act when it gets worse:

* :class:`EarlyStopping` — the NLL of held-out data. Training by likelihood on a few thousand
  MD frames overfits: the training NLL keeps falling while the held-out NLL turns and rises
  (alanine dipeptide, 6,400 frames: best after ~500 iterations, 15 nats worse after 3,000). It
  stops the training ``patience`` epochs after the best.
* :class:`RollbackOnRise` — the epoch's mean KL loss (``record["kll"]``, ``-E_q[log w]`` up to a
  constant when no sample is gated). Reverse KL can leave a good optimum all at once: on alanine
  dipeptide the mixed stage's KL loss rose from 283.3 to 287.9 kT within four epochs and stayed
  there (a φ basin emptied). When the loss exceeds the best by ``tolerance`` it puts the best
  weights and optimiser state back and training goes on from there.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from .checkpoint import write_atomically

__all__ = ["EarlyStopping", "RollbackOnRise"]


class _BestEpoch:
    """The lowest value seen, its epoch and that epoch's state (stored at ``path`` if given)."""

    def __init__(self, path: str | Path | None, write: bool):
        self.path, self.write = (None if path is None else Path(path)), write
        self.best, self.best_epoch, self.state = math.inf, -1, None
        if self.path is not None and self.path.exists():
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
            self.best, self.best_epoch, self.state = saved["value"], saved["epoch"], saved["state"]

    def offer(self, value: float, epoch: int, state) -> bool:
        """Keep ``state()`` if ``value`` is a new best; whether it was."""
        if not value < self.best:
            return False
        self.best, self.best_epoch, self.state = value, epoch, copy.deepcopy(state())
        if self.path is not None and self.write:
            write_atomically({"value": value, "epoch": epoch, "state": self.state}, self.path)
        return True


def _flow_state(generator) -> dict:
    return {k: v.detach().cpu() for k, v in _bare(generator.flow).state_dict().items()}


class EarlyStopping(_BestEpoch):
    """Stop when the held-out NLL has not improved for ``patience`` epochs.

    Pass it as ``on_epoch_end`` to :meth:`ProgressiveKLTrainer.train`; afterwards call
    :meth:`restore` to put the best weights back.

    Parameters
    ----------
    data : torch.Tensor
        Held-out samples ``[n, ...]`` (never trained on), on the generator's device.
    patience : int
        Epochs without a better held-out NLL before training stops (at least 1).
    path : str or Path, optional
        Where the best weights, value and epoch are kept; an existing file is read, so a
        resumed training continues the same search.
    chunk : int
        Samples per forward pass when measuring.
    write : bool
        Whether this process writes ``path`` (in a process group: rank 0 only).
    """

    def __init__(self, data: torch.Tensor, patience: int, path: str | Path | None = None, chunk: int = 4096,
                 write: bool = True):
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be a whole number of epochs >= 1, got {patience!r}")
        if len(data) == 0:
            raise ValueError("early stopping needs held-out data; got none (give a non-zero test fraction)")
        super().__init__(path, write)
        self.data, self.patience, self.chunk = data, patience, chunk

    def held_out_nll(self, generator) -> float:
        """The generator's mean NLL over the held-out data."""
        with torch.no_grad():
            total = sum(float(generator.energy(self.data[i:i + self.chunk]).sum())
                        for i in range(0, len(self.data), self.chunk))
        return total / len(self.data)

    def __call__(self, trainer, record: dict) -> bool:
        """Measure after epoch ``record["epoch"]``; ``False`` (stop) ``patience`` epochs after the best."""
        self.offer(self.held_out_nll(trainer.bg), record["epoch"], lambda: _flow_state(trainer.bg))
        return not self.exhausted(record["epoch"])

    def exhausted(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` lies ``patience`` or more epochs after the best (a resumed
        training that already got there trains no further)."""
        return epoch - self.best_epoch >= self.patience

    def restore(self, generator) -> None:
        """Load the best weights into ``generator``'s flow (nothing if nothing was measured)."""
        if self.state is not None:
            _bare(generator.flow).load_state_dict(self.state)


class RollbackOnRise(_BestEpoch):
    """Go back to the epoch with the lowest KL loss when the loss rises ``tolerance`` above it.

    Parameters
    ----------
    tolerance : float
        How far (in the loss's unit, kT) an epoch's mean KL loss may exceed the best before
        the weights and the optimiser state of the best epoch are put back.
    start_epoch : int
        Epochs before this one are not compared (while the gate's E_max still falls, the
        loss of different epochs measures different things).
    path, write
        As in :class:`EarlyStopping`.

    A rollback is noted in the epoch's record (``actions``), counted in ``rollbacks`` and, when
    the trainer keeps checkpoints, written into the epoch's checkpoint again.
    """

    def __init__(self, tolerance: float, start_epoch: int = 0, path: str | Path | None = None, write: bool = True):
        if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and tolerance > 0):
            raise ValueError(f"tolerance must be a positive number (kT), got {tolerance!r}")
        super().__init__(path, write)
        self.tolerance, self.start_epoch, self.rollbacks = float(tolerance), int(start_epoch), 0

    def __call__(self, trainer, record: dict) -> bool:
        """Keep or roll back after epoch ``record["epoch"]``; never stops the training."""
        value, epoch = record["kll"], record["epoch"]
        if epoch < self.start_epoch or not math.isfinite(value):
            return True
        state = lambda: {"flow": _flow_state(trainer.bg), "optim": trainer.optim.state_dict()}  # noqa: E731
        if not self.offer(value, epoch, state) and value > self.best + self.tolerance:
            rates = [group["lr"] for group in trainer.optim.param_groups]
            _bare(trainer.bg.flow).load_state_dict(self.state["flow"])
            trainer.optim.load_state_dict(self.state["optim"])
            for group, rate in zip(trainer.optim.param_groups, rates):  # the schedule's rate goes on
                group["lr"] = rate
            self.rollbacks += 1
            record["actions"].append(f"rolled back to epoch {self.best_epoch}: KL loss {value:.4g} > best "
                                     f"{self.best:.4g} + {self.tolerance:g}")
            _checkpoint_again(trainer)
        return True


def _checkpoint_again(trainer) -> None:
    """The trainer wrote its epoch checkpoint before the callbacks ran; after a rollback it is
    written again, so a resumed run continues from the weights put back."""
    path = getattr(trainer, "checkpoint_path", None)
    if path is not None and getattr(trainer, "checkpoint_every", None):
        trainer.save_checkpoint(path)


def _bare(flow):
    """The flow inside a ``DistributedDataParallel`` wrapper, or the flow itself."""
    return getattr(flow, "module", flow)
