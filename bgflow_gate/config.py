"""Experiments in YAML: load a file, validate an experiment's settings, fill in defaults.

An experiments file maps experiment names to settings. An experiment has the sections
``data`` (replica exchange), ``gate`` (the energy gate), ``model`` (the generator),
``training`` (the route and its stages), ``energy`` (the target: OpenMM or its batched
PyTorch equivalent) and ``evaluation``,
plus the top-level keys ``device``, ``use_energy_gating``, ``E_cut`` and ``E_max`` (the
latter two are shorthands for ``gate.e_cut`` and the schedule's final E_max). Every error
names the file, the experiment and the key, and an unknown key the closest valid one.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .gate import ABOVE_CUT, check_e_cut
from .schedules import Schedule, schedule_from_dict
from .units import check_temperature, parse_unit
from .validation import check_fraction, check_number, check_open_fraction, check_whole

__all__ = [
    "ConfigError",
    "DEFAULT_CONFIG",
    "PRESET_KIND",
    "GATE_DEFAULTS",
    "load_experiments",
    "parse_yaml",
    "training_experiments",
    "gate_settings",
    "experiment_schedule",
    "data_settings",
    "run_settings",
    "resolve_device",
    "TOP_LEVEL_KEYS",
    "MODEL_DEFAULTS",
    "TRAINING_DEFAULTS",
    "ENERGY_DEFAULTS",
    "EVALUATION_DEFAULTS",
    "MODEL_KINDS",
    "ROUTES",
    "ENERGY_BACKENDS",
]

#: The experiments file the command line reads unless told otherwise: shipped with the
#: package, so the installed command finds it from any directory (``--config`` overrides).
DEFAULT_CONFIG = Path(__file__).with_name("experiments.yaml")

#: The ``kind`` of an entry that holds only a gate schedule (``default``, ``legacy_linear``,
#: ``lenient``): ``bgflow-gate schedule`` shows it; ``train`` and ``data`` refuse it.
PRESET_KIND = "schedule_preset"

#: Defaults of the ``gate`` section (the schedule's own defaults fill its arguments).
GATE_DEFAULTS: dict[str, Any] = {
    "e_cut": 500.0,
    "target_unit": "kJ/mol",
    "temperature": None,
    "adaptive_quantile": None,
    "above_cut": "energy",
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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes: numbers in scientific notation without a dot
    (``1e5``, ``-2E-3``) are floats, as people write them (YAML 1.1 reads them as strings),
    and a key given twice in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: key {key!r} given twice (also on line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "") -> Any:
    r"""YAML text as Python values, read as the experiments file is read: ``1e5`` is a float,
    and a duplicate key is a :class:`ConfigError` naming ``source`` and both lines.

    Examples
    --------
    >>> parse_yaml("E_max: 1e5\nhold_epochs: 50\n")
    {'E_max': 100000.0, 'hold_epochs': 50}
    """
    where = f"{source}: " if source else ""
    try:
        return yaml.load(text, Loader=_Loader)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source or 'the text'} is not valid YAML: {' '.join(str(err).split())}") from None


def _read_text(path: Path) -> str:
    """The text of an experiments file; a clear error for anything that is not one."""
    if path.is_dir():
        raise ConfigError(f"experiments file {path} is a directory; pass the YAML file itself to --config")
    if not path.is_file():
        raise ConfigError(f"experiments file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"experiments file {path} is not a text file (YAML expected); check the --config path") from None
    except OSError as err:
        raise ConfigError(f"experiments file {path} cannot be read: {err.strerror}") from None


def load_experiments(path: str | Path) -> dict[str, dict]:
    """Read an experiments file: a mapping of experiment names to mappings.

    Numbers may be written ``1e5`` (a float) and a key given twice is an error (see
    :func:`parse_yaml`); every error is a :class:`ConfigError` that names the file.
    """
    path = Path(path)
    data = parse_yaml(_read_text(path), str(path))
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
    merged["schedule"] = dict(merged["schedule"] or {}) if isinstance(merged["schedule"], Mapping) else merged["schedule"]
    _apply_shorthands(experiments[name], merged, name, where)
    out: dict[str, Any] = {}
    checks = {
        "target_unit": lambda v, key: parse_unit(v, name=key),
        "above_cut": lambda v, key: _choice(v, key, tuple(ABOVE_CUT)),
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
    try:  # the gate's own rule, 0 < E_cut < the final E_max
        out["e_cut"] = check_e_cut(merged["e_cut"], out["schedule"])
    except ValueError as err:
        raise ConfigError(f"{where}{name}.gate.e_cut: {err}") from None
    return out


def _final_key(schedule: Mapping) -> str:
    """The schedule argument that holds the final E_max."""
    return "value" if schedule.get("type") == "constant" else "e_final"


def _apply_shorthands(experiment: Mapping, gate: dict, name: str, where: str) -> None:
    """Fold the seed's top-level ``E_cut`` / ``E_max`` into the gate settings; a value given
    twice must agree."""
    for short, key in (("E_cut", "e_cut"), ("E_max", None)):
        if short not in experiment:
            continue
        value = experiment[short]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{name}.{short} must be an energy in kJ/mol, got {value!r}")
        if not isinstance(gate["schedule"], Mapping):
            raise ConfigError(f"{where}{name}.gate.schedule must be a mapping")
        holder, field = (gate, key) if key else (gate["schedule"], _final_key(gate["schedule"]))
        explicit = experiment.get("gate") or {}
        given = explicit.get(key) if key else (explicit.get("schedule") or {}).get(field)
        if given is not None and float(given) != float(value):
            where_given = f"gate.{key}" if key else f"gate.schedule.{field}"
            raise ConfigError(f"{where}{name}: {short} ({value:g}) and {where_given} ({given:g}) disagree; give one")
        holder[field] = float(value)


def experiment_schedule(path: str | Path, name: str) -> Schedule:
    """The schedule of experiment ``name`` in the file at ``path``."""
    return gate_settings(load_experiments(path), name, source=str(path))["schedule"]


def training_experiments(experiments: Mapping[str, Mapping]) -> list[str]:
    """The names of the entries that ``train`` and ``data`` run (every one but the schedule
    presets), sorted."""
    return sorted(name for name, body in experiments.items() if body.get("kind") != PRESET_KIND)


def _refuse_preset(experiments: Mapping[str, Mapping], name: str, where: str, command: str) -> None:
    """A :class:`ConfigError` when ``name`` is a schedule preset or has an unknown ``kind``."""
    kind = experiments[name].get("kind", "experiment")
    if kind not in ("experiment", PRESET_KIND):
        raise ConfigError(f"{where}{name}.kind must be 'experiment' or {PRESET_KIND!r}, got {kind!r}")
    if kind == PRESET_KIND:
        raise ConfigError(
            f"{where}{name!r} is a schedule preset, not an experiment to {command}: it holds only a gate "
            f"schedule, to show with 'bgflow-gate schedule --experiment {name}' or to copy into an "
            f"experiment's gate section; experiments: {', '.join(training_experiments(experiments))}"
        )


def data_settings(experiments: Mapping[str, Mapping], name: str, *, source: str = ""):
    """The validated ``data`` section of experiment ``name`` as
    :class:`~bgflow_gate.systems.data.ReplicaExchangeSettings` (omitted keys take its defaults)."""
    from .systems.data import ReplicaExchangeSettings

    where = f"{source}: " if source else ""
    accepted = [f.name for f in dataclass_fields(ReplicaExchangeSettings)]
    section = _section(experiments, name, "data", accepted, where)
    _refuse_preset(experiments, name, where, "generate data for")
    try:
        return ReplicaExchangeSettings(**section)
    except ValueError as err:
        raise ConfigError(f"{where}{name}.data: {err}") from None


# -- the training run (bgflow-gate train) -------------------------------------------------

#: Keys an experiment may have at its top level.
TOP_LEVEL_KEYS = (
    "kind", "description", "device", "use_energy_gating", "E_cut", "E_max",
    "data", "gate", "model", "training", "energy", "evaluation",
)

#: ``model.kind``: ``spline`` (the spline generator whose bonds, angles and rigid block are
#: standardised on the MD training frames, :func:`~bgflow_gate.systems.generators.spline_generator`)
#: or ``physical`` (built without MD data around the energy minimum,
#: :func:`~bgflow_gate.systems.physical.physical_generator`).
MODEL_KINDS = ("spline", "physical")

#: ``training.route``: ``nll_then_mixed`` (stages nll, control, mixed) or ``kl_only`` (one
#: stage, kl: gated reverse KL, no MD frame in training).
ROUTES = ("nll_then_mixed", "kl_only")

#: ``energy.backend``: ``auto`` (TorchEnergy where it supports the system, else OpenMM),
#: ``torch`` (TorchEnergy, an error where it does not support the system) or ``openmm``.
ENERGY_BACKENDS = ("auto", "torch", "openmm")

#: ``model``: the generator (see :class:`bgflow_gate.systems.generators.ICSplineFlow`);
#: ``rotors`` (``all`` | ``backbone``) applies to the physical generator only.
MODEL_DEFAULTS: dict[str, Any] = {
    "kind": "spline",
    "rotors": "all",
    "n_torsion_layers": 4,
    "n_rest_layers": 4,
    "hidden": 128,
    "n_bins": 8,
    "rest_spline_bins": 0,
    "dtype": "float32",
}

#: ``training``: the NLL stage, then the mixed stage and its NLL-only control, both
#: continuing from the NLL model with the same seed and length. ``warmup_epochs`` is the
#: learning-rate warm-up of the NLL stage (the gate's warm-up is ``gate.schedule``).
TRAINING_DEFAULTS: dict[str, Any] = {
    "route": "nll_then_mixed",
    "batch_size": 256,
    "lr": 1e-3,
    "warmup_epochs": 2,
    "iters_per_epoch": None,
    "nll_epochs": 50,
    "mixed_epochs": 20,
    "mixed_lr": 1e-4,
    "kl_epochs": 400,
    "kl_lr_floor": None,
    "mixed_lr_floor": None,
    "nll_patience": None,
    "rollback_tolerance": None,
    "w_likelihood": 0.9,
    "w_energy": 0.1,
    "skip_policy": "drop",
    "min_keep_fraction": 0.5,
    "max_grad_norm": 10.0,
    "clip_forces": None,
    "on_stall": "relax",
    "test_fraction": 0.2,
    "seed": 0,
}

#: ``energy``: the target of the gated stages and the evaluation: its ``backend`` (see
#: :data:`ENERGY_BACKENDS`), and the OpenMM ``platform`` and ``n_workers`` (backend openmm).
ENERGY_DEFAULTS: dict[str, Any] = {"backend": "auto", "platform": "auto", "n_workers": 1}

#: ``evaluation``: generator samples drawn from each model and the phi/psi histogram.
EVALUATION_DEFAULTS: dict[str, Any] = {"n_samples": 10000, "bins": 60}

_DEVICES = ("cpu", "cuda", "auto")
_DTYPES = ("float32", "float64")


def _choice(value: Any, key: str, choices) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}{hint}")
    return value


def _positive(value: Any, key: str, what: str) -> float:
    return check_number(value, key, what, lower=0, strict=True)


#: Settings that may be null (meaning: one pass over the data per epoch; no clipping).
_NULLABLE = ("iters_per_epoch", "max_grad_norm", "clip_forces", "kl_lr_floor", "mixed_lr_floor", "nll_patience",
             "rollback_tolerance")


def _checked(section: Mapping, defaults: Mapping, checks: Mapping, prefix: str, where: str) -> dict[str, Any]:
    out = {**defaults, **section}
    for key, check in checks.items():
        if out[key] is None and key in _NULLABLE:
            continue
        try:
            out[key] = check(out[key], f"{prefix}.{key}")
        except ValueError as err:
            raise ConfigError(f"{where}{err}") from None
    return out


def _rest_spline_bins(value: Any, key: str) -> int:
    if value == 0 and not isinstance(value, bool):
        return 0
    try:
        return check_whole(value, key, 2)
    except ValueError:
        raise ValueError(f"{key} must be 0 (affine couplings only) or a number of spline bins >= 2, "
                         f"got {value!r}") from None


def _model(section: Mapping, prefix: str, where: str) -> dict[str, Any]:
    checks = {
        "kind": lambda v, k: _choice(v, k, MODEL_KINDS),
        "rotors": lambda v, k: _choice(v, k, ("all", "backbone")),
        "n_torsion_layers": lambda v, k: check_whole(v, k, 1),
        "n_rest_layers": lambda v, k: check_whole(v, k, 1),
        "hidden": lambda v, k: check_whole(v, k, 1),
        "n_bins": lambda v, k: check_whole(v, k, 1),
        "rest_spline_bins": lambda v, k: _rest_spline_bins(v, k),
        "dtype": lambda v, k: _choice(v, k, _DTYPES),
    }
    return _checked(section, MODEL_DEFAULTS, checks, prefix, where)


def _training(section: Mapping, prefix: str, where: str) -> dict[str, Any]:
    from .training import SKIP_POLICIES

    def open_fraction(v, k):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"{k} must lie in (0, 1), got {v!r}")
        return float(v)

    checks = {
        "route": lambda v, k: _choice(v, k, ROUTES),
        "batch_size": lambda v, k: check_whole(v, k, 1),
        "lr": lambda v, k: _positive(v, k, "learning rate"),
        "mixed_lr": lambda v, k: _positive(v, k, "learning rate"),
        "warmup_epochs": lambda v, k: check_number(v, k, "number of epochs (learning-rate warm-up)", lower=0),
        "iters_per_epoch": lambda v, k: check_whole(v, k, 1),
        "nll_epochs": lambda v, k: check_whole(v, k, 1),
        "mixed_epochs": lambda v, k: check_whole(v, k, 1),
        "kl_epochs": lambda v, k: check_whole(v, k, 1),
        "kl_lr_floor": lambda v, k: _floor(v, k),
        "mixed_lr_floor": lambda v, k: _floor(v, k),
        "nll_patience": lambda v, k: check_whole(v, k, 1),
        "rollback_tolerance": lambda v, k: _positive(v, k, "KL-loss rise in kT"),
        "w_likelihood": check_fraction,
        "w_energy": check_fraction,
        "skip_policy": lambda v, k: _choice(v, k, tuple(SKIP_POLICIES)),
        "min_keep_fraction": check_fraction,
        "max_grad_norm": lambda v, k: _positive(v, k, "gradient norm"),
        "clip_forces": lambda v, k: _positive(v, k, "force in kT/nm"),
        "on_stall": lambda v, k: _choice(v, k, ("warn", "relax")),
        "test_fraction": lambda v, k: open_fraction(v, k),
        "seed": lambda v, k: check_whole(v, k, 0),
    }
    out = _checked(section, TRAINING_DEFAULTS, checks, prefix, where)
    if out["w_likelihood"] + out["w_energy"] <= 0:
        raise ConfigError(f"{where}{prefix}: w_likelihood + w_energy must be positive")
    return out


def _energy(section: Mapping, prefix: str, where: str) -> dict[str, Any]:
    checks = {
        "backend": lambda v, k: _choice(v, k, ENERGY_BACKENDS),
        "platform": lambda v, k: _choice(v, k, ("auto", "Reference", "CPU", "CUDA", "OpenCL")),
        "n_workers": lambda v, k: check_whole(v, k, 1),
    }
    return _checked(section, ENERGY_DEFAULTS, checks, prefix, where)


def _floor(value: Any, key: str) -> float:
    """A fraction in (0, 1]: the final learning rate as a fraction of the first."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{key} must be null (a constant learning rate) or lie in (0, 1], got {value!r}")
    return float(value)


