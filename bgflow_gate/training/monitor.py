"""The training-health monitor: the warning signs of a stalled gated training, read from
the epoch history."""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..validation import check_number

__all__ = ["TrainingHealthWarning", "HealthMonitor", "StallRemedy"]


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
        expected_skip_rate: dict | None = None,
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
            message = self._checks()[name](recent, stage)
            if message:
                self.fired[name] = epoch
                text = f"epoch {epoch}: {message}"
                warnings.warn(text, TrainingHealthWarning, stacklevel=6)  # at the train() call
                alerts.append((name, text))
        return alerts

    def _checks(self) -> dict:
        """Each check's function: ``(records since it was armed, stage) -> message or None``."""
        return {
            "all_skipped": self._all_skipped,
            "skip_rate_high": self._skip_rate_high,
            "energy_rising": self._energy_rising,
            "logdet_flat": self._logdet_flat,
            "loss_flat": self._loss_flat,
        }

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


class StallRemedy:
    """What a trainer does with the monitor's findings at the end of an epoch.

    Every alert goes into the epoch record; with ``on_stall="relax"`` a stall
    (:data:`STALL_CHECKS`) multiplies the gate's E_max by ``relax_factor``, is recorded as an
    action, and re-arms the check, so a run still stalled relaxes again.
    """

    #: Monitor checks that ``on_stall="relax"`` answers by raising E_max.
    STALL_CHECKS = ("all_skipped", "skip_rate_high")

    def __init__(self, monitor: HealthMonitor, on_stall: str = "warn", relax_factor: float = 10.0):
        if on_stall not in ("warn", "relax"):
            raise ValueError(f"on_stall must be 'warn' or 'relax', got {on_stall!r}")
        self.monitor, self.on_stall = monitor, on_stall
        self.relax_factor = check_number(relax_factor, "relax_factor", "factor", lower=1, strict=True)

    def apply(self, history: list[dict], gate, speak: bool = True) -> None:
        """Check the history (its last record is the epoch just finished) and act on it;
        ``speak=False`` keeps the warnings quiet (ranks other than 0)."""
        record = history[-1]
        stage = gate.schedule.stage_of(record["epoch"]) if gate is not None else "default"
        with warnings.catch_warnings():
            if not speak:
                warnings.simplefilter("ignore", TrainingHealthWarning)
            checks = self.monitor.check(history, stage)
        for name, message in checks:
            record["alerts"].append(message)
            if name in self.STALL_CHECKS and self.on_stall == "relax" and gate is not None:
                gate.relax(self.relax_factor)
                record["actions"].append(
                    f"epoch {record['epoch']}: relaxed E_max by x{self.relax_factor:g} to {gate.e_max:.3g} kJ/mol")
                self.monitor.rearm(name, record["epoch"] + 1)
