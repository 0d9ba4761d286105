"""The host's OpenMM bridge and energy: exact values, honest failures, no stray processes."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")
pytest.importorskip("openmmtools")

import openmm  # noqa: E402
from openmm import unit  # noqa: E402

from bgflow_gate import ProgressiveKLTrainer, bg  # noqa: E402
from bgflow_gate.host.openmm import OpenMMBridge, OpenMMEnergy  # noqa: E402
from bgflow_gate.systems.alanine import alanine_dipeptide  # noqa: E402
from bgflow_gate.units import kt_in_kjmol  # noqa: E402


@pytest.fixture(scope="module")
def vacuum():
    return alanine_dipeptide("vacuum")


def frames(system, n=4, noise=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = system.positions_tensor().repeat(n, 1)
    return x + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)


def openmm_energy_kjmol(system, x):
    context = openmm.Context(system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    out = []
    for row in x:
        context.setPositions(row.reshape(-1, 3).numpy())
        out.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("solvent", ["vacuum", "implicit"])
def test_energies_are_openmms_potential_energy_over_kt(solvent):
    system = alanine_dipeptide(solvent)
    energy = system.energy(temperature=310.0, platform_name="Reference")
    x = frames(system)
    expected = openmm_energy_kjmol(system, x) / kt_in_kjmol(310.0)
    assert energy.energy(x).flatten().tolist() == pytest.approx(expected.tolist(), rel=1e-9)
    assert energy.bridge.kt == pytest.approx(kt_in_kjmol(310.0))


def test_forces_are_minus_the_energy_gradient_by_finite_differences(vacuum):
    energy = vacuum.energy(platform_name="Reference")
    x = frames(vacuum, n=1)
    _, forces, _, _ = energy.bridge.evaluate(x)
    h = 1e-6
    for i in (0, 13, 25, 65):
        plus, minus = x.clone(), x.clone()
        plus[0, i] += h
        minus[0, i] -= h
        numeric = -(energy.energy(plus) - energy.energy(minus)).item() / (2 * h)
        assert forces[0, i].item() == pytest.approx(numeric, rel=1e-4, abs=1e-3)


def test_autograd_through_the_energy_uses_openmm_forces(vacuum):
    energy = vacuum.energy(platform_name="Reference")
    x = frames(vacuum, n=3).requires_grad_(True)
    energy.energy(x).sum().backward()
    _, forces, _, _ = energy.bridge.evaluate(x.detach())
    assert torch.allclose(x.grad, -forces)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_failures_are_inf_with_zero_force_never_zero_or_stale(vacuum, n_workers):
    bridge = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference", n_workers=n_workers)
    try:
        x = frames(vacuum, n=5)
        x[1, 7] = math.nan  # non-finite coordinates: OpenMM would raise
        x[3, 3:6] = x[3, 0:3]  # coincident atoms: NaN energy without an exception
        with pytest.warns(RuntimeWarning, match="2 of 5 OpenMM evaluations failed"):
            energies, forces, _, _ = bridge.evaluate(x)
        good = [0, 2, 4]
        assert torch.isfinite(energies[good]).all()
        assert energies[1].item() == energies[3].item() == math.inf
        assert forces[[1, 3]].abs().max().item() == 0.0
        assert bridge.n_failures == 2
    finally:
        bridge.close()


@pytest.mark.parametrize("n_workers", [1, 2])
def test_an_exception_inside_openmm_is_contained(vacuum, n_workers):
    # 10 steps of 5 ps explode: OpenMM raises "Particle coordinate is NaN"
    blow_up = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 5.0 * unit.picosecond)
    bridge = OpenMMBridge(
        vacuum.system, blow_up, platform_name="CPU", n_workers=n_workers, n_simulation_steps=10,
    )
    try:
        with pytest.warns(RuntimeWarning, match="OpenMMException: Particle coordinate is NaN"):
            energies, forces, _, _ = bridge.evaluate(frames(vacuum, n=2))
        assert energies.flatten().tolist() == [math.inf, math.inf]
        assert forces.abs().max().item() == 0.0 and bridge.n_failures == 2
    finally:
        bridge.close()


def test_err_handling_exception_raises_and_bad_arguments_are_named(vacuum):
    bridge = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference", err_handling="exception")
    x = frames(vacuum, n=1)
    x[0, 0] = math.nan
    with pytest.raises(RuntimeError, match="1 of 1 OpenMM evaluations failed"):
        bridge.evaluate(x)
    quiet = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference", err_handling="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "ignore": no warning, still +inf and counted
        assert quiet.evaluate(x)[0].item() == math.inf and quiet.n_failures == 1
    with pytest.raises(ValueError, match=r"positions must have shape \[batch, 66\]"):
        bridge.evaluate(torch.zeros(2, 65, dtype=torch.float64))
    with pytest.raises(ValueError, match="err_handling must be one of ignore, warning, exception"):
        OpenMMBridge(vacuum.system, vacuum.integrator(), err_handling="loud")
    with pytest.raises(ValueError, match="n_workers must be a positive whole number"):
        OpenMMBridge(vacuum.system, vacuum.integrator(), n_workers=0)
    with pytest.raises(ValueError, match="needs bridge"):
        OpenMMEnergy()
    with pytest.raises(ValueError, match="VerletIntegrator.*has no temperature"):
        OpenMMBridge(vacuum.system, openmm.VerletIntegrator(0.001))


def test_two_workers_give_the_same_numbers_as_one(vacuum):
    x = frames(vacuum, n=9)
    one = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference")
    two = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference", n_workers=2)
    try:
        e1, f1, _, _ = one.evaluate(x)
        e2, f2, _, _ = two.evaluate(x)
        assert torch.equal(e1, e2) and torch.equal(f1, f2)
    finally:
        two.close()


def test_workers_stop_on_close_on_garbage_collection_and_at_exit(vacuum, tmp_path):
    bridge = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference", n_workers=2)
    processes = list(bridge._processes)
    assert bridge.is_alive
    bridge.close()
    assert not any(p.is_alive() for p in processes) and not bridge.is_alive
    with pytest.raises(RuntimeError, match="closed"):
        bridge.evaluate(frames(vacuum, n=2))

    bridge = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference", n_workers=2)
    processes = list(bridge._processes)
    del bridge
    gc.collect()
    assert not any(p.is_alive() for p in processes)

    script = tmp_path / "leave_workers.py"
    script.write_text(textwrap.dedent("""
        from bgflow_gate.systems.alanine import alanine_dipeptide
        from bgflow_gate.host.openmm import OpenMMBridge
        system = alanine_dipeptide()
        bridge = OpenMMBridge(system.system, system.integrator(), platform_name="Reference", n_workers=2)
        bridge.evaluate(system.positions_tensor())
        print("done")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "done" in done.stdout  # exits on its own: no worker keeps it alive