def _check_route(sections: Mapping[str, dict], name: str, where: str) -> None:
    """The route's demands on the other sections: ``kl_only`` trains without MD data, so it
    needs the physical generator and an explicit ``iters_per_epoch`` (no data define an epoch)."""
    t, m = sections["training"], sections["model"]
    if t["route"] != "kl_only":
        return
    if m["kind"] != "physical":
        raise ConfigError(f"{where}{name}.model.kind must be 'physical' with training.route 'kl_only' (the spline "
                          f"generator is standardised on MD data), got {m['kind']!r}")
    if t["iters_per_epoch"] is None:
        raise ConfigError(f"{where}{name}.training.iters_per_epoch must be a number with training.route 'kl_only' "
                          "(no training data define an epoch)")


def _evaluation(section: Mapping, prefix: str, where: str) -> dict[str, Any]:
    checks = {"n_samples": lambda v, k: check_whole(v, k, 10), "bins": lambda v, k: check_whole(v, k, 2)}
    return _checked(section, EVALUATION_DEFAULTS, checks, prefix, where)


def resolve_device(requested: str, *, name: str, where: str = "", cuda_available: bool | None = None) -> str:
    """``"cpu"`` or ``"cuda"`` for an experiment's ``device``; an experiment that asks for CUDA
    on a machine without it is an error that says how to run it on the CPU instead."""
    import torch

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        return "cuda" if cuda else "cpu"
    if requested == "cuda" and not cuda:
        raise ConfigError(
            f"{where}experiment {name!r} runs on device 'cuda', but CUDA is not available on this "
            "machine; pass --device cpu to run it on the CPU (slowly), or pick a CPU experiment"
        )
    return requested


