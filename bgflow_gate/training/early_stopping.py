"""Early stopping on held-out data: an ``on_epoch_end`` callback of the trainer.

Training by likelihood on a few thousand MD frames overfits: the training NLL keeps falling
while the NLL of held-out frames turns and rises (alanine dipeptide, 6,400 frames: best after
~500 iterations, 15 nats worse after 3,000). :class:`EarlyStopping` measures the held-out NLL
after every epoch, keeps the best weights (in memory and, with ``path``, on disk, so a resumed
run carries on from the same best), and stops the training ``patience`` epochs after the best.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from .checkpoint import write_atomically

__all__ = ["EarlyStopping"]


class EarlyStopping:
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
        self.data, self.patience, self.chunk, self.write = data, patience, chunk, write
        self.path = None if path is None else Path(path)
        self.best, self.best_epoch, self.state = math.inf, -1, None
        if self.path is not None and self.path.exists():
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
            self.best, self.best_epoch, self.state = saved["value"], saved["epoch"], saved["state"]

    def held_out_nll(self, generator) -> float:
        """The generator's mean NLL over the held-out data."""
        with torch.no_grad():
            total = sum(float(generator.energy(self.data[i:i + self.chunk]).sum())
                        for i in range(0, len(self.data), self.chunk))
        return total / len(self.data)

    def __call__(self, trainer, record: dict) -> bool:
        """Measure after epoch ``record["epoch"]``; ``False`` (stop) ``patience`` epochs after the best."""
        value = self.held_out_nll(trainer.bg)
        if value < self.best:
            flow = _bare(trainer.bg.flow)
            self.best, self.best_epoch = value, record["epoch"]
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in flow.state_dict().items()})
            if self.path is not None and self.write:
                write_atomically({"value": value, "epoch": self.best_epoch, "state": self.state}, self.path)
        return record["epoch"] - self.best_epoch < self.patience

    def restore(self, generator) -> None:
        """Load the best weights into ``generator``'s flow (nothing if nothing was measured)."""
        if self.state is not None:
            _bare(generator.flow).load_state_dict(self.state)


def _bare(flow):
    """The flow inside a ``DistributedDataParallel`` wrapper, or the flow itself."""
    return getattr(flow, "module", flow)
