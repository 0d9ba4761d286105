"""Read an ``openmm.System`` into the parameter dictionary of :mod:`.model` (needs OpenMM).

Supported: ``HarmonicBondForce``, ``HarmonicAngleForce``, ``PeriodicTorsionForce``,
``NonbondedForce`` with ``NoCutoff`` (exceptions replace a pair's parameters exactly as
OpenMM applies them; an exception with zero charge product and zero epsilon is an
exclusion), and the OBC generalized-Born ``CustomGBForce`` that OpenMM's
``GBSAOBC1Force`` / ``GBSAOBC2Force`` build (no cutoff, no salt, with or without the ACE
surface term) — recognised by comparing every expression with the ones OpenMM itself
generates. ``CMMotionRemover`` is ignored; anything else raises
:class:`UnsupportedForceError` naming the force.
"""

from __future__ import annotations

import re

import numpy as np
import torch

__all__ = ["UnsupportedForceError", "read_system", "ONE_4PI_EPS0"]

#: Coulomb's constant in kJ/mol nm / e^2 as OpenMM's NonbondedForce uses it (OpenMM >= 7.6).
ONE_4PI_EPS0 = 138.93545764438198
#: The constant OpenMM's GB expressions spell out.
_GB_COULOMB = 138.935485
#: OBC tanh coefficients (alpha, beta, gamma) of GBSAOBC1Force and GBSAOBC2Force.
_OBC_MODELS = {"GBSAOBC1Force": (0.8, 0.0, 2.909125), "GBSAOBC2Force": (1.0, 0.8, 4.85)}


class UnsupportedForceError(ValueError):
    """A force (or a setting of one) that :class:`~bgflow_gate.TorchEnergy` cannot evaluate."""


def _unsupported(index: int, force, why: str) -> UnsupportedForceError:
    name = type(force).__name__
    return UnsupportedForceError(f"force {index} ({name}, named {force.getName()!r}) is not supported: {why}")


def _md(value) -> float:
    """A number from an OpenMM quantity, in OpenMM's MD units (nm, kJ/mol, radians, e)."""
    from openmm import unit

    return value.value_in_unit_system(unit.md_unit_system) if unit.is_quantity(value) else value


def _read_bonds(force) -> dict:
    rows = [force.getBondParameters(b) for b in range(force.getNumBonds())]
    return {
        "atoms": torch.tensor([[r[0], r[1]] for r in rows], dtype=torch.long).reshape(-1, 2),
        "length": torch.tensor([_md(r[2]) for r in rows], dtype=torch.float64),
        "k": torch.tensor([_md(r[3]) for r in rows], dtype=torch.float64),
    }


def _read_angles(force) -> dict:
    rows = [force.getAngleParameters(a) for a in range(force.getNumAngles())]
    return {
        "atoms": torch.tensor([r[:3] for r in rows], dtype=torch.long).reshape(-1, 3),
        "theta0": torch.tensor([_md(r[3]) for r in rows], dtype=torch.float64),
        "k": torch.tensor([_md(r[4]) for r in rows], dtype=torch.float64),
    }


def _read_torsions(force) -> dict:
    rows = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
    return {
        "atoms": torch.tensor([r[:4] for r in rows], dtype=torch.long).reshape(-1, 4),
        "periodicity": torch.tensor([r[4] for r in rows], dtype=torch.float64),
        "phase": torch.tensor([_md(r[5]) for r in rows], dtype=torch.float64),
        "k": torch.tensor([_md(r[6]) for r in rows], dtype=torch.float64),
    }


def _pair_table(i, j, qq, sigma, eps) -> dict:
    keep = (qq != 0) | (eps != 0)
    c6 = 4 * eps * sigma**6
    return {
        "atoms": torch.as_tensor(np.stack([i, j], axis=1)[keep], dtype=torch.long).reshape(-1, 2),
        "qq": torch.as_tensor(ONE_4PI_EPS0 * qq[keep]),
        "c12": torch.as_tensor((c6 * sigma**6)[keep]),
        "c6": torch.as_tensor(c6[keep]),
    }


