"""TorchEnergy: an OpenMM system's energy batched in PyTorch, against OpenMM's Reference platform.

Exactness is judged per frame: energies to 1e-6 relative, forces to 1e-6 of the frame's
largest force component (float64). The CUDA tests need no OpenMM: without it they use the
energies cached by ``benchmarks/make_gpu_cache.py`` (folder ``gpu_cache/`` or
``$BGFLOW_GATE_GPU_CACHE``).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bgflow_gate import ScheduledEnergyGate, TorchEnergy, UnsupportedForceError

KT_300 = 8.314462618e-3 * 300.0
CACHE = Path(os.environ.get("BGFLOW_GATE_GPU_CACHE", Path(__file__).resolve().parents[1] / "gpu_cache"))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- systems and frames


def _openmm_system(solvent: str):
    testsystems = pytest.importorskip("openmmtools.testsystems")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factory = testsystems.AlanineDipeptideVacuum if solvent == "vacuum" else testsystems.AlanineDipeptideImplicit
        test_system = factory(constraints=None)
    positions = np.asarray(test_system.positions.value_in_unit(test_system.positions.unit), dtype=np.float64)
    return test_system.system, positions


def _md_frames(system, positions: np.ndarray, n_frames: int = 6) -> np.ndarray:
    """Minimised, then ``n_frames`` frames 40 fs apart of Langevin MD at 300 K (Reference platform)."""
    import openmm
    from openmm import unit

    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.001 * unit.picosecond)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    frames = []
    for _ in range(n_frames):
        integrator.step(40)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return np.array(frames)


def _clash_frames(positions: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Each frame moves atom j of a non-bonded pair towards atom i, down to 0.004 nm."""
    frames = []
    for (i, j), distance in zip(pairs, np.geomspace(0.2, 0.004, len(pairs))):
        frame = positions.copy()
        direction = frame[j] - frame[i]
        frame[j] = frame[i] + distance * direction / np.linalg.norm(direction)
        frames.append(frame)
    return np.array(frames)


@pytest.fixture(scope="module", params=["vacuum", "implicit"])
def alanine(request):
    """(solvent, openmm system, torch energy at 300 K, frames by kind [n, 22, 3])."""
    system, positions = _openmm_system(request.param)
    energy = TorchEnergy.from_openmm(system, temperature=300.0)
    rng = np.random.default_rng(0)
    md = _md_frames(system, positions)
    pairs = energy.to_dict()["pairs"]["atoms"].numpy()
    frames = {
        "md": md,
        "perturbed": md[:1] + rng.normal(scale=0.02, size=(6, 22, 3)),
        "clash": _clash_frames(md[0], pairs[rng.choice(len(pairs), 12, replace=False)]),
    }
    return request.param, system, energy, frames


def _reference(system, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from bgflow_gate.energies.openmm_reader import reference_energies

    return reference_energies(system, frames)


def _ours(energy: TorchEnergy, frames: np.ndarray, dtype=torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) from the torch energy's kT output."""
    x = torch.tensor(frames.reshape(len(frames), -1), dtype=dtype, requires_grad=True)
    u = energy.energy(x)
    (gradient,) = torch.autograd.grad(u.sum(), x)
    return u.detach().double().numpy()[:, 0] * energy.kt, -gradient.double().numpy().reshape(frames.shape) * energy.kt


def _errors(ours, reference) -> tuple[float, float]:
    """Largest relative energy error and largest force error relative to the frame's largest force."""
    (e, f), (e_ref, f_ref) = ours, reference
    energy_error = np.max(np.abs(e - e_ref) / np.abs(e_ref))
    force_scale = np.abs(f_ref).reshape(len(f_ref), -1).max(1)
    force_error = np.max(np.abs(f - f_ref).reshape(len(f_ref), -1).max(1) / force_scale)
    return float(energy_error), float(force_error)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["md", "perturbed", "clash"])
def test_float64_energies_and_forces_match_openmm_reference_to_1e6(alanine, kind):
    _, system, energy, frames = alanine
    energy_error, force_error = _errors(_ours(energy, frames[kind]), _reference(system, frames[kind]))
    assert energy_error <= 1e-6
    assert force_error <= 1e-6


