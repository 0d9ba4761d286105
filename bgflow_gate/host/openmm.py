"""``OpenMMBridge`` and ``OpenMMEnergy``: molecular energies from OpenMM, in kT.

bgflow's conventions: positions in nm as ``[batch, 3 * n_atoms]``; energies and forces in
units of kT at the integrator's temperature (reduced units); gradients through a custom
autograd function that uses OpenMM's forces.

Unlike bgflow's bridge this one never lies about a failure:

* non-finite coordinates are never sent to OpenMM (it raises on NaN positions);
* a failed or non-finite evaluation (an exception inside OpenMM, coincident atoms that
  give NaN) comes back as ``+inf`` energy with zero force, never 0 and never the previous
  sample's value, and is counted in ``n_failures``;
* there is no cache keyed on the batch's text;
* worker processes are shut down by :meth:`OpenMMBridge.close`, when the bridge is
  garbage-collected, and when the interpreter exits.

``platform_name="auto"`` times a few evaluations on each available platform and keeps the
fastest (for vacuum alanine dipeptide, Reference beats CPU by ~13x; in implicit solvent the
CPU platform wins).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
import warnings
import weakref
from typing import Sequence

import numpy as np
import torch

from ..units import MOLAR_GAS_CONSTANT
from .energy import Energy

__all__ = ["OpenMMBridge", "OpenMMEnergy", "fastest_platform", "ERR_HANDLING"]

#: What ``err_handling`` does with a failed evaluation (it is +inf with zero force in all cases).
ERR_HANDLING = ("ignore", "warning", "exception")


def _grid_positions(n_atoms: int, spacing: float = 0.3) -> np.ndarray:
    """A configuration without overlaps (atoms on a cubic grid), for timing."""
    side = math.ceil(n_atoms ** (1 / 3))
    idx = np.arange(n_atoms)
    return spacing * np.stack([idx % side, (idx // side) % side, idx // side**2], axis=1).astype(float)


class _Evaluator:
    """One OpenMM context: evaluates a batch of positions ``[n, n_atoms, 3]`` (nm)."""

    def __init__(self, system_xml: str, integrator_xml: str, platform_name: str, properties: dict):
        import openmm

        self.openmm = openmm
        system = openmm.XmlSerializer.deserialize(system_xml)
        integrator = openmm.XmlSerializer.deserialize(integrator_xml)
        platform = openmm.Platform.getPlatformByName(platform_name)
        self.context = openmm.Context(system, integrator, platform, properties)

    def evaluate(self, positions: np.ndarray, n_steps: int, want_positions: bool):
        unit = self.openmm.unit
        n = len(positions)
        energies = np.full(n, np.inf)
        forces = np.zeros_like(positions)
        new_positions = np.array(positions, copy=True) if want_positions else None
        errors: list[str] = []
        for i, pos in enumerate(positions):
            if not np.isfinite(pos).all():
                errors.append("non-finite coordinates")
                continue
            try:
                self.context.setPositions(pos)
                if n_steps:
                    self.context.getIntegrator().step(n_steps)
                state = self.context.getState(getEnergy=True, getForces=True, getPositions=want_positions)
                energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                force = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
            except Exception as err:  # OpenMMException and friends
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if not (math.isfinite(energy) and np.isfinite(force).all()):
                errors.append(f"non-finite energy ({energy})")
                continue
            energies[i] = energy
            forces[i] = force
            if want_positions:
                new_positions[i] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return energies, forces, new_positions, errors


def _worker(tasks, results, system_xml, integrator_xml, platform_name, properties):
    try:
        evaluator = _Evaluator(system_xml, integrator_xml, platform_name, properties)
    except Exception as err:
        results.put(("startup", f"{type(err).__name__}: {err}"))
        return
    results.put(("startup", None))
    while True:
        task = tasks.get()
        if task is None:
            return
        key, positions, n_steps, want_positions = task
        results.put((key, evaluator.evaluate(positions, n_steps, want_positions)))


def _shutdown(processes, tasks) -> None:
    for _ in processes:
        try:
            tasks.put(None)
        except (OSError, ValueError):
            pass
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def fastest_platform(system, integrator, candidates: Sequence[str] | None = None, n_calls: int = 20) -> dict:
    """Seconds per energy+force evaluation on each platform; the fastest first.

    Parameters
    ----------
    system, integrator
        The OpenMM system and integrator.
    candidates : sequence of str, optional
        Platform names to try (default: every platform this OpenMM has).
    n_calls : int
        Evaluations timed per platform (after one warm-up call).
    """
    import openmm

    names = candidates or [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    system_xml = openmm.XmlSerializer.serialize(system)
    integrator_xml = openmm.XmlSerializer.serialize(integrator)
    positions = _grid_positions(system.getNumParticles())[None]
    timings = {}
    for name in names:
        try:
            evaluator = _Evaluator(system_xml, integrator_xml, name, {})
        except Exception:
            continue  # not usable on this machine
        evaluator.evaluate(positions, 0, False)
        start = time.perf_counter()
        for _ in range(n_calls):
            evaluator.evaluate(positions, 0, False)
        timings[name] = (time.perf_counter() - start) / n_calls
        del evaluator
    if not timings:
        raise RuntimeError(f"none of the OpenMM platforms {names} could create a context")
    return dict(sorted(timings.items(), key=lambda kv: kv[1]))


def _check_bridge_arguments(err_handling: str, n_workers: int, n_simulation_steps: int) -> None:
    if err_handling not in ERR_HANDLING:
        raise ValueError(f"err_handling must be one of {', '.join(ERR_HANDLING)}, got {err_handling!r}")
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive whole number, got {n_workers!r}")
    if not isinstance(n_simulation_steps, int) or n_simulation_steps < 0:
        raise ValueError(f"n_simulation_steps must be a non-negative whole number, got {n_simulation_steps!r}")


def _integrator_temperature(integrator) -> float:
    """The integrator's temperature in K (it defines kT, the unit of the energies)."""
    import openmm

    if not hasattr(integrator, "getTemperature"):
        raise ValueError(
            f"the integrator ({type(integrator).__name__}) has no temperature, which defines "
            f"kT, the unit of the energies; use a thermostatted one such as LangevinMiddleIntegrator"
        )
    return integrator.getTemperature().value_in_unit(openmm.unit.kelvin)


