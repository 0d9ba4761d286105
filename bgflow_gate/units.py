"""Energy units: kJ/mol and kT (reduced units at a temperature in K)."""

from __future__ import annotations

from .validation import check_number

__all__ = ["MOLAR_GAS_CONSTANT", "KJ_PER_MOL", "KT", "parse_unit", "kt_in_kjmol", "check_temperature"]

#: Molar gas constant R in kJ/(mol K) (CODATA 2018, exact).
MOLAR_GAS_CONSTANT = 8.314462618e-3

KJ_PER_MOL = "kJ/mol"
KT = "kT"

_ALIASES = {"kj/mol": KJ_PER_MOL, "kj mol-1": KJ_PER_MOL, "kj_per_mol": KJ_PER_MOL, "kt": KT}


def parse_unit(unit: str, *, name: str = "unit") -> str:
    """Return the canonical unit name, ``"kJ/mol"`` or ``"kT"``.

    Raises
    ------
    ValueError
        If ``unit`` is neither (the message names the argument ``name``).
    """
    if isinstance(unit, str) and unit.strip().lower() in _ALIASES:
        return _ALIASES[unit.strip().lower()]
    raise ValueError(f"{name} must be 'kJ/mol' or 'kT', got {unit!r}")


def check_temperature(temperature: float, *, name: str = "temperature") -> float:
    """Validate a temperature in K and return it as a float."""
    return check_number(temperature, name, "temperature in K", lower=0, strict=True)


def kt_in_kjmol(temperature: float) -> float:
    """The thermal energy kT (per mole, i.e. RT) in kJ/mol at ``temperature`` K.

    >>> round(kt_in_kjmol(300.0), 4)
    2.4943
    """
    return MOLAR_GAS_CONSTANT * check_temperature(temperature)
