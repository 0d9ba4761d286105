"""Statistics of gated energies, accumulated on the tensors' device.

:class:`EnergyStatistics` counts gating decisions by reason and keeps the raw energies'
minimum, maximum and a fine histogram, all as tensors on the device the energies live
on. Updating it never reads a value back to the host, so a GPU run is not synchronised
per call; only reading the numbers out (:meth:`EnergyStatistics.summary`) copies them to
the host.

A quantile is the nearest-rank order statistic (``torch.quantile`` with
``interpolation="nearest"``), located in a histogram over the signed log
``sign(E) log10(1 + |E|)`` with :data:`BINS_PER_DECADE` bins per decade and clipped to the
exact minimum and maximum: its error is at most one bin, 1.2 % of ``1 + |E|``.

Updates are buffered (the tensors are kept, not copied) and folded into the counters in
batches, so a call costs a list append; the batched fold runs on the same device.
"""

from __future__ import annotations

import enum
import functools
import math
import warnings
from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "GateReason",
    "EnergyStatistics",
    "BINS_PER_DECADE",
    "SYMLOG_RANGE",
    "HISTORY_KEYS",
    "write_history",
    "TrainingHealthWarning",
    "HealthMonitor",
]

#: Histogram resolution of raw energies (bins per decade of ``log10(1 + |E|)``).
BINS_PER_DECADE = 200
#: Range of ``sign(E) log10(1 + |E|)`` covered by the histogram (|E| up to 1e24 kJ/mol);
#: values outside are counted in the edge bins, the exact extremes are kept separately.
SYMLOG_RANGE = (-24.0, 24.0)
_N_BINS = int(round((SYMLOG_RANGE[1] - SYMLOG_RANGE[0]) * BINS_PER_DECADE))


class GateReason(enum.IntEnum):
    """Why a sample was (or was not) gated; the codes stored in ``last_reasons``."""

    KEPT = 0
    #: raw energy above the current E_max
    OVER_E_MAX = 1
    #: the target returned NaN or +-inf
    NONFINITE_ENERGY = 2
    #: the input coordinates contained NaN or inf; the target was not called
    NONFINITE_COORDINATES = 3
    #: the target raised an exception for this sample
    TARGET_ERROR = 4


def _symexp(s: float) -> float:
    return math.copysign(10.0 ** abs(s) - 1.0, s)


