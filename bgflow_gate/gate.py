"""``ScheduledEnergyGate``: a bgflow ``Energy`` that gates a target energy by epoch.

For every sample the gate evaluates the wrapped target once and decides on the raw
energy ``u``:

* **gated** when ``u`` is not finite, when the sample's coordinates are not finite (the
  target is then not called for it), when the target raised for it, or when
  ``u > E_max(epoch)``. A gated sample's output is a finite constant (the soft-cut value
  of E_max) that carries no gradient: nothing flows back through the target for it, not
  even the NaN that ``0 * inf`` makes in a target's backward pass.
* otherwise the output is ``u`` below ``E_cut`` and ``E_cut + log(1 + u - E_cut)`` above
  it: continuous, monotone, with slope 1 at ``E_cut`` and ``1 / (1 + u - E_cut)`` above.

Thresholds are given in kJ/mol. The output keeps the target's unit (bgflow's OpenMM
energies are in kT), so the gate can replace the target of a ``BoltzmannGenerator``.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Any, Optional, Sequence

import torch

from . import bg
from .schedules import Schedule, as_schedule, schedule_from_dict
from .stats import EnergyStatistics, GateReason
from .units import KJ_PER_MOL, KT, check_temperature, kt_in_kjmol, parse_unit
from .validation import check_number, check_open_fraction

__all__ = ["ScheduledEnergyGate", "soft_cut"]

_WINDOWS = ("epoch", "previous", "total")


def soft_cut(u: torch.Tensor, cut: float) -> torch.Tensor:
    """``u`` below ``cut``, ``cut + log(1 + u - cut)`` above; for finite ``u``.

    Continuous and monotone, with slope 1 at ``cut``; its gradient is finite everywhere.
    """
    excess = torch.clamp(u - cut, min=0.0)
    return torch.where(u > cut, cut + torch.log1p(excess), u)


def _soft_cut_value(u: float, cut: float) -> float:
    return cut + math.log1p(u - cut) if u > cut else u


class _EveryFailure(Exception):
    """Internal: the target raised for every sample of a (sub)batch."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _GateGradient(torch.autograd.Function):
    """Identity on the inputs whose backward zeroes the rows of gated samples.

    The gated rows are only known after the target ran, so they are handed over in a
    one-element list filled in later. ``torch.where`` (not a product) removes NaN and inf
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
                out.append(torch.where(rows, torch.zeros_like(g), g))
        return (None, *out)


class ScheduledEnergyGate(bg.Energy):
    """Gate a target energy with an epoch-scheduled rejection threshold E_max.

    Parameters
    ----------
    target : bgflow.Energy
        Any energy with bgflow's interface (``energy(*xs)`` returning ``[*batch, 1]``,
        ``event_shapes``).
    schedule : Schedule or dict or float, optional
        E_max in kJ/mol as a function of the epoch. Default: :class:`ThreeStageSchedule`
        (1e10 -> 1e5 kJ/mol; hold 50, warm-up to 300 epochs). A dict is passed to
        :func:`schedule_from_dict`, a number makes a :class:`ConstantSchedule`.
    e_cut : float
        Start of the lin-log soft cut, kJ/mol (default 500).
    target_unit : {"kJ/mol", "kT"}
        The unit the target's energies come in. bgflow's ``OpenMMEnergy`` returns kT.
    temperature : float, optional
        Temperature in K. Required with ``target_unit="kT"`` (to convert the thresholds);
        with kJ/mol it only enables reading E_max in kT.
    adaptive_quantile : float, optional
        ``q`` in (0, 1). The schedule then sets how fast E_max may fall, and the effective
        E_max never falls below the ``q``-quantile of the previous epoch's raw energies
        (nor rises above the schedule's starting value), so E_max reaches its final value
        as fast as the model allows and not faster.

    Attributes
    ----------
    last_gated : torch.Tensor
        Bool ``[*batch]``: which samples of the last call were gated.
    last_reasons : torch.Tensor
        uint8 ``[*batch]``: :class:`GateReason` code of each sample of the last call.
    last_raw : torch.Tensor
        ``[*batch, 1]``: the last call's raw target energies in the target's unit
        (NaN where the target was not evaluated), detached.

    Notes
    -----
    One value per call is read back to the host: whether all coordinates are finite
    (only then is the whole batch sent to the target in one piece). The statistics never
    read back; they accumulate on the energies' device until :meth:`statistics` is called.

    Examples
    --------
    >>> import torch
    >>> from bgflow_gate import bg, ScheduledEnergyGate, ConstantSchedule
    >>> class Quadratic(bg.Energy):
    ...     def _energy(self, x):
    ...         return (x ** 2).sum(-1, keepdim=True)
    >>> gate = ScheduledEnergyGate(Quadratic(2), schedule=ConstantSchedule(1e4), e_cut=10.0)
    >>> gate.energy(torch.tensor([[1.0, 2.0], [0.0, 400.0]])).flatten().tolist()
    [5.0, 19.20...]
    >>> gate.last_gated.tolist()
    [False, True]
    """

    def __init__(
        self,
        target: Any,
        schedule: Schedule | dict | float | None = None,
        e_cut: float = 500.0,
        target_unit: str = KJ_PER_MOL,
        temperature: Optional[float] = None,
        adaptive_quantile: Optional[float] = None,
    ):
        shapes = getattr(target, "event_shapes", None)
        if shapes is None or not callable(getattr(target, "energy", None)):
            raise TypeError(
                f"target must be a bgflow Energy (with energy() and event_shapes), got "
                f"{type(target).__name__}"
            )
        dims = [list(s) for s in shapes]
        super().__init__(dims[0] if len(dims) == 1 else dims)
        self.target = target
        self.schedule = as_schedule(schedule)
        self.e_cut = check_number(e_cut, "e_cut", "energy in kJ/mol")
        self.target_unit = parse_unit(target_unit, name="target_unit")
        if temperature is None and self.target_unit == KT:
            raise ValueError(
                "target_unit='kT' needs temperature (in K) to convert the thresholds, "
                "which are in kJ/mol; pass the temperature the target's energies are "
                "reduced at (for bgflow's OpenMMEnergy, the integrator's temperature)"
            )
        self.temperature = (
            None if temperature is None else check_temperature(temperature)
        )
        if adaptive_quantile is not None:
            adaptive_quantile = check_open_fraction(adaptive_quantile, "adaptive_quantile")
        self.adaptive_quantile = adaptive_quantile
        # kJ/mol per unit of the target's energies
        self._unit_in_kjmol = (
            kt_in_kjmol(self.temperature) if self.target_unit == KT else 1.0
        )
        self._epoch = 0.0
        self._floor: Optional[float] = None  # adaptive lower bound on E_max, kJ/mol
        self._relax = 1.0  # factor on E_max applied by relax()
        self._stats = {w: EnergyStatistics() for w in _WINDOWS}
        self._warned_target_error = False
        # the last call's results; a plain holder, so that storing them per call does not
        # go through nn.Module.__setattr__
        self._last = types.SimpleNamespace(gated=None, reasons=None, raw=None)

    @property
    def last_gated(self) -> Optional[torch.Tensor]:
        """Bool ``[*batch]``: which samples of the last call were gated."""
        return self._last.gated

    @property
    def last_reasons(self) -> Optional[torch.Tensor]:
        """uint8 ``[*batch]``: the :class:`GateReason` code of each sample of the last call."""
        return self._last.reasons

    @property
    def last_raw(self) -> Optional[torch.Tensor]:
        """``[*batch, 1]``: the last call's raw energies in the target's unit (NaN where not evaluated)."""
        return self._last.raw

    # -- schedule ----------------------------------------------------------------------

    @property
    def epoch(self) -> float:
        """The current (fractional) epoch."""
        return self._epoch

    def set_epoch(self, epoch: float) -> None:
        """Move the gate to ``epoch``; E_max follows the schedule.

        Crossing into another whole epoch closes the epoch's statistics window (it becomes
        the ``"previous"`` window) and, with ``adaptive_quantile``, sets the E_max floor
        from it; this reads the statistics once.
        """
        value = check_number(epoch, "epoch", "number", lower=0)
        if math.floor(value) != math.floor(self._epoch):
            self._close_epoch_window()
        self._epoch = value

    def _close_epoch_window(self) -> None:
        finished = self._stats["epoch"]
        self._stats["total"].merge(finished)
        self._stats["previous"] = finished
        self._stats["epoch"] = EnergyStatistics()
        if self.adaptive_quantile is not None and finished.samples:
            q = finished.quantile(self.adaptive_quantile)
            if not math.isnan(q):
                self._floor = q

    @property
    def scheduled_e_max(self) -> float:
        """E_max in kJ/mol that the schedule gives at the current epoch."""
        return self.schedule(self._epoch)

    @property
    def e_max_floor(self) -> Optional[float]:
        """The adaptive lower bound on E_max in kJ/mol (``None`` when not adaptive or not yet set)."""
        return self._floor

    @property
    def e_max(self) -> float:
        """The effective E_max in kJ/mol at the current epoch (schedule, adaptive floor, relaxation)."""
        value = self.scheduled_e_max
        if self._floor is not None:
            value = max(value, min(self._floor, self.schedule(0.0)))
        return value * self._relax

    @property
    def relaxation(self) -> float:
        """The factor :meth:`relax` has applied to E_max so far (1 when never relaxed)."""
        return self._relax

    def relax(self, factor: float) -> None:
        """Raise E_max by ``factor`` (> 1) from now on; repeated calls multiply.

        The remedy for a gate that rejects everything: the schedule keeps its shape, every
        E_max it gives is multiplied by the accumulated factor.
        """
        factor = check_number(factor, "factor", "factor", lower=1.0, strict=True)
        self._relax *= factor

    def _in_kt(self, kjmol: float, what: str) -> float:
        if self.temperature is None:
            raise ValueError(
                f"{what} in kT needs a temperature; construct the gate with temperature=<K>"
            )
        return kjmol / kt_in_kjmol(self.temperature)

    @property
    def e_max_kt(self) -> float:
        """The effective E_max in kT (needs ``temperature``)."""
        return self._in_kt(self.e_max, "E_max")

    @property
    def e_cut_kt(self) -> float:
        """E_cut in kT (needs ``temperature``)."""
        return self._in_kt(self.e_cut, "E_cut")

    # -- evaluation --------------------------------------------------------------------

    def _evaluate(
        self, xs: Sequence[torch.Tensor], kwargs: dict
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Target energies ``[m, 1]`` and a bool ``[m]`` marking the samples the target raised
        for (``None`` when it raised for none).

        A batch the target raises for is split in halves until the failing samples are
        isolated, so the rest keep their energies. A target that raises for every sample
        (a bug rather than a bad configuration) or for an empty batch re-raises.
        """
        try:
            return self._evaluate_isolating(xs, kwargs)
        except _EveryFailure as failure:
            raise failure.error

    def _evaluate_isolating(self, xs, kwargs):
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
                    parts.append(self._evaluate_isolating(part, kwargs))
                except _EveryFailure as failure:
                    failures.append(failure)
                    n = part[0].shape[0]
                    nan = torch.full((n, 1), math.nan, dtype=xs[0].dtype, device=xs[0].device)
                    parts.append((nan, torch.ones(n, dtype=torch.bool, device=xs[0].device)))
            if len(failures) == 2:
                raise _EveryFailure(failures[0].error) from err
            if not self._warned_target_error:
                self._warned_target_error = True
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

    def _energy(self, *xs: torch.Tensor, **kwargs) -> torch.Tensor:
        first = xs[0]
        if not first.is_floating_point():
            raise TypeError(f"coordinates must be floating point, got {first.dtype}")
        batch_shape = first.shape[: first.dim() - len(self.event_shapes[0])]
        flat = [x.reshape(-1, *shape) for x, shape in zip(xs, self.event_shapes)]
        n = flat[0].shape[0]
        device, dtype = first.device, first.dtype

        # The gradient guard is only needed when a gradient can flow back to the inputs.
        gated_box: list = []
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in flat)
        guarded = _GateGradient.apply(gated_box, *flat) if needs_grad else flat
        # x * 0 is 0 for finite x and NaN for NaN / inf, so a sum of x * 0 is 0 iff all is finite
        all_finite = n == 0 or bool(sum((x.detach() * 0).sum() for x in flat) == 0)  # the one host read
        if all_finite:
            raw, errors = self._evaluate(guarded, kwargs)
        else:
            finite_coords = sum((x.detach() * 0).reshape(n, -1).sum(1) for x in flat) == 0
            idx = torch.nonzero(finite_coords).squeeze(1)
            raw = torch.full((n, 1), math.nan, dtype=dtype, device=device)
            errors = None
            if idx.numel():
                sub, sub_errors = self._evaluate([x.index_select(0, idx) for x in guarded], kwargs)
                raw = raw.index_copy(0, idx, sub)
                if sub_errors is not None:
                    errors = torch.zeros(n, dtype=torch.bool, device=device).index_copy(0, idx, sub_errors)
        u = raw[:, 0]

        e_max = self.e_max / self._unit_in_kjmol
        e_cut = self.e_cut / self._unit_in_kjmol
        over = u > e_max  # False for NaN
        finite = (u.detach() * 0) == 0
        reasons = torch.where(finite, over.to(torch.uint8), int(GateReason.NONFINITE_ENERGY))
        if not all_finite:
            reasons = torch.where(finite_coords, reasons, int(GateReason.NONFINITE_COORDINATES))
        if errors is not None:
            reasons = torch.where(errors, int(GateReason.TARGET_ERROR), reasons)
        gated = reasons.bool()
        gated_box.append(gated)

        safe = torch.where(gated, 0.0, u)  # no NaN or inf reaches any backward
        out = torch.where(gated, _soft_cut_value(e_max, e_cut), soft_cut(safe, e_cut))

        self._stats["epoch"].update(u.detach(), reasons, scale=self._unit_in_kjmol)
        last = self._last
        last.gated = gated.reshape(batch_shape)
        last.reasons = reasons.reshape(batch_shape)
        last.raw = raw.detach().reshape(*batch_shape, 1)
        return out.reshape(*batch_shape, 1)

    # -- statistics --------------------------------------------------------------------

    def statistics(self, window: str = "epoch") -> dict[str, Any]:
        """Gating statistics as Python numbers; raw energies in kJ/mol.

        Parameters
        ----------
        window : {"epoch", "previous", "total"}
            The current whole epoch, the last completed one, or everything since
            construction (or :meth:`reset_statistics`).

        Returns
        -------
        dict
            ``calls, samples, gated, gated_fraction, over_e_max, nonfinite,
            nonfinite_energy, nonfinite_coordinates, target_errors, energy_min,
            energy_p50, energy_p90, energy_max`` plus the gate's ``epoch``, ``e_max``,
            ``scheduled_e_max`` and ``e_cut`` (kJ/mol).
        """
        if window not in _WINDOWS:
            raise ValueError(f"window must be one of {', '.join(_WINDOWS)}, got {window!r}")
        if window == "total":
            stats = self._stats["total"].copy()
            stats.merge(self._stats["epoch"])
        else:
            stats = self._stats[window]
        return {
            "epoch": self._epoch,
            "e_max": self.e_max,
            "scheduled_e_max": self.scheduled_e_max,
            "e_cut": self.e_cut,
            **stats.summary(),
        }

    @property
    def epoch_statistics(self) -> EnergyStatistics:
        """The accumulator of the current epoch's window (what ``statistics("epoch")`` reads)."""
        return self._stats["epoch"]

    @epoch_statistics.setter
    def epoch_statistics(self, stats: EnergyStatistics) -> None:
        self._stats["epoch"] = stats

    def all_reduce_statistics(self, ranks) -> None:
        """Combine the current epoch's statistics across the ranks of ``ranks`` (a
        :class:`~bgflow_gate.distributed.Ranks`; a collective), so that every rank's window,
        and the adaptive floor taken from it when the epoch closes, describe all ranks' samples."""
        self._stats["epoch"].all_reduce(ranks)

    def reset_statistics(self) -> None:
        """Forget all statistics (the epoch and the adaptive floor stay)."""
        self._stats = {w: EnergyStatistics() for w in _WINDOWS}

    def report(self, window: str = "epoch") -> str:
        """A one-paragraph, human-readable account of what the gate did in ``window``."""
        s = self.statistics(window)
        kt = f" ({self.e_max_kt:.4g} kT)" if self.temperature is not None else ""
        lines = [
            f"epoch {s['epoch']:g}: E_max {s['e_max']:.4g} kJ/mol{kt}, E_cut {s['e_cut']:.4g} kJ/mol",
            f"  {window}: {s['samples']} samples in {s['calls']} calls, "
            f"{s['gated']} gated ({100 * s['gated_fraction']:.1f} %)"
            if s["samples"]
            else f"  {window}: no samples",
        ]
        if s["samples"]:
            lines.append(
                f"  gated because: over E_max {s['over_e_max']}, non-finite energy "
                f"{s['nonfinite_energy']}, non-finite coordinates {s['nonfinite_coordinates']}, "
                f"target error {s['target_errors']}"
            )
            lines.append(
                f"  raw energy [kJ/mol]: min {s['energy_min']:.4g}, p50 {s['energy_p50']:.4g}, "
                f"p90 {s['energy_p90']:.4g}, max {s['energy_max']:.4g}"
            )
        return "\n".join(lines)

    # -- persistence (part of the module's state_dict) -------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "floor": self._floor,
            "relax": self._relax,
            "schedule": self.schedule.to_dict(),
            "statistics": {w: s.state_dict() for w, s in self._stats.items()},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule = schedule_from_dict(state["schedule"])
        self._epoch = float(state["epoch"])
        self._floor = state["floor"]
        self._relax = float(state.get("relax", 1.0))
        for window, stats_state in state["statistics"].items():
            if window not in _WINDOWS:
                raise ValueError(f"unknown statistics window {window!r} in gate state")
            stats = EnergyStatistics()
            stats.load_state_dict(stats_state)
            self._stats[window] = stats

    def extra_repr(self) -> str:
        temp = "" if self.temperature is None else f", temperature={self.temperature:g}"
        adaptive = (
            "" if self.adaptive_quantile is None else f", adaptive_quantile={self.adaptive_quantile:g}"
        )
        return (
            f"schedule={self.schedule!r}, e_cut={self.e_cut:g}, "
            f"target_unit={self.target_unit!r}{temp}{adaptive}"
        )