def _read_nonbonded(index: int, force, openmm) -> dict:
    if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
        raise _unsupported(index, force, f"nonbonded method {force.getNonbondedMethod()} (only NoCutoff, 0)")
    if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
        raise _unsupported(index, force, "parameter offsets (global parameters)")
    n = force.getNumParticles()
    q, sig, eps = (np.array(c) for c in zip(*[[_md(p) for p in force.getParticleParameters(k)] for k in range(n)]))
    exceptions = [force.getExceptionParameters(e) for e in range(force.getNumExceptions())]
    excepted = np.zeros((n, n), dtype=bool)
    for e in exceptions:
        excepted[e[0], e[1]] = excepted[e[1], e[0]] = True
    i, j = np.triu_indices(n, 1)
    regular = ~excepted[i, j]
    i, j = i[regular], j[regular]
    ei = np.array([e[:2] for e in exceptions], dtype=np.int64).reshape(-1, 2)
    values = np.array([[_md(v) for v in e[2:]] for e in exceptions], dtype=np.float64).reshape(-1, 3)
    return _pair_table(
        np.concatenate([i, ei.min(1)]),
        np.concatenate([j, ei.max(1)]),
        np.concatenate([q[i] * q[j], values[:, 0]]),
        np.concatenate([(sig[i] + sig[j]) / 2, values[:, 1]]),
        np.concatenate([np.sqrt(eps[i] * eps[j]), values[:, 2]]),
    )


def _gb_expressions(force) -> tuple:
    """Everything that defines a CustomGBForce's functional form."""
    return (
        tuple(force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())),
        tuple(tuple(force.getComputedValueParameters(k)) for k in range(force.getNumComputedValues())),
        tuple(tuple(force.getEnergyTermParameters(k)) for k in range(force.getNumEnergyTerms())),
        force.getNumGlobalParameters(),
        force.getNumTabulatedFunctions(),
        force.getNonbondedMethod(),
    )


def _obc_model(index: int, force) -> tuple[str, float, float]:
    """Which OBC model the force is (class name, solute and solvent dielectric), or an error."""
    from openmm.app.internal import customgbforces

    terms = [force.getEnergyTermParameters(k)[0] for k in range(force.getNumEnergyTerms())]
    settings = dict(re.findall(r"(solventDielectric|soluteDielectric)=([-+0-9.eE]+)", terms[0] if terms else ""))
    if len(settings) == 2:
        solvent, solute = float(settings["solventDielectric"]), float(settings["soluteDielectric"])
        wanted = _gb_expressions(force)
        for name in _OBC_MODELS:
            for surface in ("ACE", None):
                reference = getattr(customgbforces, name)(solvent, solute, surface, None, 0.0)
                if _gb_expressions(reference) == wanted:
                    return name, solute, solvent
    raise _unsupported(
        index, force, "its expressions are not the OBC generalized-Born model of OpenMM's GBSAOBC1Force "
        "or GBSAOBC2Force (no cutoff, no salt); no other custom expression is supported"
    )


def _read_obc(index: int, force) -> dict:
    name, solute, solvent = _obc_model(index, force)
    alpha, beta, gamma = _OBC_MODELS[name]
    per_atom = np.array([force.getParticleParameters(k) for k in range(force.getNumParticles())], dtype=np.float64)
    has_surface = any(
        force.getEnergyTermParameters(k)[0].startswith("28.3919551*") for k in range(force.getNumEnergyTerms())
    )
    return {
        "charge": torch.as_tensor(per_atom[:, 0]),
        "offset_radius": torch.as_tensor(per_atom[:, 1]),
        "scaled_radius": torch.as_tensor(per_atom[:, 2]),
        "alpha": alpha, "beta": beta, "gamma": gamma, "offset": 0.009,
        "prefactor": -_GB_COULOMB * (1 / solute - 1 / solvent),
        "surface": 28.3919551 if has_surface else 0.0,
    }