def test_clash_frames_reach_1e15_kjmol(alanine):
    _, system, _, frames = alanine
    energies, _ = _reference(system, frames["clash"])
    assert energies.max() >= 1e15
    assert energies.min() < 1e4


def test_float32_errors_on_md_frames_stay_below_1e5_in_energy_and_1e4_in_force(alanine):
    """Measured here: energies 9e-7 (vacuum) and 3e-6 (implicit) relative, forces 1.5e-5 and
    9e-6 of the largest force component (rounding the positions to float32 alone moves a stiff
    bond's force by about that much)."""
    _, system, energy, frames = alanine
    energy_error, force_error = _errors(_ours(energy, frames["md"], torch.float32), _reference(system, frames["md"]))
    print(f"float32 on MD frames: energy {energy_error:.2e} relative, force {force_error:.2e} of the largest")
    assert energy_error <= 1e-5
    assert force_error <= 1e-4


def test_energies_are_kt_at_the_temperature(alanine):
    _, _, energy, frames = alanine
    x = torch.tensor(frames["md"].reshape(len(frames["md"]), -1))
    assert energy.unit == "kT"
    assert energy.temperature == 300.0
    assert torch.allclose(energy.energy(x) * KT_300, energy.potential(x), rtol=1e-12)


def _small_system(phase: float = 0.7):
    """Four atoms with every supported term, non-trivial torsion phases and all exception kinds."""
    openmm = pytest.importorskip("openmm")
    system = openmm.System()
    for _ in range(5):
        system.addParticle(12.0)
    bonds, angles, torsions = openmm.HarmonicBondForce(), openmm.HarmonicAngleForce(), openmm.PeriodicTorsionForce()
    bonds.addBond(0, 1, 0.15, 3e5)
    angles.addAngle(0, 1, 2, 1.9, 400.0)
    for periodicity in (1, 2, 3):
        torsions.addTorsion(0, 1, 2, 3, periodicity, phase * periodicity, 5.0)
    nonbonded = openmm.NonbondedForce()
    for q, sigma, eps in ((0.3, 0.3, 0.5), (-0.2, 0.25, 0.4), (0.1, 0.35, 0.2), (-0.4, 0.3, 0.6), (0.2, 0.28, 0.3)):
        nonbonded.addParticle(q, sigma, eps)
    nonbonded.addException(0, 1, 0.0, 0.1, 0.0)     # an exclusion
    nonbonded.addException(0, 2, 0.05, 0.27, 0.0)   # Coulomb only
    nonbonded.addException(1, 3, 0.0, 0.31, 0.25)   # Lennard-Jones only
    for force in (bonds, angles, torsions, nonbonded, openmm.CMMotionRemover()):
        system.addForce(force)
    return system


def test_small_system_with_torsion_phases_and_exceptions_matches_openmm():
    system = _small_system()
    frames = np.random.default_rng(3).normal(scale=0.25, size=(16, 5, 3))
    energy = TorchEnergy.from_openmm(system, temperature=300.0)
    energy_error, force_error = _errors(_ours(energy, frames), _reference(system, frames))
    assert energy_error <= 1e-9
    assert force_error <= 1e-9


def test_obc2_force_from_openmm_is_recognised_and_exact():
    system, positions = _openmm_system("implicit")
    from openmm import CustomGBForce, XmlSerializer
    from openmm.app.internal.customgbforces import GBSAOBC2Force

    system = XmlSerializer.deserialize(XmlSerializer.serialize(system))
    index = next(k for k, f in enumerate(system.getForces()) if isinstance(f, CustomGBForce))
    obc2 = GBSAOBC2Force(78.5, 1.0, "ACE", None, 0.0)
    for atom in range(system.getNumParticles()):
        obc2.addParticle(list(system.getForce(index).getParticleParameters(atom)))
    obc2.finalize()
    system.removeForce(index)
    system.addForce(obc2)
    frames = positions[None] + np.random.default_rng(4).normal(scale=0.01, size=(4, 22, 3))
    energy = TorchEnergy.from_openmm(system, temperature=300.0)
    assert _errors(_ours(energy, frames), _reference(system, frames))[0] <= 1e-9


