"""The spline Boltzmann generator in internal coordinates: ICSplineFlow, CircularFeatures,
spline_generator on alanine dipeptide."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("openmm")
pytest.importorskip("openmmtools")
pytest.importorskip("mdtraj")

from bgflow_gate.systems.alanine import alanine_dipeptide  # noqa: E402
from bgflow_gate.systems.generators import CircularFeatures, ICSplineFlow, spline_generator  # noqa: E402

SIZES = (3, 3, 5, 2)  # bonds, angles, torsions (odd: unequal halves), fixed
N_REST = 3 + 3 + 2
DIM = N_REST + 5


pytestmark = pytest.mark.usefixtures("one_thread")


def make_flow(perturb: bool, rest_spline_bins: int = 0, size: float = 0.05) -> tuple[ICSplineFlow, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mean = torch.randn(N_REST, dtype=torch.float64)
    std = 0.5 + torch.rand(N_REST, dtype=torch.float64)
    flow = ICSplineFlow(SIZES, mean, std, hidden=16, rest_spline_bins=rest_spline_bins).double()
    if perturb:
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(size * torch.randn_like(p))
    return flow, mean, std


def latent(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- ICSplineFlow ------------------------------------------------------------------------------


def test_outputs_are_bonds_angles_torsions_fixed_with_their_sizes():
    flow, _, _ = make_flow(perturb=True)
    *outputs, dlogp = flow(latent(7))
    assert [tuple(o.shape) for o in outputs] == [(7, 3), (7, 3), (7, 5), (7, 2)]
    assert dlogp.shape == (7, 1)


def test_forward_then_inverse_returns_the_latent_and_the_log_dets_cancel():
    flow, _, _ = make_flow(perturb=True)
    z = latent(64)
    *outputs, dlogp = flow(z)
    back, dlogp_inverse = flow(*outputs, inverse=True)
    assert (back - z).abs().max().item() < 1e-10
    assert (dlogp + dlogp_inverse).abs().max().item() < 1e-10


def test_forward_log_det_equals_slogdet_of_the_autograd_jacobian():
    flow, _, _ = make_flow(perturb=True)
    z = latent(1, seed=2)[0]
    jac = torch.autograd.functional.jacobian(lambda v: torch.cat(flow(v[None])[:-1], dim=-1)[0], z)
    assert jac.shape == (DIM, DIM)
    *_, dlogp = flow(z[None])
    assert dlogp.item() == pytest.approx(torch.slogdet(jac).logabsdet.item(), abs=1e-8)


@pytest.mark.parametrize("bins", [4, 8])
def test_with_rest_splines_the_flow_inverts_and_its_log_det_is_the_jacobians(bins):
    flow, _, _ = make_flow(perturb=True, rest_spline_bins=bins, size=0.2)
    z = latent(64)
    *outputs, dlogp = flow(z)
    back, dlogp_inverse = flow(*outputs, inverse=True)
    assert (back - z).abs().max().item() < 1e-9 and (dlogp + dlogp_inverse).abs().max().item() < 1e-9
    v = latent(1, seed=2)[0]
    jac = torch.autograd.functional.jacobian(lambda u: torch.cat(flow(u[None])[:-1], dim=-1)[0], v)
    assert flow(v[None])[-1].item() == pytest.approx(torch.slogdet(jac).logabsdet.item(), abs=1e-8)


def test_rest_splines_start_as_the_identity_and_change_the_affine_flow_once_trained():
    plain, _, _ = make_flow(perturb=False)
    splined, _, _ = make_flow(perturb=False, rest_spline_bins=6)
    z = latent(32)
    for a, b in zip(plain(z), splined(z)):
        assert torch.allclose(a, b, atol=1e-12)
    moved, _, _ = make_flow(perturb=True, rest_spline_bins=6, size=0.3)
    assert not torch.allclose(moved(z)[0], plain(z)[0], atol=1e-3)


def test_the_affine_couplings_read_shifts_then_log_scales_as_models_saved_before_splines():
    flow, mean, std = make_flow(perturb=False)
    last = flow.rest_nets[0][-1]
    cond, moved = flow._rest_split[0]
    with torch.no_grad():
        last.bias[: len(moved)] = torch.arange(1.0, len(moved) + 1, dtype=torch.float64)  # shifts, then log-scales 0
    z = latent(4)
    bonds, angles, _, fixed, _ = flow(z)
    r = (torch.cat([bonds, angles, fixed], dim=-1) - mean) / std
    base, _, _ = make_flow(perturb=False)
    b0, a0, _, f0, _ = base(z)
    r0 = (torch.cat([b0, a0, f0], dim=-1) - mean) / std
    assert torch.allclose((r - r0)[:, moved], torch.arange(1.0, len(moved) + 1, dtype=torch.float64).expand(4, -1))


@pytest.mark.parametrize("bins", [1, -1, 2.5])
def test_rest_spline_bins_must_be_zero_or_at_least_two(bins):
    with pytest.raises(ValueError, match="rest_spline_bins must be 0"):
        ICSplineFlow(SIZES, torch.zeros(N_REST), torch.ones(N_REST), rest_spline_bins=bins)


def test_a_fresh_flow_is_affine_on_bonds_angles_fixed_and_the_normal_cdf_on_torsions():
    flow, mean, std = make_flow(perturb=False)
    z = latent(32)
    bonds, angles, torsions, fixed, dlogp = flow(z)
    rest = mean + std * z[:, :N_REST]
    assert torch.allclose(bonds, rest[:, :3], atol=1e-12, rtol=0)
    assert torch.allclose(angles, rest[:, 3:6], atol=1e-12, rtol=0)
    assert torch.allclose(fixed, rest[:, 6:], atol=1e-12, rtol=0)
    if not flow.splines[0]._default_settings.get("enable_identity_init", False):
        return  # real bgflow on an nflows without identity init: zero spline parameters are not the identity
    assert torch.allclose(torsions, torch.special.ndtr(z[:, N_REST:]), atol=1e-12, rtol=0)
    zt = z[:, N_REST:]
    expected = std.log().sum() + (-0.5 * zt**2 - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
    assert torch.allclose(dlogp, expected, atol=1e-12, rtol=0)


def test_torsions_stay_in_the_unit_interval_for_latent_torsions_of_plus_minus_eight():
    flow, _, _ = make_flow(perturb=True)
    z = latent(16)
    z[:8, N_REST:] = 8.0
    z[8:, N_REST:] = -8.0
    _, _, torsions, _, dlogp = flow(z)
    assert ((torsions >= 0) & (torsions <= 1)).all()
    assert torch.isfinite(dlogp).all()


def test_inverse_treats_torsions_a_whole_turn_apart_as_the_same_point():
    flow, _, _ = make_flow(perturb=True)
    bonds, angles, torsions, fixed, _ = flow(latent(16))
    z, dlogp = flow(bonds, angles, torsions, fixed, inverse=True)
    z_turn, dlogp_turn = flow(bonds, angles, torsions + 1.0, fixed, inverse=True)
    assert (z_turn - z).abs().max().item() < 1e-6
    assert (dlogp_turn - dlogp).abs().max().item() < 1e-6


def test_circular_features_are_cos_and_sin_of_one_turn_and_periodic():
    t = torch.rand(10, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    features = CircularFeatures()(t)
    assert features.shape == (10, 6)
    assert torch.allclose(CircularFeatures()(t + 1.0), features, atol=1e-12, rtol=0)
    quarter = CircularFeatures()(torch.tensor([[0.25]], dtype=torch.float64))
    assert torch.allclose(quarter, torch.tensor([[0.0, 1.0]], dtype=torch.float64), atol=1e-15)


def test_mean_or_std_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="mean and std"):
        ICSplineFlow(SIZES, torch.zeros(N_REST - 1), torch.ones(N_REST))
    with pytest.raises(ValueError, match="mean and std"):
        ICSplineFlow(SIZES, torch.zeros(N_REST), torch.ones(N_REST + 1))


def test_a_zero_std_is_refused():
    std = torch.ones(N_REST)
    std[4] = 0.0
    with pytest.raises(ValueError, match="std must be positive"):
        ICSplineFlow(SIZES, torch.zeros(N_REST), std)


# -- spline_generator on alanine dipeptide ------------------------------------------------------


@pytest.fixture(scope="module")
def alanine():
    system = alanine_dipeptide("vacuum")
    gen = torch.Generator().manual_seed(0)
    n = 256
    data = system.positions_tensor().repeat(n, 1) + 0.005 * torch.randn(n, 66, generator=gen, dtype=torch.float64)
    target = system.energy(300.0, platform_name="Reference")
    yield system, data, target
    target.close()


def test_the_generator_samples_finite_cartesian_float64_configurations_with_finite_energies(alanine):
    system, data, target = alanine
    torch.manual_seed(0)
    g = spline_generator(system, data, target)
    x = g.sample(16)
    assert x.shape == (16, 66) and x.dtype == torch.float64
    assert torch.isfinite(x).all()
    assert torch.isfinite(target.energy(x)).all()


def test_the_generator_energy_is_a_finite_nll_per_configuration(alanine):
    system, data, target = alanine
    torch.manual_seed(0)
    g = spline_generator(system, data, target)
    nll = g.energy(data)
    assert nll.shape == (len(data), 1)
    assert torch.isfinite(nll).all()


def test_thirty_adam_steps_lower_the_mean_nll_of_the_data_by_more_than_one_nat(alanine):
    system, data, target = alanine
    torch.manual_seed(0)
    g = spline_generator(system, data, target, n_torsion_layers=2, n_rest_layers=2, hidden=32)  # fast
    optimizer = torch.optim.Adam(g.parameters(), lr=1e-3)
    with torch.no_grad():
        before = g.energy(data).mean().item()
    for _ in range(30):
        batch = data[torch.randint(len(data), (64,))]
        loss = g.energy(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = g.energy(data).mean().item()
    assert before - after > 1.0
