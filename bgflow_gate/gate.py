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

What a sample contributes to a KL loss, by ``u``, is the gate's contract too
(:meth:`ScheduledEnergyGate.kl_terms`): below E_cut the exact ``u - log|det J|``; between
E_cut and E_max what the ``above_cut`` option says (:data:`ABOVE_CUT`); gated samples are the
trainer's skip policy's to decide.

Thresholds are given in kJ/mol. The output keeps the target's unit (bgflow's OpenMM
energies are in kT), so the gate can replace the target of a ``BoltzmannGenerator``.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

from . import bg
from .guard import GuardedTarget, as_batch, check_coordinates, guard_gradients
from .schedules import Schedule, as_schedule, schedule_from_dict
from .stats import EnergyStatistics, GateReason, StatisticsWindows, describe_statistics
from .targets import energy_unit, generator_target
from .units import KT, kt_in_kjmol
from .validation import check_number, check_open_fraction

__all__ = ["ScheduledEnergyGate", "soft_cut", "gate_reasons", "ABOVE_CUT", "check_e_cut", "gate_for"]

#: What a sample with E_cut < u <= E_max contributes to the KL term (the ``above_cut`` option).
ABOVE_CUT = {
    "energy": "its soft-cut energy only: the -log|det J| term is left out, so the sample pulls the "
    "flow towards lower energy and never pushes it outward (the default, chosen by measurement)",
    "energy+entropy": "its soft-cut energy and its -log|det J| term, as bgflow's LinLogCutEnergy "
    "(the entropy term of far-off samples can push an untrained flow outward and stall it)",
    "none": "nothing: it leaves the KL mean like a gated sample",
}


def check_e_cut(e_cut: Any, schedule: Schedule) -> float:
    """E_cut in kJ/mol if ``0 < e_cut <`` the schedule's final E_max; otherwise a ``ValueError``
    (one rule for the Python API and the experiments file)."""
    value = check_number(e_cut, "e_cut", "energy in kJ/mol", lower=0, strict=True)
    if value >= schedule.final_e_max:
        raise ValueError(
            f"E_cut ({value:g} kJ/mol) must lie below the final E_max ({schedule.final_e_max:g} kJ/mol): "
            f"the soft cut starts below the hard gate"
        )
    return value


def soft_cut(u: torch.Tensor, cut: float) -> torch.Tensor:
    """``u`` below ``cut``, ``cut + log(1 + u - cut)`` above; for finite ``u``.

    Continuous and monotone, with slope 1 at ``cut``; its gradient is finite everywhere.
    """
    excess = torch.clamp(u - cut, min=0.0)
    return torch.where(u > cut, cut + torch.log1p(excess), u)