def _add(parameters: dict, name: str, table: dict) -> None:
    """Append a force's table to the term ``name`` (several forces of one kind add up)."""
    if name not in parameters:
        parameters[name] = table
        return
    for key, value in table.items():
        parameters[name][key] = torch.cat([parameters[name][key], value])


def _check_system(system) -> None:
    if system.usesPeriodicBoundaryConditions():
        raise UnsupportedForceError("periodic systems are not supported (only NoCutoff, non-periodic)")
    virtual = [k for k in range(system.getNumParticles()) if system.isVirtualSite(k)]
    if virtual:
        raise UnsupportedForceError(f"virtual sites are not supported (particles {virtual[:5]})")


def _read_force(index: int, force, parameters: dict, openmm) -> None:
    kinds = {
        openmm.HarmonicBondForce: ("bonds", _read_bonds),
        openmm.HarmonicAngleForce: ("angles", _read_angles),
        openmm.PeriodicTorsionForce: ("torsions", _read_torsions),
    }
    for kind, (name, read) in kinds.items():
        if isinstance(force, kind):
            _add(parameters, name, read(force))
            return
    if isinstance(force, openmm.NonbondedForce):
        _add(parameters, "pairs", _read_nonbonded(index, force, openmm))
    elif isinstance(force, openmm.CustomGBForce):
        if "obc" in parameters:
            raise _unsupported(index, force, "a second generalized-Born force")
        parameters["obc"] = _read_obc(index, force)
    elif not isinstance(force, openmm.CMMotionRemover):
        raise _unsupported(
            index, force, "supported are HarmonicBondForce, HarmonicAngleForce, PeriodicTorsionForce, "
            "NonbondedForce (NoCutoff), OpenMM's OBC CustomGBForce, and CMMotionRemover (ignored)"
        )


def read_system(system) -> dict:
    """The parameter dictionary (see :mod:`bgflow_gate.energies.model`) of an ``openmm.System``.

    Raises
    ------
    UnsupportedForceError
        For a force, setting or system feature that is not supported; the message names it.
    """
    import openmm

    _check_system(system)
    parameters: dict = {"n_atoms": system.getNumParticles()}
    for index in range(system.getNumForces()):
        _read_force(index, system.getForce(index), parameters, openmm)
    return parameters


def reference_energies(system, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies ``[n]`` (kJ/mol) and forces ``[n, n_atoms, 3]`` (kJ/mol/nm) from OpenMM's
    Reference platform (double precision) for positions ``[n, n_atoms, 3]`` in nm."""
    import openmm
    from openmm import unit

    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for frame in positions:
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(energies), np.array(forces)


def verify_against_reference(system, potential, n_frames: int = 3, rtol: float = 1e-6) -> None:
    """Compare ``potential`` (positions ``[n, 3 * n_atoms]`` -> kJ/mol ``[n, 1]``) with OpenMM's
    Reference platform on atoms spread on a grid with noise; ``RuntimeError`` if they differ.

    Energies must agree to ``rtol`` relative, forces to ``rtol`` of the largest force component.
    """
    n = system.getNumParticles()
    side = int(np.ceil(n ** (1 / 3)))
    grid = 0.3 * np.stack(np.unravel_index(np.arange(n), (side, side, side)), axis=1)
    noise = np.random.default_rng(0).normal(scale=0.03, size=(n_frames, n, 3))
    positions = grid[None] + noise
    energies, forces = reference_energies(system, positions)
    x = torch.tensor(positions.reshape(n_frames, -1), requires_grad=True)
    ours = potential(x)
    (gradient,) = torch.autograd.grad(ours.sum(), x)
    energy_error = np.abs(ours.detach().numpy()[:, 0] - energies) / np.maximum(np.abs(energies), 1e-300)
    force_error = np.abs(-gradient.numpy().reshape(forces.shape) - forces).max() / np.abs(forces).max()
    if energy_error.max() > rtol or force_error > rtol:
        raise RuntimeError(
            f"TorchEnergy disagrees with OpenMM's Reference platform on this system: relative energy "
            f"error {energy_error.max():.3g}, force error {force_error:.3g} (tolerance {rtol:g})"
        )