class EnergyStatistics:
    """Running counts and raw-energy quantiles of a gate, kept on the energies' device.

    The tensors are created on the device of the first :meth:`update` and follow later
    updates if those come from another device.
    """

    #: Buffered samples at which :meth:`update` folds the buffer into the accumulators.
    FOLD_AT = 1 << 20
    #: Buffered calls at which it folds (many small calls would otherwise pile up).
    FOLD_CALLS = 256

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0
        self._counts: Optional[torch.Tensor] = None  # int64 [len(GateReason)]
        self._hist: Optional[torch.Tensor] = None  # int64 [_N_BINS], finite energies
        self._extremes: Optional[torch.Tensor] = None  # float64 [2]: min, max of finite
        self._pending: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self._pending_samples = 0

    @property
    def device(self) -> Optional[torch.device]:
        """Where the accumulators live (``None`` before the first update)."""
        if self._pending:
            return self._pending[-1][0].device
        return None if self._counts is None else self._counts.device

    def _allocate(self, device: torch.device) -> None:
        if self._counts is None:
            self._counts = torch.zeros(len(GateReason), dtype=torch.int64, device=device)
            self._hist = torch.zeros(_N_BINS, dtype=torch.int64, device=device)
            self._extremes = torch.tensor([math.inf, -math.inf], dtype=torch.float64, device=device)
        elif self._counts.device != device:
            self._counts = self._counts.to(device)
            self._hist = self._hist.to(device)
            self._extremes = self._extremes.to(device)

    def update(self, energies: torch.Tensor, reasons: torch.Tensor, scale: float = 1.0) -> None:
        """Add one call's samples.

        The tensors are only kept (no computation, no copy) until :data:`FOLD_AT` samples
        or :data:`FOLD_CALLS` calls are buffered or the statistics are read; then all buffered calls are folded in
        with a few batched operations on their device.

        Parameters
        ----------
        energies : torch.Tensor
            Raw energies, shape ``[n]``; NaN where the target was not evaluated. Must not
            be modified in place afterwards.
        reasons : torch.Tensor
            :class:`GateReason` codes, shape ``[n]``.
        scale : float
            Factor converting ``energies`` to kJ/mol.
        """
        n = energies.shape[0]
        self.calls += 1
        self.samples += n
        if n == 0:
            return
        self._pending.append((energies.detach(), reasons, float(scale)))
        self._pending_samples += n
        if self._pending_samples >= self.FOLD_AT or len(self._pending) >= self.FOLD_CALLS:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_samples = self._pending, [], 0
        device = pending[-1][0].device
        self._allocate(device)
        dtype = functools.reduce(torch.promote_types, (e.dtype for e, _, _ in pending))
        energies = torch.cat([e.to(device=device, dtype=dtype) * scale for e, _, scale in pending])
        reasons = torch.cat([r.to(device) for _, r, _ in pending]).long()
        self._counts.index_add_(0, reasons, torch.ones_like(reasons))
        finite = (energies * 0) == 0  # isfinite in two passes
        # bin of sign(E) log10(1 + |E|), in float32: ample for 1/200-decade bins
        s = torch.log1p(energies.float().abs()).copysign_(energies.float()).nan_to_num_(0.0)
        idx = s.mul_(BINS_PER_DECADE / math.log(10)).sub_(SYMLOG_RANGE[0] * BINS_PER_DECADE)
        idx = idx.floor_().clamp_(0, _N_BINS - 1).long()
        self._hist.index_add_(0, idx, finite.long())
        lo = torch.where(finite, energies, math.inf).min().double()
        hi = torch.where(finite, energies, -math.inf).max().double()
        self._extremes = torch.stack(
            [torch.minimum(self._extremes[0], lo), torch.maximum(self._extremes[1], hi)]
        )

    def merge(self, other: "EnergyStatistics") -> None:
        """Add another accumulator's counts into this one."""
        other._fold()
        self._fold()
        self.calls += other.calls
        self.samples += other.samples
        if other._counts is None:
            return
        self._allocate(other.device)
        self._counts += other._counts.to(self.device)
        self._hist += other._hist.to(self.device)
        ext = other._extremes.to(self.device)
        self._extremes = torch.stack(
            [torch.minimum(self._extremes[0], ext[0]), torch.maximum(self._extremes[1], ext[1])]
        )

    def all_reduce(self, ranks) -> None:
        """Combine this accumulator across ranks in place: afterwards every rank holds the
        statistics of all ranks' samples (counts summed, extremes the global ones).

        ``ranks`` is a :class:`bgflow_gate.distributed.Ranks`; a collective, so every rank
        must call it. Nothing happens in a single process.
        """
        if not ranks.distributed:
            return
        self._fold()
        self._allocate(self.device or ranks.device)
        sizes = torch.tensor([self.calls, self.samples], dtype=torch.int64, device=self._counts.device)
        summed, = ranks.all_reduce([torch.cat([sizes, self._counts, self._hist])], "sum")
        lo_neg_hi, = ranks.all_reduce([self._extremes * torch.tensor([1.0, -1.0], device=self._extremes.device)], "min")
        n = len(GateReason)
        self.calls, self.samples = (int(v) for v in summed[:2].tolist())
        self._counts, self._hist = summed[2 : 2 + n].clone(), summed[2 + n :].clone()
        self._extremes = lo_neg_hi * torch.tensor([1.0, -1.0], device=lo_neg_hi.device)

    def copy(self) -> "EnergyStatistics":
        """An independent copy."""
        out = EnergyStatistics()
        out.merge(self)
        return out

    # -- read-out (the only device-to-host transfers) ----------------------------------

    def _host(self) -> tuple[list[int], torch.Tensor, float, float]:
        self._fold()
        if self._counts is None:
            return [0] * len(GateReason), torch.zeros(_N_BINS, dtype=torch.int64), math.inf, -math.inf
        packed = torch.cat([self._counts, self._hist]).cpu()
        lo, hi = self._extremes.cpu().tolist()
        n = len(GateReason)
        return packed[:n].tolist(), packed[n:], lo, hi

    @staticmethod
    def _quantile(q: float, counts: list[int], hist: torch.Tensor, lo: float, hi: float) -> float:
        n_finite = int(hist.sum())
        n_nonfinite = counts[GateReason.NONFINITE_ENERGY]
        total = n_finite + n_nonfinite
        if total == 0:
            return math.nan
        rank = int(round(q * (total - 1)))  # nearest rank; non-finite energies rank as +inf
        if rank >= n_finite:
            return math.inf
        if rank == 0 or rank == n_finite - 1:  # the extremes are known exactly
            return lo if rank == 0 else hi
        cum = torch.cumsum(hist, 0)
        b = int(torch.searchsorted(cum, torch.tensor(rank + 1)))
        before = int(cum[b - 1]) if b > 0 else 0
        frac = (rank - before + 0.5) / int(hist[b])  # spread the bin's samples evenly
        s = SYMLOG_RANGE[0] + (b + frac) / BINS_PER_DECADE
        return min(max(_symexp(s), lo), hi)

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q``-quantile of the raw energies in kJ/mol (within 1.2 % of
        ``1 + |E|``); non-finite energies rank as +inf.

        Returns NaN when no energy was evaluated, +inf when the quantile falls among
        non-finite energies.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {q!r}")
        return self._quantile(q, *self._host())

    def summary(self) -> dict[str, Any]:
        """All statistics as Python numbers (energies in kJ/mol)."""
        counts, hist, lo, hi = self._host()
        gated = self.samples - counts[GateReason.KEPT]
        evaluated = int(hist.sum()) + counts[GateReason.NONFINITE_ENERGY]
        top = math.inf if counts[GateReason.NONFINITE_ENERGY] else hi
        return {
            "calls": self.calls,
            "samples": self.samples,
            "gated": gated,
            "gated_fraction": gated / self.samples if self.samples else math.nan,
            "over_e_max": counts[GateReason.OVER_E_MAX],
            "nonfinite": counts[GateReason.NONFINITE_ENERGY]
            + counts[GateReason.NONFINITE_COORDINATES],
            "nonfinite_energy": counts[GateReason.NONFINITE_ENERGY],
            "nonfinite_coordinates": counts[GateReason.NONFINITE_COORDINATES],
            "target_errors": counts[GateReason.TARGET_ERROR],
            "energy_min": lo if evaluated and math.isfinite(lo) else math.nan,
            "energy_p50": self._quantile(0.5, counts, hist, lo, hi),
            "energy_p90": self._quantile(0.9, counts, hist, lo, hi),
            "energy_max": top if evaluated else math.nan,
        }

    # -- persistence -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters as CPU tensors (``None`` before the first update)."""
        self._fold()
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()

        return {
            "calls": self.calls,
            "samples": self.samples,
            "counts": cpu(self._counts),
            "hist": cpu(self._hist),
            "extremes": cpu(self._extremes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`, keeping the current device if there is one."""
        device = self.device
        self._pending, self._pending_samples = [], 0
        self.calls = int(state["calls"])
        self.samples = int(state["samples"])
        if state["counts"] is None:
            self._counts = self._hist = self._extremes = None
            return
        if tuple(state["hist"].shape) != (_N_BINS,):
            raise ValueError(
                f"statistics histogram has {tuple(state['hist'].shape)} bins, expected ({_N_BINS},)"
            )
        target = device if device is not None else torch.device("cpu")
        self._counts = state["counts"].to(target, torch.int64)
        self._hist = state["hist"].to(target, torch.int64)
        self._extremes = state["extremes"].to(target, torch.float64)


# -- epoch history ------------------------------------------------------------------------

#: Keys every epoch record of a trainer's history has.
HISTORY_KEYS = (
    "epoch", "e_max", "scheduled_e_max", "batches", "batches_skipped", "skip_rate",
    "steps_skipped", "nonfinite_steps", "samples", "samples_gated", "nonfinite",
    "energy_p50", "energy_p90", "energy_max", "kll", "nll", "logdet_mean", "logdet_std", "lr", "seconds",
)


def write_history(history: list[dict], path) -> None:
    """Write epoch records as CSV (``.csv``) or JSON lines (any other suffix, e.g. ``.jsonl``).

    List-valued fields (alerts, actions) are joined with ``"; "`` in CSV.
    """
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".csv":
        def plain(value):  # JSON has no NaN or infinity: write null
            return None if isinstance(value, float) and not math.isfinite(value) else value

        with path.open("w") as fh:
            for record in history:
                fh.write(json.dumps({k: plain(v) for k, v in record.items()}) + "\n")
        return
    keys: list[str] = []
    for record in history:
        keys += [k for k in record if k not in keys]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for record in history:
            writer.writerow({k: "; ".join(map(str, v)) if isinstance(v, list) else v for k, v in record.items()})


# -- health monitor -------------------------------------------------------------------------


class TrainingHealthWarning(UserWarning):
    """A warning sign of gated training: stalls, rising energies, a frozen flow."""


class HealthMonitor:
    """Watches the epoch history for the warning signs of a stalled gated training.

    Each check fires once (a :class:`TrainingHealthWarning` naming the epoch and the
    numbers, and an entry in that epoch's ``alerts``); ``rearm(name)`` lets it fire again.

    Parameters
    ----------
    stall_epochs : int
        ``all_skipped``: every KL batch skipped for this many consecutive epochs (20).
    expected_skip_rate : dict
        ``skip_rate_high``: the highest normal skip rate per schedule stage
        (default: hold 0.10, warm-up 0.25, any other stage 0.10) ...
    skip_window : int
        ... exceeded in each of this many consecutive epochs (5).
    energy_window : int
        ``energy_rising``: the median raw energy rose by more than ``energy_rise_decades``
        decades over this many epochs (10), or over five times as many (a slow rise, judged
        on the medians of the first and last fifth of that window) ...
    energy_rise_decades : float
        ... (1.0).
    flat_window : int
        ``logdet_flat``: the mean log-det changed by less than ``flat_tolerance`` over this
        many epochs (10), i.e. the flow stopped changing.
    flat_tolerance : float
        (1e-6, relative to ``1 + |mean log-det|``).
    loss_patience : int
        ``loss_flat``: the best KL (or NLL) loss did not improve by more than
        ``loss_tolerance`` (relative) for this many epochs (50).
    loss_tolerance : float
        (1e-3).
    """

    CHECKS = ("all_skipped", "skip_rate_high", "energy_rising", "logdet_flat", "loss_flat")

    def __init__(
        self,
        stall_epochs: int = 20,
        expected_skip_rate: Optional[dict] = None,
        skip_window: int = 5,
        energy_window: int = 10,
        energy_rise_decades: float = 1.0,
        flat_window: int = 10,
        flat_tolerance: float = 1e-6,
        loss_patience: int = 50,
        loss_tolerance: float = 1e-3,
    ):
        for name, value in (("stall_epochs", stall_epochs), ("skip_window", skip_window),
                            ("energy_window", energy_window), ("flat_window", flat_window),
                            ("loss_patience", loss_patience)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number of epochs, got {value!r}")
        self.stall_epochs = stall_epochs
        stages = ("hold", "warm-up", "final", "descent", "constant", "default")
        unknown = set(expected_skip_rate or {}) - set(stages)
        if unknown:
            raise ValueError(
                f"expected_skip_rate has unknown stage(s) {', '.join(sorted(unknown))}; "
                f"the stages are {', '.join(stages)}"
            )
        self.expected_skip_rate = {"hold": 0.10, "warm-up": 0.25, "default": 0.10, **(expected_skip_rate or {})}
        self.skip_window = skip_window
        self.energy_window = energy_window
        self.energy_rise_decades = energy_rise_decades
        self.flat_window = flat_window
        self.flat_tolerance = flat_tolerance
        self.loss_patience = loss_patience
        self.loss_tolerance = loss_tolerance
        self.fired: dict[str, int] = {}  # check -> epoch it fired at
        self._armed_at: dict[str, int] = {}  # check -> first epoch it may look at again

    def rearm(self, name: str, epoch: int) -> None:
        """Let check ``name`` fire again, judging only epochs from ``epoch`` on."""
        self.fired.pop(name, None)
        self._armed_at[name] = epoch

    def check(self, history: list[dict], stage: str) -> list[tuple[str, str]]:
        """Run the checks on the history (the last record is the epoch just finished).

        Returns the ``(check, message)`` pairs that fire now; each also warns.
        """
        if not history:
            return []
        epoch = history[-1]["epoch"]
        alerts = []
        for name in self.CHECKS:
            if name in self.fired:
                continue
            recent = [r for r in history if r["epoch"] >= self._armed_at.get(name, 0)]
            message = getattr(self, f"_{name}")(recent, stage)
            if message:
                self.fired[name] = epoch
                text = f"epoch {epoch}: {message}"
                warnings.warn(text, TrainingHealthWarning, stacklevel=4)  # at the train() call
                alerts.append((name, text))
        return alerts

    def _all_skipped(self, h, stage):
        last = h[-self.stall_epochs:]
        if len(last) == self.stall_epochs and all(r["batches"] and r["batches_skipped"] == r["batches"] for r in last):
            return (
                f"every KL batch was skipped for {self.stall_epochs} epochs (E_max {last[-1]['e_max']:.3g} kJ/mol, "
                f"median raw energy {last[-1]['energy_p50']:.3g} kJ/mol): the gate is stricter than the model"
            )

    def _skip_rate_high(self, h, stage):
        limit = self.expected_skip_rate.get(stage, self.expected_skip_rate["default"])
        last = h[-self.skip_window:]
        if len(last) == self.skip_window and all(r["skip_rate"] > limit for r in last):
            return (
                f"KL skip rate {last[-1]['skip_rate']:.0%} has been above {limit:.0%}, the expected level of the "
                f"{stage} stage, for {self.skip_window} epochs"
            )

    def _energy_rising(self, h, stage):
        # a fast rise within energy_window epochs, or a slow one within 5 x energy_window
        # (judged on the medians of the first and last fifths, so one noisy epoch does not count)
        for window in (self.energy_window, 5 * self.energy_window):
            if len(h) < window:
                return None
            values = [r["energy_p50"] for r in h[-window:]]
            k = max(1, window // 5) if window > self.energy_window else 1
            first, last = float(np.median(values[:k])), float(np.median(values[-k:]))
            if not (math.isfinite(first) and math.isfinite(last) and first > 0 and last > 0):
                continue
            if math.log10(last) - math.log10(first) > self.energy_rise_decades:
                return f"the median raw energy rose from {first:.3g} to {last:.3g} kJ/mol over {window} epochs"
        return None

    def _logdet_flat(self, h, stage):
        last = [r["logdet_mean"] for r in h[-self.flat_window:]]
        if len(last) < self.flat_window or not all(math.isfinite(v) for v in last):
            return None
        if max(last) - min(last) < self.flat_tolerance * (1 + abs(last[-1])):
            return f"the mean log-det stayed at {last[-1]:.6g} for {self.flat_window} epochs: the flow is not changing"

    def _loss_flat(self, h, stage):
        key = "kll" if any(math.isfinite(r["kll"]) for r in h) else "nll"
        values = [r[key] for r in h]
        if len(values) <= self.loss_patience:
            return None
        before = [v for v in values[: -self.loss_patience] if math.isfinite(v)]
        recent = [v for v in values[-self.loss_patience:] if math.isfinite(v)]
        if not before:
            return None
        best = min(before)
        if not recent or min(recent) > best - self.loss_tolerance * abs(best):
            return f"the {key.upper()} loss has not improved on {best:.4g} for {self.loss_patience} epochs"

    def state_dict(self) -> dict:
        return {"fired": dict(self.fired), "armed_at": dict(self._armed_at)}

    def load_state_dict(self, state: dict) -> None:
        self.fired = dict(state["fired"])
        self._armed_at = dict(state["armed_at"])