class OpenMMBridge:
    """Evaluates OpenMM energies and forces for batches of configurations.

    Parameters
    ----------
    openmm_system : openmm.System
        The system (all its forces are evaluated).
    openmm_integrator : openmm.Integrator
        Its temperature defines kT, the unit of the returned energies and forces.
    platform_name : str
        An OpenMM platform ("Reference", "CPU", "CUDA", "OpenCL") or "auto" (time each
        available one on this system and take the fastest; see :attr:`platform_timings`).
    err_handling : {"ignore", "warning", "exception"}
        What a failed evaluation does besides returning +inf with zero force: nothing, a
        warning per batch with the count and the first cause, or an exception.
    n_workers : int
        Worker processes, each with its own context (1: evaluate in this process). On a
        GPU platform one process is used.
    n_simulation_steps : int
        Integrator steps taken from each configuration before evaluating (0: none).
    platform_properties : dict, optional
        OpenMM platform properties (default for CPU: threads shared among the workers).

    Attributes
    ----------
    n_failures : int
        Failed evaluations so far.
    platform_name : str
        The platform in use.
    """

    def __init__(
        self,
        openmm_system,
        openmm_integrator,
        platform_name: str = "CPU",
        err_handling: str = "warning",
        n_workers: int = 1,
        n_simulation_steps: int = 0,
        platform_properties: dict | None = None,
    ):
        import openmm

        _check_bridge_arguments(err_handling, n_workers, n_simulation_steps)
        self._system = openmm_system
        self._integrator = openmm_integrator
        self._n_atoms = openmm_system.getNumParticles()
        self.temperature = _integrator_temperature(openmm_integrator)
        self._kt = MOLAR_GAS_CONSTANT * self.temperature  # kJ/mol
        self._err_handling = err_handling
        self._n_simulation_steps = n_simulation_steps
        self.platform_timings: dict[str, float] = {}
        if platform_name == "auto":
            self.platform_timings = fastest_platform(openmm_system, openmm_integrator)
            platform_name = next(iter(self.platform_timings))
        self.platform_name = platform_name
        self.n_workers = 1 if platform_name in ("CUDA", "OpenCL") else n_workers
        properties = dict(platform_properties or {})
        if platform_name == "CPU" and "Threads" not in properties:
            properties["Threads"] = str(max(1, mp.cpu_count() // self.n_workers))
        self.n_failures = 0
        self.last_energies: torch.Tensor | None = None
        self.last_forces: torch.Tensor | None = None
        self._processes: list = []
        self._calls = 0
        self._local = None
        self._finalizer = None
        context_args = (
            openmm.XmlSerializer.serialize(openmm_system),
            openmm.XmlSerializer.serialize(openmm_integrator),
            platform_name,
            properties,
        )
        if self.n_workers == 1:
            self._local = _Evaluator(*context_args)
        else:
            self._start_workers(context_args)

    def _start_workers(self, context_args: tuple) -> None:
        """Start ``n_workers`` processes, each with its own context; wait until they run."""
        # fork (where available) starts workers without re-importing the caller's script,
        # so scripts without a __main__ guard and notebooks work; the workers use only OpenMM
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        for _ in range(self.n_workers):
            p = ctx.Process(target=_worker, args=(self._tasks, self._results, *context_args), daemon=True)
            p.start()
            self._processes.append(p)
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._tasks)
        for _ in range(self.n_workers):
            _, error = self._results.get(timeout=120)
            if error is not None:
                self.close()
                raise RuntimeError(f"an OpenMM worker could not create its context: {error}")

    @property
    def n_atoms(self) -> int:
        return self._n_atoms

    @property
    def integrator(self):
        return self._integrator

    @property
    def n_simulation_steps(self) -> int:
        return self._n_simulation_steps

    @property
    def kt(self) -> float:
        """kT of the integrator's temperature, kJ/mol."""
        return self._kt

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
        self._processes = []

    @property
    def is_alive(self) -> bool:
        """Whether any worker process is running."""
        return any(p.is_alive() for p in self._processes)

    def _run(self, positions: np.ndarray, want_positions: bool):
        if self._local is not None:
            return self._local.evaluate(positions, self._n_simulation_steps, want_positions)
        if not self.is_alive:
            raise RuntimeError("the bridge's worker processes are closed")
        chunks = np.array_split(positions, min(self.n_workers, len(positions)))
        self._calls += 1
        for key, chunk in enumerate(chunks):
            self._tasks.put(((self._calls, key), chunk, self._n_simulation_steps, want_positions))
        parts = {}
        while len(parts) < len(chunks):
            (call, key), result = self._results.get(timeout=600)
            if call == self._calls:  # results of an earlier, interrupted call are dropped
                parts[key] = result
        ordered = [parts[k] for k in range(len(chunks))]
        energies = np.concatenate([o[0] for o in ordered])
        forces = np.concatenate([o[1] for o in ordered])
        new_positions = np.concatenate([o[2] for o in ordered]) if want_positions else None
        errors = [e for o in ordered for e in o[3]]
        return energies, forces, new_positions, errors

    def evaluate(
        self,
        batch: torch.Tensor,
        evaluate_force: bool = True,
        evaluate_energy: bool = True,
        evaluate_positions: bool = False,
        evaluate_path_probability_ratio: bool = False,
    ):
        """Energies ``[n, 1]`` and forces ``[n, 3 * n_atoms]`` in kT (per nm), new positions.

        Returns ``(energies, forces, new_positions, None)`` like bgflow's bridge (the
        path probability ratio is not supported). Failed samples: +inf energy, zero force.
        """
        if evaluate_path_probability_ratio:
            raise ValueError("evaluate_path_probability_ratio is not supported by this bridge")
        n = batch.shape[0]
        if batch.shape[-1] != 3 * self._n_atoms:
            raise ValueError(
                f"positions must have shape [batch, {3 * self._n_atoms}] (nm), got {tuple(batch.shape)}"
            )
        positions = batch.detach().cpu().to(torch.float64).numpy().reshape(n, self._n_atoms, 3)
        if n == 0:
            energies, forces, new_positions, errors = np.zeros(0), positions, positions, []
        else:
            energies, forces, new_positions, errors = self._run(positions, evaluate_positions)
        if errors:
            self.n_failures += len(errors)
            message = f"{len(errors)} of {n} OpenMM evaluations failed (first: {errors[0]}); they count as +inf energy"
            if self._err_handling == "exception":
                raise RuntimeError(message)
            if self._err_handling == "warning":
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        width = 3 * self._n_atoms
        energies_t = torch.as_tensor(energies / self._kt).to(batch).reshape(n, 1)
        forces_t = torch.as_tensor(forces.reshape(n, width) / self._kt).to(batch)
        positions_t = torch.as_tensor(new_positions.reshape(n, width)).to(batch) if evaluate_positions else None
        self.last_energies, self.last_forces = energies_t, forces_t
        return (
            energies_t if evaluate_energy else None,
            forces_t if evaluate_force else None,
            positions_t,
            None,
        )


class _BridgeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, positions: torch.Tensor, bridge: OpenMMBridge):
        energies, forces, _, _ = bridge.evaluate(positions)
        ctx.save_for_backward(forces)
        return energies

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (forces,) = ctx.saved_tensors
        return -grad_output * forces, None


