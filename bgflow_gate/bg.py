"""The resolved bgflow API: real ``bgflow`` when it imports, otherwise the built-in host.

``from bgflow_gate import bg`` gives a module whose attributes are those of the resolved
implementation, so a bgflow script ports by replacing ``import bgflow as bg`` with
``from bgflow_gate import bg``::

    from bgflow_gate import bg
    bg.Energy          # bgflow.Energy, or bgflow_gate.host.Energy
    bg.HOST            # "bgflow" or "builtin"
    bg.module          # the resolved module itself

The choice is made once, at import, from the environment variable ``BGFLOW_GATE_HOST``:

``auto`` (or unset)
    real ``bgflow`` if it is installed and imports; if it is absent, the built-in host; if
    it is installed but fails to import (NumPy >= 2 does that to bgflow), the built-in
    host with a one-line warning naming the cause.
``builtin``
    always the built-in host (:mod:`bgflow_gate.host`).
``bgflow``
    real ``bgflow``; an ``ImportError`` that names the cause if it does not import.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from types import ModuleType

__all__ = ["HOST", "module", "resolve", "ENV_VAR", "HostImportWarning"]

ENV_VAR = "BGFLOW_GATE_HOST"
_CHOICES = ("auto", "builtin", "bgflow")


class HostImportWarning(UserWarning):
    """bgflow is installed but failed to import; the built-in host is used instead."""


def _forget_partial_bgflow() -> None:
    # A failed import can leave half-initialised bgflow submodules behind.
    for name in [n for n in sys.modules if n == "bgflow" or n.startswith("bgflow.")]:
        del sys.modules[name]


def _import_bgflow() -> ModuleType:
    # bgflow imports openmmtools, whose pymbar logs a timeseries warning and a "JAX NOT FOUND"
    # banner on import: third-party noise that importing bgflow_gate should not print
    pymbar = logging.getLogger("pymbar")
    level = pymbar.level
    pymbar.setLevel(max(level, logging.ERROR))
    try:
        return importlib.import_module("bgflow")
    except BaseException:
        _forget_partial_bgflow()
        raise
    finally:
        pymbar.setLevel(level)


def _builtin() -> ModuleType:
    from . import host

    return host


def resolve(choice: str | None = None) -> tuple[ModuleType, str]:
    """Pick the bgflow implementation.

    Parameters
    ----------
    choice : str, optional
        ``"auto"``, ``"builtin"`` or ``"bgflow"``; default: the value of
        ``BGFLOW_GATE_HOST``, or ``"auto"`` when it is unset or empty.

    Returns
    -------
    module : ModuleType
        ``bgflow`` or :mod:`bgflow_gate.host`.
    name : str
        ``"bgflow"`` or ``"builtin"``.

    Raises
    ------
    ValueError
        If the choice is not one of the three names.
    ImportError
        If ``"bgflow"`` is demanded and bgflow does not import.
    """
    choice = _checked_choice(choice)
    if choice == "builtin":
        return _builtin(), "builtin"
    try:
        return _import_bgflow(), "bgflow"
    except Exception as err:  # bgflow raises AttributeError under NumPy >= 2
        if choice == "bgflow":
            raise ImportError(
                f"{ENV_VAR}=bgflow demands the real bgflow, but 'import bgflow' failed "
                f"({_cause(err)}). bgflow needs torch, einops and numpy<2; unset {ENV_VAR} to "
                f"use the built-in host."
            ) from err
        if not (isinstance(err, ModuleNotFoundError) and err.name == "bgflow"):
            warnings.warn(
                f"bgflow is installed but failed to import ({_cause(err)}); using "
                f"bgflow-gate's built-in host",
                HostImportWarning,
                stacklevel=2,
            )
        return _builtin(), "builtin"


def _checked_choice(choice: str | None) -> str:
    """The choice, lower-cased; ``BGFLOW_GATE_HOST`` (or ``"auto"``) when ``None``."""
    if choice is None:
        choice = os.environ.get(ENV_VAR, "").strip() or "auto"
    choice = choice.lower()
    if choice not in _CHOICES:
        raise ValueError(
            f"{ENV_VAR}={choice!r} is not understood; use one of {', '.join(_CHOICES)}"
        )
    return choice


def _cause(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


module, HOST = resolve()


def __getattr__(name: str):
    # Every other attribute comes from the resolved implementation.
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(
            f"the {HOST} host ({module.__name__}) has no attribute {name!r}"
        ) from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(dir(module)))
