"""Argument checks shared by the package: one message format for every bad number."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_number", "check_whole", "check_fraction", "check_open_fraction"]


def check_number(value: Any, name: str, what: str, *, lower: float | None = None, strict: bool = False) -> float:
    """``float(value)`` if it is finite and not below ``lower``; otherwise a ``ValueError``.

    Parameters
    ----------
    value : Any
        The value to check.
    name : str
        The argument's name, used in the message.
    what : str
        What the number stands for, with its unit (``"energy in kJ/mol"``).
    lower : float, optional
        Smallest allowed value (exclusive with ``strict=True``). With ``lower=0`` the
        message says "non-negative" (or "positive" when strict).

    Examples
    --------
    >>> check_number(300, "temperature", "temperature in K", lower=0, strict=True)
    300.0
    >>> check_number("1e10", "e_initial", "energy in kJ/mol")
    Traceback (most recent call last):
    ...
    ValueError: e_initial must be a finite energy in kJ/mol, got '1e10' (a string; give a number)
    >>> check_number(-1, "e_final", "energy in kJ/mol", lower=0, strict=True)
    Traceback (most recent call last):
    ...
    ValueError: e_final must be a positive, finite energy in kJ/mol, got -1
    """
    kind, bound = "", ""
    if lower == 0:
        kind = "positive, " if strict else "non-negative, "
    elif lower is not None:
        bound = f" {'greater than' if strict else 'at least'} {lower:g}"
    message = f"{name} must be a {kind}finite {what}{bound}, got {value!r}"
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{message} (a string; give a number)")
    if isinstance(value, bool):
        raise ValueError(message)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not math.isfinite(out) or (lower is not None and (out < lower or (strict and out == lower))):
        raise ValueError(message)
    return out


def check_open_fraction(value: Any, name: str) -> float:
    """``float(value)`` if it lies strictly between 0 and 1; otherwise a ``ValueError``."""
    out = check_number(value, name, "number", lower=0, strict=True)
    if out >= 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return out


def check_whole(value: Any, name: str, minimum: int) -> int:
    """``int(value)`` if it is a whole number (not a bool) of at least ``minimum``; otherwise a
    ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_fraction(value: Any, name: str) -> float:
    """``float(value)`` if it lies in ``[0, 1]``; otherwise a ``ValueError``."""
    out = check_number(value, name, "fraction", lower=0)
    if out > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return out