def run_settings(
    experiments: Mapping[str, Mapping], name: str, *, source: str = "", device: str | None = None,
    cuda_available: bool | None = None,
) -> dict[str, Any]:
    """Every validated setting of experiment ``name`` for ``bgflow-gate train``.

    Returns a dict with ``name``, ``device`` (resolved: ``"cpu"`` or ``"cuda"``;
    ``device`` overrides the experiment's), ``use_energy_gating``, ``data``
    (:class:`~bgflow_gate.systems.data.ReplicaExchangeSettings`), ``gate`` (see
    :func:`gate_settings`), ``model``, ``training``, ``energy`` and ``evaluation`` (dicts with
    defaults filled in).
    """
    where = f"{source}: " if source else ""
    if name not in experiments:
        raise ConfigError(f"{where}no experiment named {name!r}; available: {', '.join(sorted(experiments))}")
    experiment = experiments[name]
    _reject_unknown(experiment, TOP_LEVEL_KEYS, name, where)
    _refuse_preset(experiments, name, where, "train")
    use_gate = experiment.get("use_energy_gating", True)
    if not isinstance(use_gate, bool):
        raise ConfigError(f"{where}{name}.use_energy_gating must be true or false, got {use_gate!r}")
    try:
        requested = _choice(experiment.get("device", "auto") if device is None else device,
                            f"{name}.device" if device is None else "--device", _DEVICES)
    except ValueError as err:
        raise ConfigError(f"{where}{err}") from None
    sections = {}
    for key, build in (("model", _model), ("training", _training), ("energy", _energy), ("evaluation", _evaluation)):
        defaults = {"model": MODEL_DEFAULTS, "training": TRAINING_DEFAULTS,
                    "energy": ENERGY_DEFAULTS, "evaluation": EVALUATION_DEFAULTS}[key]
        section = _section(experiments, name, key, defaults, where)
        sections[key] = build(section, f"{name}.{key}", where)
    _check_route(sections, name, where)
    return {
        "name": name,
        "device": resolve_device(requested, name=name, where=where, cuda_available=cuda_available),
        "use_energy_gating": use_gate,
        "data": data_settings(experiments, name, source=source),
        "gate": gate_settings(experiments, name, source=source),
        **sections,
    }
