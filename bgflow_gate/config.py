"""Experiments in YAML: load a file, validate an experiment's settings, fill in defaults.

An experiments file maps experiment names to settings. This version reads the ``gate``
section; every error names the file, the experiment and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

import difflib
from dataclasses import fields as dataclass_fields

import yaml

from .schedules import Schedule, schedule_from_dict
from .units import check_temperature, parse_unit
from .validation import check_number, check_open_fraction

__all__ = [
    "ConfigError",
    "DEFAULT_CONFIG",
    "GATE_DEFAULTS",
    "load_experiments",
    "gate_settings",
    "experiment_schedule",
    "data_settings",
]

#: The experiments file the command line reads unless told otherwise.
DEFAULT_CONFIG = Path("configs") / "experiments.yaml"

#: Defaults of the ``gate`` section (the schedule's own defaults fill its arguments).
GATE_DEFAULTS: dict[str, Any] = {
    "e_cut": 500.0,
    "target_unit": "kJ/mol",
    "temperature": None,
    "adaptive_quantile": None,
    "schedule": {"type": "three_stage"},
}


class ConfigError(ValueError):
    """An experiments file or one of its settings is invalid; the message names where."""


def _reject_unknown(section: Mapping, accepted, prefix: str, where: str) -> None:
    """An error naming every unknown key of ``section`` and the closest accepted one."""
    unknown = sorted(set(section) - set(accepted))
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), list(accepted), n=1)
        parts.append(f"{prefix}.{key}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{where}unknown key(s) {', '.join(parts)}; accepted: {', '.join(accepted)}")


def _section(experiments: Mapping[str, Mapping], name: str, key: str, accepted, where: str) -> Mapping:
    """Section ``key`` of experiment ``name`` (empty if absent), its keys checked against ``accepted``."""
    if name not in experiments:
        raise ConfigError(
            f"{where}no experiment named {name!r}; available: {', '.join(sorted(experiments))}"
        )
    section = experiments[name].get(key, {}) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}{name}.{key} must be a mapping")
    _reject_unknown(section, accepted, f"{name}.{key}", where)
    return section


def load_experiments(path: Union[str, Path]) -> dict[str, dict]:
    """Read an experiments file: a mapping of experiment names to mappings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiments file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{path} must map experiment names to their settings")
    for name, settings in data.items():
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{path}: experiment {name!r} must be a mapping of settings")
    return {str(k): dict(v) for k, v in data.items()}


def gate_settings(experiments: Mapping[str, Mapping], name: str, *, source: str = "") -> dict[str, Any]:
    """The validated ``gate`` section of experiment ``name``, defaults filled in.

    The ``schedule`` entry of the result is a :class:`~bgflow_gate.schedules.Schedule`;
    the other keys are the keyword arguments of :class:`~bgflow_gate.ScheduledEnergyGate`.
    """
    where = f"{source}: " if source else ""
    section = _section(experiments, name, "gate", GATE_DEFAULTS, where)
    merged = {**GATE_DEFAULTS, **section}
    out: dict[str, Any] = {}
    checks = {
        "e_cut": lambda v, key: check_number(v, key, "energy in kJ/mol"),
        "target_unit": lambda v, key: parse_unit(v, name=key),
        "temperature": lambda v, key: None if v is None else check_temperature(v, name=key),
    }
    for key, check in checks.items():
        try:
            out[key] = check(merged[key], f"{name}.gate.{key}")
        except ValueError as err:
            raise ConfigError(f"{where}{err}") from None
    q = merged["adaptive_quantile"]
    try:
        if q is not None and (isinstance(q, (str, bool)) or not isinstance(q, (int, float))):
            raise ValueError("not a number")
        out["adaptive_quantile"] = None if q is None else check_open_fraction(q, "adaptive_quantile")
    except ValueError:
        raise ConfigError(f"{where}{name}.gate.adaptive_quantile must be null or lie in (0, 1), got {q!r}") from None
    try:
        out["schedule"] = schedule_from_dict(merged["schedule"])
    except ValueError as err:
        raise ConfigError(f"{where}{name}.gate.schedule: {err}") from None
    if out["target_unit"] == "kT" and out["temperature"] is None:
        raise ConfigError(f"{where}{name}.gate: target_unit 'kT' needs gate.temperature (K)")
    return out


def experiment_schedule(path: Union[str, Path], name: str) -> Schedule:
    """The schedule of experiment ``name`` in the file at ``path``."""
    return gate_settings(load_experiments(path), name, source=str(path))["schedule"]


def data_settings(experiments: Mapping[str, Mapping], name: str, *, source: str = ""):
    """The validated ``data`` section of experiment ``name`` as
    :class:`~bgflow_gate.systems.data.ReplicaExchangeSettings` (omitted keys take its defaults)."""
    from .systems.data import ReplicaExchangeSettings

    where = f"{source}: " if source else ""
    accepted = [f.name for f in dataclass_fields(ReplicaExchangeSettings)]
    section = _section(experiments, name, "data", accepted, where)
    try:
        return ReplicaExchangeSettings(**section)
    except ValueError as err:
        raise ConfigError(f"{where}{name}.data: {err}") from None
