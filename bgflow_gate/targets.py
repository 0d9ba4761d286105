"""What the gate needs to know about a target energy: which one a generator has, and the
unit its energies come in.

The unit is never guessed. Recognised: bgflow's (and the host's) ``OpenMMEnergy``, whose
energies are in kT at the temperature of its bridge's integrator, and any energy that
declares ``unit = "kT"`` with a ``temperature`` in K (such as
:class:`~bgflow_gate.TorchEnergy`). Any other target needs ``target_unit``.
"""

from __future__ import annotations

from typing import Any

from .units import KT, check_temperature, parse_unit

__all__ = ["generator_target", "energy_unit"]


def generator_target(generator: Any) -> Any:
    """The target energy of a bgflow ``BoltzmannGenerator`` (``None`` if it has none).

    bgflow offers no public accessor for it; the generator registers it as its child
    module ``_target``, which ``named_children()`` lists. This is the one place that
    relies on that.
    """
    return dict(generator.named_children()).get("_target")


def _declared_unit(target: Any) -> tuple[str, float] | None:
    """``("kT", T)`` for an OpenMM energy (its integrator's temperature) or an energy that
    declares ``unit`` and ``temperature``; ``None`` when the target says nothing."""
    integrator = getattr(getattr(target, "bridge", None), "integrator", None)
    if integrator is not None and hasattr(integrator, "getTemperature"):
        t = integrator.getTemperature()
        return KT, float(t.value_in_unit(t.unit) if hasattr(t, "value_in_unit") else t)
    unit = getattr(target, "unit", None)
    if isinstance(unit, str) and getattr(target, "temperature", None) is not None:
        return parse_unit(unit, name=f"{type(target).__name__}.unit"), float(target.temperature)
    return None


def energy_unit(target: Any, target_unit: str | None = None, temperature: float | None = None) -> tuple[str, float | None]:
    """The unit of ``target``'s energies and the temperature (K) of a kT unit.

    A target that declares its unit (see the module) needs neither argument; one that
    contradicts it is an error. Any other target needs ``target_unit`` (and ``temperature``
    with ``"kT"``).
    """
    declared = _declared_unit(target)
    name = type(target).__name__
    if declared is None:
        if target_unit is None:
            raise ValueError(
                f"the unit of the target's energies ({name}) cannot be determined; pass "
                f"target_unit='kJ/mol', or target_unit='kT' with temperature=<K>"
            )
        unit = parse_unit(target_unit, name="target_unit")
        if unit == KT and temperature is None:
            raise ValueError(
                "target_unit='kT' needs temperature (in K) to convert the thresholds, which are in kJ/mol; "
                "pass the temperature the target's energies are reduced at"
            )
        return unit, None if temperature is None else check_temperature(temperature)
    unit, t = declared
    if target_unit is not None and parse_unit(target_unit, name="target_unit") != unit:
        raise ValueError(f"target_unit={target_unit!r} contradicts the target: {name} energies are in {unit} at {t:g} K")
    if temperature is not None and abs(check_temperature(temperature) - t) > 1e-6 * t:
        raise ValueError(
            f"temperature={temperature!r} K contradicts the target ({name} at {t:g} K), whose kT is the unit "
            f"of its energies; leave temperature out"
        )
    return unit, t
