"""The host's distributions, Boltzmann generator, weights and plain KLTrainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bgflow_gate.host import (
    BoltzmannGenerator,
    DataSetSampler,
    DoubleWellEnergy,
    Energy,
    KLTrainer,
    LossReporter,
    NormalDistribution,
    effective_sample_size,
    sampling_efficiency,
)


class Scale(torch.nn.Module):
    """x = exp(s) * z elementwise, a learnable flow with a known log-det."""

    def __init__(self, dim, log_scale=0.0):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.full((dim,), float(log_scale), dtype=torch.float64))

    def forward(self, x, inverse=False, **kwargs):
        s = -self.log_scale if inverse else self.log_scale
        return x * torch.exp(s), s.sum().expand(x.shape[0], 1)


class Gaussian(Energy):
    """Target: an isotropic Gaussian of width sigma (unnormalised energy)."""

    def __init__(self, dim, sigma):
        super().__init__(dim)
        self.sigma = sigma

    def _energy(self, x):
        return 0.5 * (x / self.sigma).pow(2).sum(-1, keepdim=True)


# -- NormalDistribution -------------------------------------------------------------------


def test_normal_energy_is_the_negative_log_density_including_covariance_and_temperature():
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    dist = NormalDistribution(2, mean=mean, cov=cov)
    x = torch.tensor([[0.0, 0.0], [1.5, -1.0]], dtype=torch.float64)
    for t in (1.0, 2.5):
        ref = -torch.distributions.MultivariateNormal(mean, t * cov).log_prob(x)
        assert dist.energy(x, temperature=t).flatten().tolist() == pytest.approx(ref.tolist(), rel=1e-12)


def test_normal_samples_have_the_given_mean_and_covariance():
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    x = NormalDistribution(2, mean=mean, cov=cov).sample(200_000, temperature=2.0)
    assert x.shape == (200_000, 2)
    assert x.mean(0).tolist() == pytest.approx(mean.tolist(), abs=0.02)
    assert torch.cov(x.T).flatten().tolist() == pytest.approx((2 * cov).flatten().tolist(), abs=0.03)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean": torch.zeros(3)}, r"mean must have shape \(2,\)"),
        ({"cov": torch.eye(3)}, r"cov must have shape \(2, 2\)"),
        ({"cov": torch.tensor([[1.0, 0.5], [0.0, 1.0]])}, "symmetric"),
        ({"cov": torch.tensor([[1.0, 2.0], [2.0, 1.0]])}, "positive definite"),
    ],
)
def test_normal_rejects_bad_mean_or_covariance(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormalDistribution(2, **kwargs)


# -- DataSetSampler -----------------------------------------------------------------------


def test_dataset_sampler_visits_every_sample_once_per_pass_then_reshuffles():
    data = torch.arange(10.0).unsqueeze(1)
    sampler = DataSetSampler(data, generator=torch.Generator().manual_seed(1))
    first = torch.cat([sampler.sample(4), sampler.sample(4), sampler.sample(2)]).flatten()
    assert sorted(first.tolist()) == list(range(10))
    second = torch.cat([sampler.sample(5), sampler.sample(5)]).flatten()
    assert sorted(second.tolist()) == list(range(10)) and second.tolist() != first.tolist()
    assert sampler.sample(25).shape == (25, 1)  # batches larger than the data wrap around


def test_dataset_sampler_returns_tuples_for_several_tensors_and_resumes_from_its_state():
    a, b = torch.arange(6.0).unsqueeze(1), torch.arange(6.0).unsqueeze(1) * 10
    sampler = DataSetSampler(a, b)
    xa, xb = sampler.sample(3)
    assert (xb == 10 * xa).all()
    state = sampler.state_dict()
    expected = sampler.sample(3)
    restored = DataSetSampler(a, b)
    restored.load_state_dict(state)
    assert all((e == r).all() for e, r in zip(expected, restored.sample(3)))


def test_dataset_sampler_resize_draws_entries_with_replacement_as_bgflow():
    a, b = torch.arange(4.0).unsqueeze(1), torch.arange(4.0).unsqueeze(1) * 10
    sampler = DataSetSampler(a, b, generator=torch.Generator().manual_seed(3))
    indices = sampler.resize_(7)
    assert len(sampler) == 7 and indices.shape == (7,) and set(indices.tolist()) <= {0, 1, 2, 3}
    assert sampler.data[0].flatten().tolist() == [float(i) for i in indices]
    assert (sampler.data[1] == 10 * sampler.data[0]).all()  # the tensors stay paired
    assert sorted(torch.cat([sampler.sample(4)[0], sampler.sample(3)[0]]).flatten().tolist()) == sorted(
        float(i) for i in indices
    )  # one pass visits each new entry once
    assert sampler.resize_(2).shape == (2,) and len(sampler) == 2
    assert sampler.resize_(2).tolist() == [0, 1]  # the same size changes nothing
    with pytest.raises(ValueError, match="positive integer"):
        sampler.resize_(0)


def test_dataset_sampler_rejects_unequal_or_empty_data():
    with pytest.raises(ValueError, match="same length"):
        DataSetSampler(torch.zeros(3, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="empty"):
        DataSetSampler(torch.zeros(0, 1))


# -- BoltzmannGenerator ---------------------------------------------------------------------


def make_generator(log_scale=0.0, sigma=2.0, dim=2):
    prior = NormalDistribution(dim, mean=torch.zeros(dim, dtype=torch.float64))
    return BoltzmannGenerator(prior, Scale(dim, log_scale), Gaussian(dim, sigma))


def test_generator_energy_is_the_exact_negative_log_likelihood():
    gen = make_generator(log_scale=math.log(3.0))
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=torch.float64)
    ref = -torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)).log_prob(x).sum(-1)
    assert gen.energy(x).flatten().tolist() == pytest.approx(ref.tolist(), rel=1e-12)


def test_kldiv_is_target_energy_minus_log_det():
    torch.manual_seed(0)
    gen = make_generator(log_scale=math.log(2.0), sigma=2.0)
    kl = gen.kldiv(10_000)
    assert kl.shape == (10_000, 1)
    # x = 2 z, u(x) = |x|^2 / 8 = |z|^2 / 2: mean 1 for dim 2; dlogp = 2 log 2
    assert kl.mean().item() == pytest.approx(1.0 - 2 * math.log(2.0), abs=0.03)


def test_sample_flags_append_latent_dlogp_energy_and_weights_in_order():
    torch.manual_seed(0)
    gen = make_generator(log_scale=0.5)
    x, z, dlogp, energy, logw, w = gen.sample(
        5, with_latent=True, with_dlogp=True, with_energy=True, with_log_weights=True, with_weights=True
    )
    assert torch.allclose(x, z * math.exp(0.5))
    assert dlogp.flatten().tolist() == pytest.approx([1.0] * 5)
    assert torch.allclose(energy, gen.energy(x))
    assert torch.allclose(logw, energy - gen._target.energy(x))
    assert w.sum().item() == pytest.approx(1.0)
    assert torch.allclose(gen.log_weights(x), torch.log_softmax(logw.flatten(), 0))
    assert gen.sample(3).shape == (3, 2)


def test_a_perfect_generator_has_uniform_weights_and_full_effective_sample_size():
    torch.manual_seed(0)
    gen = make_generator(log_scale=math.log(2.0), sigma=2.0)
    logw = gen.log_weights(gen.sample(100))
    assert effective_sample_size(logw).item() == pytest.approx(100.0)
    assert sampling_efficiency(logw).item() == pytest.approx(1.0)


def test_kish_effective_sample_size_of_one_dominant_weight_is_one():
    logw = torch.tensor([0.0, -1e3, -1e3, -1e3], dtype=torch.float64)
    assert effective_sample_size(logw).item() == pytest.approx(1.0)
    assert effective_sample_size(torch.log(torch.tensor([1.0, 1.0, 2.0]))).item() == pytest.approx(16 / 6)


def test_double_well_energy_matches_its_formula():
    e = DoubleWellEnergy(3, a=0.5)
    x = torch.tensor([[2.0, 1.0, -1.0]])
    assert e.energy(x).item() == pytest.approx(0.5 * 2 - 4 * 4 + 16 + 1.0)


# -- LossReporter and KLTrainer ---------------------------------------------------------------


def test_loss_reporter_keeps_values_smooths_and_reports_recent(capsys):
    rep = LossReporter("A", "B")
    for i in range(5):
        rep.report(torch.tensor(float(i)), 10.0 * i)
    labels, x, ys = rep.losses(n_smooth=2)
    assert labels == ("A", "B") and x.tolist() == [2, 3, 4, 5]
    assert ys[0].tolist() == [0.5, 1.5, 2.5, 3.5]
    assert rep.recent(2).tolist() == [[3.0, 4.0], [30.0, 40.0]]
    rep.print()
    assert capsys.readouterr().out.split() == ["5", "A:", "4.0000", "B:", "40.0000"]
    with pytest.raises(ValueError, match="expected 2 losses"):
        rep.report(1.0)


def test_kl_trainer_by_likelihood_fits_the_data_scale():
    torch.manual_seed(0)
    gen = make_generator(log_scale=0.0)
    data = 3.0 * torch.randn(4096, 2, dtype=torch.float64)
    trainer = KLTrainer(gen, optim=torch.optim.Adam(gen.parameters(), lr=0.05), train_energy=False)
    trainer.train(300, data=data, batchsize=256)
    assert torch.exp(gen.flow.log_scale).tolist() == pytest.approx([3.0, 3.0], rel=0.05)
    labels, x, (nll,) = trainer.losses()
    assert labels == ("NLL",) and len(nll) == 300 and nll[-20:].mean() < nll[:20].mean()


def test_kl_trainer_by_energy_fits_the_target_scale():
    torch.manual_seed(0)
    gen = make_generator(log_scale=0.0, sigma=2.0)
    trainer = KLTrainer(gen, optim=torch.optim.Adam(gen.parameters(), lr=0.01), train_likelihood=False)
    trainer.train(400, batchsize=512)
    assert torch.exp(gen.flow.log_scale).tolist() == pytest.approx([2.0, 2.0], rel=0.05)
    assert trainer.reporter._labels == ("KLL",)


def test_kl_trainer_reports_both_losses_test_nll_and_a_custom_loss():
    torch.manual_seed(0)
    gen = make_generator()
    data = torch.randn(64, 2, dtype=torch.float64)
    trainer = KLTrainer(gen, test_likelihood=True, custom_loss=lambda scale: scale * gen.flow.log_scale.pow(2).sum())
    trainer.train(3, data=data, testdata=data, batchsize=16, w_custom=1.0, custom_loss_kwargs={"scale": 2.0})
    assert trainer.reporter._labels == ("KLL", "NLL", "NLL(Test)", "Custom")
    assert trainer.reporter.recent(1).shape == (4, 1)
    with pytest.raises(ValueError, match="needs data"):
        trainer.train(1)


def test_kl_trainer_skips_steps_with_nan_gradients_and_ignores_clip_forces(capsys):
    gen = make_generator()
    before = gen.flow.log_scale.detach().clone()
    trainer = KLTrainer(gen, train_energy=False)
    nan_data = torch.full((8, 2), math.nan, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="clip_forces"):
        trainer.train(2, data=nan_data, batchsize=4, clip_forces=10.0)
    assert torch.equal(gen.flow.log_scale.detach(), before)
    assert capsys.readouterr().out.count("found nan in grad") == 2


def test_kl_trainer_steps_schedulers_at_their_interval():
    gen = make_generator()
    optim = torch.optim.SGD(gen.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # bgflow steps schedulers first
        KLTrainer(gen, optim=optim, train_likelihood=False).train(4, batchsize=4, schedulers=[(2, sched)])
    assert optim.param_groups[0]["lr"] == pytest.approx(0.25)  # stepped at iterations 0 and 2
    assert np.isfinite(gen.flow.log_scale.detach().numpy()).all()
