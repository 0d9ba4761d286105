"""E_max schedules: the gate's rejection threshold as a function of the training epoch.

A schedule is a callable ``schedule(epoch) -> E_max`` in kJ/mol. Epochs are floats
(``epoch = iteration / iters_per_epoch``), so E_max moves smoothly within an epoch.

``ThreeStageSchedule``
    lenient, then a log-linear descent, then strict (the default).
``LinearSchedule``
    the legacy linear descent that tightened too early and stalled training; kept so the
    failure can be reproduced and compared.
``ConstantSchedule``
    a fixed E_max.

Every schedule validates its arguments, describes itself as a table (``describe``),
round-trips through a plain dict (``to_dict`` / :func:`schedule_from_dict`) and has
``state_dict`` / ``load_state_dict`` like ``torch.optim.lr_scheduler``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Iterable, Mapping

from .units import kt_in_kjmol
from .validation import check_number

__all__ = [
    "Schedule",
    "ThreeStageSchedule",
    "LinearSchedule",
    "ConstantSchedule",
    "schedule_from_dict",
    "as_schedule",
    "SCHEDULE_TYPES",
]


def _energy(value: Any, name: str) -> float:
    return check_number(value, name, "energy in kJ/mol", lower=0, strict=True)


def _epochs(value: Any, name: str, *, positive: bool = False) -> float:
    return check_number(value, name, "number of epochs", lower=0, strict=positive)


def _check_tightens(e_initial: float, e_final: float) -> None:
    if e_final > e_initial:
        raise ValueError(
            f"e_final ({e_final:g} kJ/mol) must not exceed e_initial "
            f"({e_initial:g} kJ/mol): the gate tightens over training"
        )


def _fmt_epoch(epoch: float) -> str:
    return f"{epoch:g}"


class Schedule:
    """Base class of E_max schedules.

    Subclasses define ``type`` (the name used in dicts), ``_params`` (constructor argument
    names), ``_value(epoch)`` and ``stages()``.
    """

    type: str = ""
    _params: tuple[str, ...] = ()

    def __call__(self, epoch: float) -> float:
        """E_max in kJ/mol at ``epoch`` (a non-negative float)."""
        return self._value(_epochs(epoch, "epoch"))

    def _value(self, epoch: float) -> float:
        raise NotImplementedError

    @property
    def final_e_max(self) -> float:
        """The E_max the schedule ends at, kJ/mol (the strictest it gets)."""
        return self._value(math.inf)

    def stages(self) -> list[tuple[str, float, float, str]]:
        """The stages as ``(name, first_epoch, end_epoch, description)``; the last ends at inf."""
        raise NotImplementedError

    def default_epochs(self) -> list[float]:
        """Epochs at which :meth:`describe` tabulates E_max by default."""
        raise NotImplementedError

    # -- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain dict ``{"type": ..., <arguments>}``; :func:`schedule_from_dict` inverts it."""
        return {"type": self.type, **{p: getattr(self, p) for p in self._params}}

    def state_dict(self) -> dict[str, Any]:
        """The schedule's arguments (it has no other state)."""
        return {p: getattr(self, p) for p in self._params}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the arguments from :meth:`state_dict`, validated as in the constructor."""
        unknown = set(state) - set(self._params)
        if unknown:
            raise ValueError(
                f"unknown key(s) for {type(self).__name__}: {', '.join(sorted(unknown))}"
            )
        merged = {**self.state_dict(), **state}
        fresh = type(self)(**merged)
        self.__dict__.update(fresh.__dict__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p):g}" for p in self._params)
        return f"{type(self).__name__}({args})"

    # -- description -------------------------------------------------------------------

    def stage_of(self, epoch: float) -> str:
        """The name of the stage ``epoch`` falls in."""
        epoch = _epochs(epoch, "epoch")
        for name, start, end, _ in self.stages():
            if start <= epoch < end:
                return name
        return self.stages()[-1][0]

    def describe(
        self, epochs: Iterable[float | None] = None, temperature: float | None = None
    ) -> str:
        """A readable table: the stage boundaries and E_max at chosen epochs.

        Parameters
        ----------
        epochs : iterable of float, optional
            Epochs to tabulate; default :meth:`default_epochs`.
        temperature : float, optional
            Temperature in K; adds a column with E_max in kT.
        """
        epochs = sorted({_epochs(e, "epoch") for e in (epochs if epochs is not None else self.default_epochs())})
        lines = [repr(self), "", "stages:"]
        for name, start, end, text in self.stages():
            span = (
                f"epoch >= {_fmt_epoch(start)}"
                if math.isinf(end)
                else f"{_fmt_epoch(start)} <= epoch < {_fmt_epoch(end)}"
            )
            lines.append(f"  {name:<8} {span:<24} {text}")
        kt = kt_in_kjmol(temperature) if temperature is not None else None
        header = f"{'epoch':>10}  {'stage':<8}  {'E_max [kJ/mol]':>15}"
        if kt is not None:
            header += f"  {'E_max [kT @ ' + format(temperature, 'g') + ' K]':>20}"
        lines += ["", header]
        for e in epochs:
            value = self._value(e)
            row = f"{_fmt_epoch(e):>10}  {self.stage_of(e):<8}  {value:>15.4e}"
            if kt is not None:
                row += f"  {value / kt:>20.4e}"
            lines.append(row)
        return "\n".join(lines)


class ThreeStageSchedule(Schedule):
    """Lenient, then log-linear descent, then strict.

    ``E_max(epoch)`` in kJ/mol:

    * stage 1, ``epoch < hold_epochs``: ``e_initial``
    * stage 2, ``hold_epochs <= epoch < warmup_epochs``:
      ``log E_max = log e_initial + p (log e_final - log e_initial)`` with
      ``p = (epoch - hold_epochs) / (warmup_epochs - hold_epochs)``
    * stage 3, ``epoch >= warmup_epochs``: ``e_final``

    Parameters
    ----------
    e_initial : float
        E_max of stage 1, kJ/mol (default 1e10).
    e_final : float
        E_max of stage 3, kJ/mol (default 1e5); at most ``e_initial``.
    hold_epochs : float
        End of stage 1 (default 50).
    warmup_epochs : float
        End of stage 2 (default 300); greater than ``hold_epochs``.

    Examples
    --------
    >>> s = ThreeStageSchedule()
    >>> f"{s(175):.3e}"
    '3.162e+07'
    """

    type = "three_stage"
    _params = ("e_initial", "e_final", "hold_epochs", "warmup_epochs")

    def __init__(
        self,
        e_initial: float = 1e10,
        e_final: float = 1e5,
        hold_epochs: float = 50,
        warmup_epochs: float = 300,
    ):
        self.e_initial = _energy(e_initial, "e_initial")
        self.e_final = _energy(e_final, "e_final")
        self.hold_epochs = _epochs(hold_epochs, "hold_epochs")
        self.warmup_epochs = _epochs(warmup_epochs, "warmup_epochs")
        _check_tightens(self.e_initial, self.e_final)
        if self.hold_epochs >= self.warmup_epochs:
            raise ValueError(
                f"hold_epochs ({self.hold_epochs:g}) must be smaller than warmup_epochs "
                f"({self.warmup_epochs:g}): stage 2 runs from hold_epochs to warmup_epochs"
            )

    def _value(self, epoch: float) -> float:
        if epoch < self.hold_epochs:
            return self.e_initial
        if epoch >= self.warmup_epochs:
            return self.e_final
        p = (epoch - self.hold_epochs) / (self.warmup_epochs - self.hold_epochs)
        if p == 0.0:
            return self.e_initial
        log_e = math.log(self.e_initial) + p * (math.log(self.e_final) - math.log(self.e_initial))
        # exp(log(.)) may round past the ends; keep the schedule within [e_final, e_initial]
        return min(max(math.exp(log_e), self.e_final), self.e_initial)

    def stages(self) -> list[tuple[str, float, float, str]]:
        return [
            ("hold", 0.0, self.hold_epochs, f"E_max = {self.e_initial:.4e} kJ/mol"),
            (
                "warm-up",
                self.hold_epochs,
                self.warmup_epochs,
                f"log-linear {self.e_initial:.4e} -> {self.e_final:.4e} kJ/mol",
            ),
            ("final", self.warmup_epochs, math.inf, f"E_max = {self.e_final:.4e} kJ/mol"),
        ]

    def default_epochs(self) -> list[float]:
        span = self.warmup_epochs - self.hold_epochs
        return [0.0] + [self.hold_epochs + f * span for f in (0.0, 0.25, 0.5, 0.75, 1.0)]


class LinearSchedule(Schedule):
    """The legacy schedule: linear descent from ``e_initial`` to ``e_final``, then constant.

    ``E_max(epoch) = e_initial - p (e_initial - e_final)`` with
    ``p = min(epoch / epochs, 1)``. With its defaults (1e7 -> 1e4 kJ/mol over 100 epochs) it
    rejects every sample of an untrained molecular flow long before the flow has learned
    anything: it is kept to reproduce and compare that failure, not for new runs.

    Parameters
    ----------
    e_initial : float
        E_max at epoch 0, kJ/mol (default 1e7).
    e_final : float
        E_max from ``epochs`` on, kJ/mol (default 1e4); at most ``e_initial``.
    epochs : float
        Length of the descent (default 100); positive.
    """

    type = "linear"
    _params = ("e_initial", "e_final", "epochs")

    def __init__(self, e_initial: float = 1e7, e_final: float = 1e4, epochs: float = 100):
        self.e_initial = _energy(e_initial, "e_initial")
        self.e_final = _energy(e_final, "e_final")
        self.epochs = _epochs(epochs, "epochs", positive=True)
        _check_tightens(self.e_initial, self.e_final)

    def _value(self, epoch: float) -> float:
        p = min(epoch / self.epochs, 1.0)
        return self.e_initial - p * (self.e_initial - self.e_final)

    def stages(self) -> list[tuple[str, float, float, str]]:
        return [
            (
                "descent",
                0.0,
                self.epochs,
                f"linear {self.e_initial:.4e} -> {self.e_final:.4e} kJ/mol",
            ),
            ("final", self.epochs, math.inf, f"E_max = {self.e_final:.4e} kJ/mol"),
        ]

    def default_epochs(self) -> list[float]:
        return [f * self.epochs for f in (0.0, 0.25, 0.5, 0.75, 1.0)]


class ConstantSchedule(Schedule):
    """A fixed E_max.

    Parameters
    ----------
    value : float
        E_max in kJ/mol at every epoch; positive.
    """

    type = "constant"
    _params = ("value",)

    def __init__(self, value: float):
        self.value = _energy(value, "value")

    def _value(self, epoch: float) -> float:
        return self.value

    def stages(self) -> list[tuple[str, float, float, str]]:
        return [("constant", 0.0, math.inf, f"E_max = {self.value:.4e} kJ/mol")]

    def default_epochs(self) -> list[float]:
        return [0.0]


#: Schedule classes by their ``type`` name.
SCHEDULE_TYPES: dict[str, type[Schedule]] = {
    cls.type: cls for cls in (ThreeStageSchedule, LinearSchedule, ConstantSchedule)
}


def schedule_from_dict(config: Mapping[str, Any]) -> Schedule:
    """Build a schedule from ``{"type": name, <arguments>}`` (the inverse of ``to_dict``).

    Omitted arguments take the class defaults. Unknown types or keys raise ``ValueError``
    naming them and the accepted ones.

    Examples
    --------
    >>> schedule_from_dict({"type": "linear", "epochs": 10})
    LinearSchedule(e_initial=1e+07, e_final=10000, epochs=10)
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"a schedule must be given as a mapping with a 'type' key, got {config!r}")
    if "type" not in config:
        raise ValueError(
            f"schedule has no 'type' key; use one of {', '.join(SCHEDULE_TYPES)}"
        )
    kind = str(config["type"]).replace("-", "_")
    if kind not in SCHEDULE_TYPES:
        raise ValueError(
            f"schedule type {config['type']!r} is unknown; use one of {', '.join(SCHEDULE_TYPES)}"
        )
    cls = SCHEDULE_TYPES[kind]
    args = {k: v for k, v in config.items() if k != "type"}
    unknown = set(args) - set(cls._params)
    if unknown:
        raise ValueError(
            f"unknown key(s) for a {kind} schedule: {', '.join(sorted(unknown))}; "
            f"accepted: {', '.join(cls._params)}"
        )
    required = [
        name
        for name, param in inspect.signature(cls).parameters.items()
        if param.default is inspect.Parameter.empty and name not in args
    ]
    if required:
        raise ValueError(f"a {kind} schedule needs {', '.join(required)}")
    return cls(**args)


def as_schedule(schedule: Any) -> Schedule:
    """Accept a :class:`Schedule`, a schedule dict, a positive number (constant) or ``None``
    (the default :class:`ThreeStageSchedule`)."""
    if schedule is None:
        return ThreeStageSchedule()
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, Mapping):
        return schedule_from_dict(schedule)
    if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
        return ConstantSchedule(float(schedule))
    raise TypeError(
        f"schedule must be a Schedule, a dict with a 'type' key, a number (constant E_max "
        f"in kJ/mol) or None, got {type(schedule).__name__}"
    )