class OpenMMEnergy(Energy):
    """An OpenMM system as a bgflow ``Energy`` (kT at the integrator's temperature).

    Parameters
    ----------
    dimension : ignored
        Accepted for compatibility (bgflow infers it from the system, and so does this).
    bridge : OpenMMBridge
        The bridge that evaluates the system.
    two_event_dims : bool
        Inputs shaped ``[..., n_atoms, 3]`` instead of ``[..., 3 * n_atoms]``.
    """

    def __init__(self, dimension=None, bridge: OpenMMBridge | None = None, two_event_dims: bool = False):
        if bridge is None:
            raise ValueError("OpenMMEnergy needs bridge=OpenMMBridge(system, integrator, ...)")
        shape = [bridge.n_atoms, 3] if two_event_dims else [3 * bridge.n_atoms]
        super().__init__(shape)
        self._bridge = bridge
        self._two_event_dims = two_event_dims

    @property
    def bridge(self) -> OpenMMBridge:
        return self._bridge

    def _energy(self, batch: torch.Tensor, no_grads: bool = False) -> torch.Tensor:
        batch_shape = batch.shape[: batch.dim() - (2 if self._two_event_dims else 1)]
        flat = batch.reshape(-1, 3 * self._bridge.n_atoms)
        return _BridgeFunction.apply(flat, self._bridge).reshape(*batch_shape, 1)

    def close(self) -> None:
        """Stop the bridge's worker processes."""
        self._bridge.close()