def test_auto_platform_times_the_platforms_and_takes_the_fastest(vacuum):
    bridge = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="auto")
    timings = bridge.platform_timings
    assert {"Reference", "CPU"} <= set(timings)
    assert bridge.platform_name == min(timings, key=timings.get)


def test_the_trainer_reads_kt_and_the_temperature_from_an_openmm_target(vacuum):
    energy = vacuum.energy(temperature=350.0, platform_name="Reference")
    prior = bg.NormalDistribution(66, mean=torch.zeros(66, dtype=torch.float64))
    flow = bg.SequentialFlow([])
    generator = bg.BoltzmannGenerator(prior, flow, energy)

    class Dummy(torch.nn.Module):
        pass

    holder = Dummy()
    holder.p = torch.nn.Parameter(torch.zeros(1))
    trainer = ProgressiveKLTrainer(generator, torch.optim.SGD(holder.parameters(), lr=0.1))
    assert trainer.gate.target_unit == "kT" and trainer.gate.temperature == pytest.approx(350.0)
    assert trainer.gate.e_max_kt == pytest.approx(1e10 / kt_in_kjmol(350.0))


def test_an_empty_batch_gives_empty_results_and_interrupted_calls_leave_nothing_behind(vacuum):
    bridge = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference", n_workers=2)
    try:
        energies, forces, _, _ = bridge.evaluate(torch.zeros(0, 66, dtype=torch.float64))
        assert energies.shape == (0, 1) and forces.shape == (0, 66)
        x = frames(vacuum, n=4)
        bridge._calls += 1  # a call whose results were never collected ...
        for key, chunk in enumerate(np.array_split(x.reshape(4, 22, 3).numpy() + 1.0, 2)):
            bridge._tasks.put(((bridge._calls, key), chunk, 0, False))
        energies, _, _, _ = bridge.evaluate(x)  # ... must not be taken for this one
        expected, _, _, _ = OpenMMBridge(vacuum.system, vacuum.integrator(), platform_name="Reference").evaluate(x)
        assert torch.equal(energies, expected)
    finally:
        bridge.close()


def test_units_that_contradict_an_openmm_target_are_errors(vacuum):
    energy = vacuum.energy(temperature=300.0, platform_name="Reference")
    generator = bg.BoltzmannGenerator(bg.NormalDistribution(66), bg.SequentialFlow([]), energy)
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="target_unit='kJ/mol' contradicts the target"):
        ProgressiveKLTrainer(generator, torch.optim.SGD([param], lr=0.1), target_unit="kJ/mol")
    with pytest.raises(ValueError, match=r"temperature=350.0 K contradicts the target \(OpenMMEnergy at 300 K\)"):
        ProgressiveKLTrainer(generator, torch.optim.SGD([param], lr=0.1), temperature=350.0)