def _plain_descreening(r, offset_radius, scaled_radius):
    """OpenMM's expression, term by term, for autograd."""
    upper = r + scaled_radius
    lower = torch.maximum(offset_radius, (r - scaled_radius).abs())
    value = 0.5 * (1 / lower - 1 / upper + 0.25 * (r - scaled_radius**2 / r) * (1 / upper**2 - 1 / lower**2)
                   + 0.5 * torch.log(lower / upper) / r)
    return torch.where(upper >= offset_radius, value, torch.zeros_like(value))


def test_radial_derivatives_equal_autograd_of_the_plain_formulas_in_every_branch():
    from bgflow_gate.energies.radial import descreening, nonbonded_sum

    gen = torch.Generator().manual_seed(0)
    r = torch.linspace(0.02, 1.5, 400, dtype=torch.float64).repeat(3, 1).requires_grad_(True)
    offset_radius, scaled = 0.05 + 0.2 * torch.rand(2, 400, generator=gen, dtype=torch.float64)
    # r + sr < or, |r - sr| < or < r + sr, |r - sr| > or all occur on this grid
    assert ((r + scaled < offset_radius).any() and ((r - scaled).abs() > offset_radius).any())
    qq, c12, c6 = torch.randn(3, 400, generator=gen, dtype=torch.float64)
    for ours, plain in (
        (lambda: descreening(r, offset_radius, scaled).sum(), lambda: _plain_descreening(r, offset_radius, scaled).sum()),
        (lambda: nonbonded_sum(r * r, qq, c12, c6).sum(), lambda: (c12 / r**12 - c6 / r**6 + qq / r).sum()),
    ):
        (g_ours,) = torch.autograd.grad(ours(), r)
        (g_plain,) = torch.autograd.grad(plain(), r)
        assert torch.allclose(ours(), plain(), rtol=1e-12)
        assert torch.allclose(g_ours, g_plain, rtol=1e-10, atol=1e-10 * g_plain.abs().max().item())


