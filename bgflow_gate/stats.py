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
from typing import Any

import torch

__all__ = [
    "GateReason",
    "EnergyStatistics",
    "BINS_PER_DECADE",
    "SYMLOG_RANGE",
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
        self._counts: torch.Tensor | None = None  # int64 [len(GateReason)]
        self._hist: torch.Tensor | None = None  # int64 [_N_BINS], finite energies
        self._extremes: torch.Tensor | None = None  # float64 [2]: min, max of finite
        self._pending: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self._pending_samples = 0

    @property
    def device(self) -> torch.device | None:
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
        finite = torch.isfinite(energies)
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


#: The statistics windows of a gate: the current whole epoch, the last completed one, and
#: everything since construction.
WINDOWS = ("epoch", "previous", "total")


class StatisticsWindows:
    """A gate's statistics over :data:`WINDOWS`: calls update the current epoch's window,
    which :meth:`close_epoch` turns into the previous one (and adds to the total)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self._windows = {w: EnergyStatistics() for w in WINDOWS}

    @property
    def current(self) -> EnergyStatistics:
        """The current epoch's accumulator."""
        return self._windows["epoch"]

    def close_epoch(self) -> EnergyStatistics:
        """Start a new epoch window; returns the finished one."""
        finished = self._windows["epoch"]
        self._windows["total"].merge(finished)
        self._windows["previous"] = finished
        self._windows["epoch"] = EnergyStatistics()
        return finished

    def window(self, name: str) -> EnergyStatistics:
        """The statistics of window ``name`` (``"total"`` includes the current epoch)."""
        if name not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {name!r}")
        if name != "total":
            return self._windows[name]
        total = self._windows["total"].copy()
        total.merge(self._windows["epoch"])
        return total

    def state_dict(self) -> dict[str, Any]:
        return {w: s.state_dict() for w, s in self._windows.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, stats_state in state.items():
            if name not in WINDOWS:
                raise ValueError(f"unknown statistics window {name!r} in gate state")
            stats = EnergyStatistics()
            stats.load_state_dict(stats_state)
            self._windows[name] = stats


def describe_statistics(s: dict[str, Any], window: str, e_max_kt: float | None = None) -> str:
    """A one-paragraph account of a gate's :meth:`~bgflow_gate.ScheduledEnergyGate.statistics`."""
    kt = f" ({e_max_kt:.4g} kT)" if e_max_kt is not None else ""
    lines = [f"epoch {s['epoch']:g}: E_max {s['e_max']:.4g} kJ/mol{kt}, E_cut {s['e_cut']:.4g} kJ/mol"]
    if not s["samples"]:
        return "\n".join(lines + [f"  {window}: no samples"])
    return "\n".join(lines + [
        f"  {window}: {s['samples']} samples in {s['calls']} calls, "
        f"{s['gated']} gated ({100 * s['gated_fraction']:.1f} %)",
        f"  gated because: over E_max {s['over_e_max']}, non-finite energy {s['nonfinite_energy']}, "
        f"non-finite coordinates {s['nonfinite_coordinates']}, target error {s['target_errors']}",
        f"  raw energy [kJ/mol]: min {s['energy_min']:.4g}, p50 {s['energy_p50']:.4g}, "
        f"p90 {s['energy_p90']:.4g}, max {s['energy_max']:.4g}",
    ])
