"""Alanine dipeptide for the tests: the openmm topology and positions, built offline."""

from __future__ import annotations

import warnings

import numpy as np
import pytest


def alanine_openmm():
    """``(openmm topology, positions [22, 3] in nm)`` of alanine dipeptide in vacuum, no constraints."""
    testsystems = pytest.importorskip("openmmtools.testsystems")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        system = testsystems.AlanineDipeptideVacuum(constraints=None)
    positions = np.asarray(system.positions.value_in_unit(system.positions.unit), dtype=np.float64)
    return system.topology, positions