def test_gb_pair_derivatives_equal_autograd_of_the_plain_formula():
    from bgflow_gate.energies.radial import gb_pair_sum

    gen = torch.Generator().manual_seed(1)
    r2 = (0.01 + torch.rand(4, 300, generator=gen, dtype=torch.float64)).requires_grad_(True)
    bb = (0.005 + 0.1 * torch.rand(4, 300, generator=gen, dtype=torch.float64)).requires_grad_(True)
    k = torch.randn(300, generator=gen, dtype=torch.float64)
    ours = gb_pair_sum(r2, bb, k)
    plain = (k / torch.sqrt(r2 + bb * torch.exp(-r2 / (4 * bb)))).sum(-1)
    assert torch.allclose(ours, plain, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(ours.sum(), (r2, bb)), torch.autograd.grad(plain.sum(), (r2, bb))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- unsupported forces


def test_unsupported_force_is_an_error_that_names_it():
    openmm = pytest.importorskip("openmm")
    system = _small_system()
    system.addForce(openmm.CustomExternalForce("x^2"))
    with pytest.raises(UnsupportedForceError, match="CustomExternalForce"):
        TorchEnergy.from_openmm(system, temperature=300.0)


def test_nonbonded_cutoff_is_an_error_that_names_the_method():
    openmm = pytest.importorskip("openmm")
    system = _small_system()
    system.getForce(3).setNonbondedMethod(openmm.NonbondedForce.CutoffNonPeriodic)
    with pytest.raises(UnsupportedForceError, match="NonbondedForce.*nonbonded method 1"):
        TorchEnergy.from_openmm(system, temperature=300.0)


def test_custom_gb_force_with_another_expression_is_an_error_that_names_it():
    system, _ = _openmm_system("implicit")
    from openmm import CustomGBForce, XmlSerializer

    system = XmlSerializer.deserialize(XmlSerializer.serialize(system))
    gb = next(f for f in system.getForces() if isinstance(f, CustomGBForce))
    expression, kind = gb.getEnergyTermParameters(1)
    gb.setEnergyTermParameters(1, expression.replace("0.14", "0.15"), kind)
    with pytest.raises(UnsupportedForceError, match="CustomGBForce.*not the OBC"):
        TorchEnergy.from_openmm(system, temperature=300.0)


# ----------------------------------------------------------------------------- non-finite input


def test_nan_and_inf_coordinates_give_inf_energy_and_zero_force(alanine):
    _, _, energy, frames = alanine
    x = torch.tensor(frames["md"][:3].reshape(3, -1)).repeat(2, 1)
    x[0, 5], x[1, 7], x[2, 9] = math.nan, math.inf, -math.inf
    x.requires_grad_(True)
    u = energy.energy(x)
    (gradient,) = torch.autograd.grad(u.sum(), x)
    assert torch.isinf(u[:3]).all() and (u[:3] > 0).all()
    assert torch.isfinite(u[3:]).all()
    assert gradient[:3].abs().sum() == 0
    assert torch.isfinite(gradient).all()
    assert torch.allclose(gradient[3:], -energy.forces(x[3:].detach()), rtol=1e-12, atol=0)


def test_coincident_atoms_give_inf_energy_and_zero_force(alanine):
    _, _, energy, frames = alanine
    x = torch.tensor(frames["md"][:2].reshape(2, 22, 3))
    x[0, 10] = x[0, 3]
    forces = energy.forces(x.reshape(2, -1))
    assert math.isinf(energy.energy(x.reshape(2, -1))[0, 0].item())
    assert forces[0].abs().sum() == 0 and torch.isfinite(forces).all()


# ----------------------------------------------------------------------------- shapes, dtypes, devices


def test_output_follows_the_input_dtype(alanine):
    _, _, energy, frames = alanine
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor(frames["md"].reshape(len(frames["md"]), -1), dtype=dtype, requires_grad=True)
        u = energy.energy(x)
        (gradient,) = torch.autograd.grad(u.sum(), x)
        assert u.dtype == dtype and gradient.dtype == dtype and u.shape == (len(x), 1)


def test_batch_dimensions_and_two_event_dims_keep_their_shape(alanine):
    _, _, energy, frames = alanine
    x = torch.tensor(frames["md"][:6])
    flat = energy.energy(x.reshape(2, 3, 66))
    two = TorchEnergy.from_dict(energy.to_dict(), two_event_dims=True).energy(x.reshape(2, 3, 22, 3))
    assert flat.shape == (2, 3, 1) and torch.equal(flat, two)
    with pytest.raises((ValueError, AssertionError), match="66"):  # real bgflow asserts the event shape
        energy.energy(x)


def test_reduced_precision_matmul_setting_gives_the_same_float32_energies(alanine):
    _, _, energy, frames = alanine
    x = torch.tensor(frames["md"].reshape(len(frames["md"]), -1), dtype=torch.float32)
    exact = energy.energy(x)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        reduced = energy.energy(x)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.allclose(reduced, exact, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- saving and the gate


def test_saved_energy_loads_and_evaluates_without_openmm(alanine, tmp_path, monkeypatch):
    _, _, energy, frames = alanine
    x = torch.tensor(frames["perturbed"].reshape(len(frames["perturbed"]), -1))
    energy.save(tmp_path / "energy.pt")
    for name in [m for m in sys.modules if m == "openmm" or m.startswith("openmm.")]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of openmm now fails
    loaded = TorchEnergy.load(tmp_path / "energy.pt")
    assert torch.equal(loaded.energy(x), energy.energy(x))
    assert loaded.temperature == energy.temperature and loaded.terms == energy.terms


def test_gate_around_torch_energy_gates_clashes_and_nan_with_finite_gradients(alanine):
    _, _, energy, frames = alanine
    gate = ScheduledEnergyGate(energy, e_cut=500.0, target_unit="kT", temperature=300.0)
    x = torch.tensor(np.concatenate([frames["md"][:2], frames["clash"][-1:]]).reshape(3, -1)).repeat(2, 1)
    x[3, 0] = math.nan
    x.requires_grad_(True)
    u = gate.energy(x)
    (gradient,) = torch.autograd.grad(u.sum(), x)
    assert gate.last_gated.tolist() == [False, False, True, True, False, True]
    assert torch.isfinite(gradient).all()
    assert gradient[[2, 3, 5]].abs().sum() == 0


# ----------------------------------------------------------------------------- CUDA (no OpenMM needed)


def _energy_anywhere(solvent: str) -> tuple[TorchEnergy, torch.Tensor]:
    """The alanine energy and 64 perturbed frames ``[64, 66]`` from OpenMM, or from the cache."""
    path = CACHE / f"alanine_{solvent}.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
        energy, positions = TorchEnergy.from_dict(data["energy"]), data["positions"]
    else:
        system, positions = _openmm_system(solvent)
        energy, positions = TorchEnergy.from_openmm(system, temperature=300.0), torch.tensor(positions)
    gen = torch.Generator().manual_seed(0)
    frames = positions.reshape(1, -1) + 0.01 * torch.randn(64, 66, generator=gen, dtype=torch.float64)
    return energy, frames


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("solvent", ["vacuum", "implicit"])
def test_cuda_float64_matches_the_cached_openmm_reference_to_1e6(solvent):
    path = CACHE / f"alanine_{solvent}.pt"
    if not path.exists():
        pytest.skip(f"no {path} (benchmarks/make_gpu_cache.py writes it)")
    data = torch.load(path, weights_only=True)
    energy, reference = TorchEnergy.from_dict(data["energy"]), data["reference"]
    x = reference["frames"].cuda().requires_grad_(True)
    u = energy.energy(x)
    (gradient,) = torch.autograd.grad(u.sum(), x)
    ours = (u.detach().cpu().numpy()[:, 0] * energy.kt, -gradient.cpu().numpy().reshape(8, 22, 3) * energy.kt)
    errors = _errors(ours, (reference["energies"].numpy(), reference["forces"].numpy().reshape(8, 22, 3)))
    assert max(errors) <= 1e-6


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("solvent", ["vacuum", "implicit"])
def test_cuda_energies_and_forces_match_cpu_float64(solvent):
    energy, x = _energy_anywhere(solvent)
    on_gpu = x.cuda().requires_grad_(True)
    u = energy.energy(on_gpu)
    (gradient,) = torch.autograd.grad(u.sum(), on_gpu)
    assert u.device.type == "cuda" and gradient.device.type == "cuda"
    assert torch.allclose(u.cpu(), energy.energy(x), rtol=1e-10)
    assert torch.allclose(-gradient.cpu(), energy.forces(x), rtol=1e-9, atol=1e-9)


@pytest.mark.cuda
@cuda
def test_cuda_float32_error_against_float64_stays_below_1e5():
    energy, x = _energy_anywhere("implicit")
    u32 = energy.energy(x.cuda().float()).double().cpu()
    u64 = energy.energy(x)
    error = ((u32 - u64).abs() / u64.abs()).max().item()
    print(f"CUDA float32 energy error: {error:.2e} relative")
    assert error <= 1e-5


@pytest.mark.cuda
@cuda
def test_cuda_nan_coordinates_give_inf_energy_and_zero_force_under_the_gate():
    energy, x = _energy_anywhere("vacuum")
    x = x[:8].cuda()
    x[0, 3] = math.nan
    x.requires_grad_(True)
    gate = ScheduledEnergyGate(energy, target_unit="kT", temperature=300.0)
    (gradient,) = torch.autograd.grad(gate.energy(x).sum(), x)
    assert math.isinf(energy.energy(x.detach())[0, 0].item())
    assert gate.last_gated.cpu().tolist() == [True] + [False] * 7
    assert torch.isfinite(gradient).all() and gradient[0].abs().sum().item() == 0
