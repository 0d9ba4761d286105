"""Checkpoint files and the random state a resumed run needs to continue exactly."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import plain_state_dict, wrapped_state_dict
from .ledger import EpochLedger

__all__ = ["FORMAT", "Resumable", "capture_rng", "restore_rng", "write_atomically", "read_checkpoint", "check_format"]

#: The layout of :meth:`ProgressiveKLTrainer.state_dict`; 2 since the trainer keeps the gate
#: apart from the generator (bgflow-gate 0.2).
FORMAT = 2


def capture_rng() -> dict[str, Any]:
    """The states of torch's (CPU and CUDA), NumPy's and Python's global generators."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global generators to a state from :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def write_atomically(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a run killed
    mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A trainer state from ``path``; a clear error for a missing file or another format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_format(state, str(path))
    return state


def check_format(state: Any, source: str = "the state") -> None:
    """Raise a ``ValueError`` naming the version when ``state`` is not of :data:`FORMAT`."""
    found = state.get("format", 1) if isinstance(state, dict) else None
    if found == FORMAT:
        return
    if found == 1:
        raise ValueError(
            f"{source} was written by bgflow-gate 0.1 (checkpoint format 1, the gate stored inside the "
            f"generator); this version reads format {FORMAT}. Resume it with bgflow-gate 0.1, or start a new "
            f"run from its weights: bg.load_state_dict(torch.load(path)['bg'], strict=False)"
        )
    raise ValueError(f"{source} is not a ProgressiveKLTrainer checkpoint (format {found!r}, expected {FORMAT})")


class Resumable:
    """The state of a :class:`~bgflow_gate.ProgressiveKLTrainer` (a mixin of it):
    ``state_dict()`` / ``load_state_dict()`` like ``torch.optim``, and atomic checkpoint
    files. Resuming continues the run exactly, mid-epoch too."""

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: model, optimizer, counters,
        history, monitor, losses, and per rank the data order, the random states and the
        gate's state with its running statistics.

        Under a process group this gathers every rank's part, so every rank must call it.
        The model's state has no DDP ``module.`` level, so it loads with or without DDP.
        """
        own = {
            "samplers": self.data.state_dict(),
            "rng": self._pending_rng or capture_rng(),
            "gate": None if self.gate is None else self.gate.get_extra_state(),
        }
        _, _, losses = self.reporter.losses() if self.iteration else ((), None, [])
        return {
            "format": FORMAT, "bg": plain_state_dict(self.bg), "optim": self.optim.state_dict(),
            "iteration": self.iteration, "iters_per_epoch": self.iters_per_epoch,
            "history": [dict(r) for r in self.history], "monitor": self.monitor.state_dict(),
            "epoch_counters": self.ledger.state_dict(),
            "losses": [[float(v) for v in series] for series in losses],
            "ranks": self.ranks.gather(own),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; a state of ``N`` ranks needs ``N`` ranks."""
        check_format(state)
        if len(state["ranks"]) != self.ranks.size:
            n = len(state["ranks"])
            raise ValueError(
                f"the checkpoint was written by {n} process(es) and this run has {self.ranks.size}; resume it "
                f"with the same number (torchrun --nproc_per_node={n}), or load only its weights: "
                f"bg.load_state_dict(torch.load(path)['bg'])"
            )
        own = state["ranks"][self.ranks.rank]
        self.bg.load_state_dict(wrapped_state_dict(self.bg, state["bg"]))
        self.optim.load_state_dict(state["optim"])
        self.iteration, self.iters_per_epoch = int(state["iteration"]), state["iters_per_epoch"]
        self.history = [dict(r) for r in state["history"]]
        self.monitor.load_state_dict(state["monitor"])
        self.reporter = type(self.reporter)(*self._labels())
        for row in zip(*state["losses"]):
            self.reporter.report(*[np.asarray(v) for v in row])
        if self.gate is not None and own["gate"] is not None:
            self.gate.set_extra_state(own["gate"])
        self.ledger = EpochLedger()  # a checkpoint may be taken mid-epoch
        self.ledger.load_state_dict(state["epoch_counters"])
        self.data.load_state_dict(own["samplers"])
        self._pending_rng = own["rng"]  # restored when training continues, after the samplers are built

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` to ``path`` atomically, so a run killed mid-write leaves
        the previous checkpoint intact. Under a process group every rank must call it: the
        ranks' parts are gathered, rank 0 writes, and all return once the file is in place."""
        path = Path(path)
        state = self.state_dict()
        self.ranks.on_main(lambda: write_atomically(state, path))
        return path

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint` (every rank reads it)."""
        self.load_state_dict(read_checkpoint(path))