def gate_reasons(u: torch.Tensor, e_max: float, finite_coords: torch.Tensor | None = None,
                 errors: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's :class:`GateReason` code (uint8 ``[n]``) from its raw energy ``u [n]``,
    the threshold ``e_max`` (``u``'s unit), which samples had finite coordinates and which
    the target raised for (``None``: all and none). A few elementwise operations, no host read."""
    nonfinite = (u * 0).ne(0)  # NaN exactly where u is NaN or +-inf (torch.isfinite takes 4 operations)
    reasons = torch.where(nonfinite, int(GateReason.NONFINITE_ENERGY), (u > e_max).to(torch.uint8))
    if finite_coords is not None:
        reasons = torch.where(finite_coords, reasons, int(GateReason.NONFINITE_COORDINATES))
    if errors is not None:
        reasons = torch.where(errors, int(GateReason.TARGET_ERROR), reasons)
    return reasons


class _SoftCutGated(torch.autograd.Function):
    """``soft_cut(u, e_cut)`` for kept samples and the constant ``soft_cut(e_max, e_cut)`` for
    gated ones, with its gradient written out: ``1 / (1 + max(u - e_cut, 0))`` for kept
    samples, exactly 0 for gated ones (no NaN or inf reaches the target's backward pass).
    Fewer operations than autograd's chain of the same steps (it matters on a GPU, where each
    operation costs a launch). First order only: differentiating the gradient raises."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, gated: torch.Tensor, e_max: float, e_cut: float) -> torch.Tensor:
        v = torch.where(gated, e_max, u)
        excess = (v - e_cut).clamp_(min=0.0)
        ctx.save_for_backward(excess, gated)
        return v.clamp_(max=e_cut).add_(torch.log1p(excess))  # exact below the cut (log1p(0) = 0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        excess, gated = ctx.saved_tensors
        slope = excess.add(1.0).reciprocal_().masked_fill_(gated, 0.0)
        return grad * slope, None, None, None


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
        Start of the lin-log soft cut, kJ/mol (default 500); ``0 < e_cut <`` the
        schedule's final E_max.
    target_unit : {"kJ/mol", "kT"}, optional
        The unit the target's energies come in. Never guessed: read from an OpenMM target
        (bgflow's ``OpenMMEnergy``: kT at its integrator's temperature) or a target that
        declares ``unit`` and ``temperature`` (:class:`~bgflow_gate.TorchEnergy`); required
        for any other target.
    temperature : float, optional
        Temperature in K. Required with ``target_unit="kT"`` (to convert the thresholds);
        with kJ/mol it only enables reading E_max in kT.
    adaptive_quantile : float, optional
        ``q`` in (0, 1). The schedule then sets how fast E_max may fall, and the effective
        E_max never falls below the ``q``-quantile of the previous epoch's raw energies
        (nor rises above the schedule's starting value), so E_max reaches its final value
        as fast as the model allows and not faster.
    above_cut : {"energy", "energy+entropy", "none"}
        What a sample with E_cut < u <= E_max contributes to the KL term
        (:meth:`kl_terms`, :data:`ABOVE_CUT`). Default ``"energy"``.

    The last call's per-sample results are :attr:`last_gated`, :attr:`last_reasons`,
    :attr:`last_above_cut` and :attr:`last_raw`; statistics accumulate on the energies'
    device and are read by :meth:`statistics`. One value per call is read back to the host:
    whether every coordinate is finite (then the batch goes to the target in one piece).

    Examples
    --------
    >>> import torch
    >>> from bgflow_gate import bg, ScheduledEnergyGate, ConstantSchedule
    >>> class Quadratic(bg.Energy):
    ...     def _energy(self, x):
    ...         return (x ** 2).sum(-1, keepdim=True)
    >>> gate = ScheduledEnergyGate(Quadratic(2), schedule=ConstantSchedule(1e4), e_cut=10.0, target_unit="kJ/mol")
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
        target_unit: str | None = None,
        temperature: float | None = None,
        adaptive_quantile: float | None = None,
        above_cut: str = "energy",
    ):
        shapes = getattr(target, "event_shapes", None)
        if shapes is None or not callable(getattr(target, "energy", None)):
            raise TypeError(f"target must be a bgflow Energy (with energy() and event_shapes), got {type(target).__name__}")
        dims = [list(s) for s in shapes]
        super().__init__(dims[0] if len(dims) == 1 else dims)
        self.target = target
        self.schedule = as_schedule(schedule)
        self.e_cut = check_e_cut(e_cut, self.schedule)
        self.target_unit, self.temperature = energy_unit(target, target_unit, temperature)
        if adaptive_quantile is not None:
            adaptive_quantile = check_open_fraction(adaptive_quantile, "adaptive_quantile")
        self.adaptive_quantile = adaptive_quantile
        if above_cut not in ABOVE_CUT:
            raise ValueError(f"above_cut must be one of {', '.join(map(repr, ABOVE_CUT))}, got {above_cut!r}")
        self.above_cut = above_cut
        # kJ/mol per unit of the target's energies
        self._unit_in_kjmol = kt_in_kjmol(self.temperature) if self.target_unit == KT else 1.0
        self._epoch = 0.0
        self._floor: float | None = None  # adaptive lower bound on E_max, kJ/mol
        self._relax = 1.0  # factor on E_max applied by relax()
        self._stats = StatisticsWindows()
        self._guard = GuardedTarget(target)
        # the last call's results; a plain holder, so that storing them per call does not
        # go through nn.Module.__setattr__
        self._last = types.SimpleNamespace(gated=None, reasons=None, raw=None, above=None, e_cut=None)

    @classmethod
    def for_generator(cls, generator: Any, **kwargs: Any) -> "ScheduledEnergyGate":
        """A gate around a bgflow ``BoltzmannGenerator``'s target, which stays the generator's;
        ``kwargs`` as for the constructor (an OpenMM target's unit is read from it)."""
        target = generator_target(generator)
        if target is None or isinstance(target, cls):
            raise ValueError("the generator has no target energy to gate" if target is None else
                             "the generator's target is a gate already; use it as it is")
        return cls(target, **kwargs)

    @property
    def last_gated(self) -> torch.Tensor | None:
        """Bool ``[*batch]``: which samples of the last call were gated."""
        return self._last.gated

    @property
    def last_reasons(self) -> torch.Tensor | None:
        """uint8 ``[*batch]``: the :class:`GateReason` code of each sample of the last call."""
        return self._last.reasons

    @property
    def last_above_cut(self) -> torch.Tensor | None:
        """Bool ``[*batch]``: the samples of the last call between E_cut and E_max (not gated)."""
        last = self._last
        if last.above is None and last.raw is not None:
            last.above = (last.raw[..., 0] > last.e_cut) & ~last.gated
        return last.above

    @property
    def last_raw(self) -> torch.Tensor | None:
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
        finished = self._stats.close_epoch()
        if self.adaptive_quantile is not None and finished.samples:
            q = finished.quantile(self.adaptive_quantile)
            if not math.isnan(q):
                self._floor = q

    @property
    def scheduled_e_max(self) -> float:
        """E_max in kJ/mol that the schedule gives at the current epoch."""
        return self.schedule(self._epoch)

    @property
    def e_max_floor(self) -> float | None:
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
        """Raise E_max by ``factor`` (> 1) from now on; repeated calls multiply: the remedy
        for a gate that rejects everything (the schedule keeps its shape)."""
        factor = check_number(factor, "factor", "factor", lower=1.0, strict=True)
        self._relax *= factor

    def _in_kt(self, kjmol: float, what: str) -> float:
        if self.temperature is None:
            raise ValueError(f"{what} in kT needs a temperature; construct the gate with temperature=<K>")
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

    def energy(self, *xs: torch.Tensor, **kwargs) -> torch.Tensor:
        """bgflow's ``Energy.energy``; inputs that are not coordinate batches are clear errors."""
        check_coordinates(xs, self.event_shapes)  # before bgflow's own checks, so once per call
        return super().energy(*xs, **kwargs)

    def _energy(self, *xs: torch.Tensor, **kwargs) -> torch.Tensor:
        flat, batch_shape = as_batch(xs, self.event_shapes)
        n = flat[0].shape[0]
        # The gradient guard is only needed when a gradient can flow back to the inputs.
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in flat)
        guarded, gated_box = guard_gradients(flat) if needs_grad else (flat, [])
        raw, errors, finite_coords = self._guard.energies(list(guarded), n, kwargs)
        u = raw[:, 0]
        e_max = self.e_max / self._unit_in_kjmol
        e_cut = self.e_cut / self._unit_in_kjmol
        reasons = gate_reasons(u, e_max, finite_coords, errors)
        gated = reasons != 0
        gated_box.append(gated)
        out = _SoftCutGated.apply(u, gated, e_max, e_cut)
        if needs_grad and not out.requires_grad:  # no sample reached the target: zero gradient, not none
            out = out + torch.where(torch.zeros_like(gated), guarded[0].flatten(1)[:, 0], 0.0)
        self._stats.current.update(u.detach(), reasons, scale=self._unit_in_kjmol)
        last = self._last
        last.above, last.e_cut = None, e_cut  # computed when asked for (kl_terms, last_above_cut)
        if len(batch_shape) == 1:  # the usual [n, dim] batch: no reshaping (each costs a dispatch)
            last.gated, last.reasons, last.raw = gated, reasons, raw.detach()
            return out.unsqueeze(1)
        last.gated = gated.reshape(batch_shape)
        last.reasons = reasons.reshape(batch_shape)
        last.raw = raw.detach().reshape(*batch_shape, 1)
        return out.reshape(*batch_shape, 1)

    def kl_terms(self, energy: torch.Tensor, dlogp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sample's KL contribution for the batch of the last call (``energy`` its output,
        ``dlogp`` the flow's log|det J|), by raw energy u: u <= E_cut ``u - log|det J|``
        (exact KL); E_cut < u <= E_max what ``above_cut`` says (:data:`ABOVE_CUT`); gated
        samples ``energy - log|det J|`` (the trainer's skip policy decides if they count).

        Returns ``per_sample [n]``, ``counted [n]`` (bool: False where ``above_cut="none"``
        leaves a sample out of the mean) and ``above [n]`` (bool: between E_cut and E_max).
        """
        above = self.last_above_cut.reshape(-1)
        energy, dlogp = energy.reshape(-1), dlogp.reshape(-1)
        if self.above_cut == "energy":
            return energy - torch.where(above, 0.0, dlogp), torch.ones_like(above), above
        counted = ~above if self.above_cut == "none" else torch.ones_like(above)
        return energy - dlogp, counted, above

    # -- statistics --------------------------------------------------------------------

    def statistics(self, window: str = "epoch") -> dict[str, Any]:
        """Gating statistics of ``window`` as Python numbers; raw energies in kJ/mol.

        ``window``: ``"epoch"`` (the current whole epoch), ``"previous"`` (the last completed
        one) or ``"total"`` (since construction or :meth:`reset_statistics`). The keys:
        ``calls, samples, gated, gated_fraction, over_e_max, nonfinite, nonfinite_energy,
        nonfinite_coordinates, target_errors, energy_min, energy_p50, energy_p90,
        energy_max`` and the gate's ``epoch, e_max, scheduled_e_max, e_cut``.
        """
        gate = {"epoch": self._epoch, "e_max": self.e_max, "scheduled_e_max": self.scheduled_e_max, "e_cut": self.e_cut}
        return {**gate, **self._stats.window(window).summary()}

    @property
    def epoch_statistics(self) -> EnergyStatistics:
        """The accumulator of the current epoch's window (what ``statistics("epoch")`` reads)."""
        return self._stats.current

    def all_reduce_statistics(self, ranks) -> None:
        """Combine the current epoch's statistics across the ranks of ``ranks`` (a
        :class:`~bgflow_gate.distributed.Ranks`; a collective), so that every rank's window,
        and the adaptive floor taken from it when the epoch closes, describe all ranks' samples."""
        self._stats.current.all_reduce(ranks)

    def reset_statistics(self) -> None:
        """Forget all statistics (the epoch and the adaptive floor stay)."""
        self._stats.reset()

    def report(self, window: str = "epoch") -> str:
        """A one-paragraph, human-readable account of what the gate did in ``window``."""
        return describe_statistics(self.statistics(window), window,
                                   self.e_max_kt if self.temperature is not None else None)

    # -- persistence (part of the module's state_dict) -------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "floor": self._floor,
            "relax": self._relax,
            "schedule": self.schedule.to_dict(),
            "above_cut": self.above_cut,
            "statistics": self._stats.state_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule = schedule_from_dict(state["schedule"])
        self._epoch = float(state["epoch"])
        self._floor = state["floor"]
        self._relax = float(state.get("relax", 1.0))
        self.above_cut = state.get("above_cut", self.above_cut)
        self._stats.load_state_dict(state["statistics"])

    def extra_repr(self) -> str:
        temp = "" if self.temperature is None else f", temperature={self.temperature:g}"
        adaptive = "" if self.adaptive_quantile is None else f", adaptive_quantile={self.adaptive_quantile:g}"
        return (f"schedule={self.schedule!r}, e_cut={self.e_cut:g}, target_unit={self.target_unit!r}"
                f"{temp}{adaptive}, above_cut={self.above_cut!r}")


def gate_for(generator, gate: "ScheduledEnergyGate | bool | None", train_energy: bool,
             options: dict) -> "ScheduledEnergyGate | None":
    """The gate a trainer uses: none for ``gate=False``; the generator's target if it is a
    gate; a given gate (it must wrap the generator's target); otherwise a new one built by
    :meth:`ScheduledEnergyGate.for_generator` from ``options`` (none without energy training)."""
    target = generator_target(generator)
    if gate is False:
        if isinstance(target, ScheduledEnergyGate):
            raise ValueError("gate=False, but the generator's target is a gate; give it the raw target")
        return None
    if isinstance(target, ScheduledEnergyGate):
        if gate is not None and gate is not target:
            raise ValueError("the generator's target is already a gate; do not pass another one")
        return target
    if gate is not None:
        if gate.target is not target:
            raise ValueError("gate must wrap the generator's target (gate.target is not the generator's target)")
        return gate
    if target is None or not train_energy:
        return None
    return ScheduledEnergyGate.for_generator(generator, **options)
