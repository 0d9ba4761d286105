"""Replica exchange for alanine dipeptide: the package's plain exchange loop against openmmtools.

All rows run parallel tempering of alanine dipeptide in vacuum (no constraints) over the
same 6-replica geometric ladder 300-700 K (``ReplicaExchangeSettings().temperatures``) on
the OpenMM Reference platform, with 1 fs Langevin steps at 1/ps friction and neighbour
exchange attempts after every ``--steps`` steps:

* ``bgflow_gate``  ``generate_dataset(ReplicaExchangeSettings(...))`` into a temporary
  cache directory (nothing is reused between runs), no equilibration iterations; the wall
  time is the dataset's ``seconds`` (the exchange loop; context creation and the initial
  minimisation are not counted). Integrator: OpenMM's ``LangevinMiddleIntegrator``;
  velocities are rescaled by ``sqrt(T_new / T_old)`` on a swap.
* ``openmmtools (<move>)``  ``openmmtools.multistate.ParallelTemperingSampler`` with a
  ``LangevinDynamicsMove`` (OpenMM's ``LangevinIntegrator``) or a
  ``LangevinSplittingDynamicsMove`` (a ``CustomIntegrator``, "V R O R V"), velocities
  reassigned every iteration, ``replica_mixing_scheme="swap-neighbors"`` (the same
  exchange scheme as above), no online analysis, and a ``MultiStateReporter`` in a
  temporary directory that stores the positions of all 22 atoms of every replica every
  iteration; the wall time is that of ``sampler.run(iterations)`` (``create()`` and the
  minimisation are not counted). All start from the same minimised structure.

For each it prints the wall time, the simulated time per replica in ns per day of wall
time (``iterations * steps * 1 fs / wall seconds * 86400``) and the mean neighbour
exchange acceptance (accepted / attempted swaps, averaged over the 5 neighbour pairs).

Usage::

    python benchmarks/bench_replica_exchange.py                      # 200 iterations of 250 steps
    python benchmarks/bench_replica_exchange.py --iterations 500 --steps 500
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import tempfile
import time
import warnings

import numpy as np

from bgflow_gate.systems.alanine import alanine_dipeptide
from bgflow_gate.systems.data import ReplicaExchangeSettings, generate_dataset

TIMESTEP_PS = 0.001
FRICTION_PER_PS = 1.0


def ns_per_day(iterations: int, steps: int, seconds: float) -> float:
    return iterations * steps * TIMESTEP_PS / 1000 / seconds * 86400


def bench_package(iterations: int, steps: int) -> dict:
    settings = ReplicaExchangeSettings(
        solvent="vacuum", n_iterations=iterations, steps_per_iteration=steps,
        equilibration_iterations=0, timestep=TIMESTEP_PS, friction=FRICTION_PER_PS, platform="Reference",
    )
    with tempfile.TemporaryDirectory() as cache_dir:
        dataset = generate_dataset(settings, cache_dir, progress=False)
    assert not dataset.from_cache and dataset.positions.shape == (iterations, 66)
    return {"seconds": dataset.seconds, "acceptance": float(np.mean(dataset.acceptance))}


def minimized_positions(system):
    """The package's starting structure: openmmtools' one, minimised as in ``_run_replica_exchange``."""
    import openmm

    context = openmm.Context(system.system, system.integrator(), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(system.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    positions = context.getState(getPositions=True).getPositions(asNumpy=True)
    del context
    return positions


def quiet_openmmtools() -> None:
    """Import openmmtools without pymbar's banners and silence its warnings."""
    for name in ("openmmtools", "pymbar", "mpiplus"):  # "the multistate API is experimental", ...
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import openmmtools.multistate  # noqa: F401
        import openmmtools.testsystems  # noqa: F401


def bench_openmmtools(iterations: int, steps: int, move_name: str = "LangevinDynamicsMove") -> dict:
    import openmm
    from openmm import unit
    from openmmtools import cache, mcmc, states
    from openmmtools.multistate import MultiStateReporter, ParallelTemperingSampler

    system = alanine_dipeptide("vacuum")
    temperatures = ReplicaExchangeSettings().temperatures
    # every context the sampler makes comes from this cache: set the platform before create()
    # (it cannot be changed while the cache holds contexts, hence the empty())
    cache.global_context_cache.empty()
    cache.global_context_cache.platform = openmm.Platform.getPlatformByName("Reference")
    move = getattr(mcmc, move_name)(
        timestep=TIMESTEP_PS * unit.picosecond, collision_rate=FRICTION_PER_PS / unit.picosecond,
        n_steps=steps, reassign_velocities=True,
    )
    sampler = ParallelTemperingSampler(
        mcmc_moves=move, number_of_iterations=iterations, online_analysis_interval=None,
        replica_mixing_scheme="swap-neighbors",
    )
    reference_state = states.ThermodynamicState(system.system, temperature=temperatures[0] * unit.kelvin)
    sampler_state = states.SamplerState(minimized_positions(system))
    with tempfile.TemporaryDirectory() as storage_dir:
        reporter = MultiStateReporter(
            os.path.join(storage_dir, "parallel_tempering.nc"), checkpoint_interval=50,
            analysis_particle_indices=list(range(system.n_atoms)),
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # "Please cite the following: ..."
                sampler.create(
                    reference_state, sampler_state, reporter,
                    temperatures=[t * unit.kelvin for t in temperatures], n_temperatures=len(temperatures),
                )
            start = time.perf_counter()
            sampler.run(iterations)
            seconds = time.perf_counter() - start
            # the sampler keeps the swap counts of the last iteration only; the reporter has them all
            accepted, proposed = reporter.read_mixing_statistics(slice(1, iterations + 1))
            accepted, proposed = np.asarray(accepted).sum(0), np.asarray(proposed).sum(0)
            n = len(temperatures)
            neighbours = [accepted[i, i + 1] / proposed[i, i + 1] for i in range(n - 1) if proposed[i, i + 1] > 0]
            frames = reporter.read_sampler_states(iterations, analysis_particles_only=True)
            assert len(frames) == n and frames[0].positions.shape == (system.n_atoms, 3)
        finally:
            reporter.close()
            del sampler
    return {"seconds": seconds, "acceptance": float(np.mean(neighbours)) if neighbours else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200, help="exchange iterations (default 200)")
    parser.add_argument("--steps", type=int, default=250, help="1 fs steps per iteration (default 250)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # openmmtools / pymbar / netCDF chatter
    quiet_openmmtools()
    temperatures = ReplicaExchangeSettings().temperatures
    print(f"alanine dipeptide, vacuum, Reference platform, {len(temperatures)} replicas at "
          + ", ".join(f"{t:.0f}" for t in temperatures) + " K, 1 fs, 1/ps")
    rows = [("bgflow_gate", bench_package(args.iterations, args.steps))]
    for move_name in ("LangevinDynamicsMove", "LangevinSplittingDynamicsMove"):
        rows.append((f"openmmtools ({move_name})", bench_openmmtools(args.iterations, args.steps, move_name)))
    width = max(len(name) for name, _ in rows)
    print(f"{'method':<{width}} {'iterations':>10} {'steps/iter':>10} {'wall s':>8} {'ns/day/replica':>15} {'acceptance':>10}")
    for name, r in rows:
        acceptance = "n/a" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        print(f"{name:<{width}} {args.iterations:>10} {args.steps:>10} {r['seconds']:>8.1f} "
              f"{ns_per_day(args.iterations, args.steps, r['seconds']):>15,.0f} {acceptance:>10}")


if __name__ == "__main__":
    main()
