"""Against real bgflow (skipped unless bgflow imports and is the resolved host)."""

from __future__ import annotations

import pytest
import torch

import bgflow_gate
from bgflow_gate import ScheduledEnergyGate
from bgflow_gate.targets import generator_target

pytestmark = [
    pytest.mark.bgflow,
    pytest.mark.skipif(bgflow_gate.HOST != "bgflow", reason="real bgflow is not the resolved host"),
]


@pytest.fixture
def bgflow():
    import bgflow

    return bgflow


def test_the_gate_is_a_bgflow_energy(bgflow):
    assert issubclass(ScheduledEnergyGate, bgflow.Energy)
    assert bgflow_gate.bg.module is bgflow


def test_a_real_boltzmann_generator_accepts_the_gate_as_its_target(bgflow):
    torch.manual_seed(0)
    dim = 2
    target = bgflow.DoubleWellEnergy(dim=dim)
    gate = ScheduledEnergyGate(target, schedule=1e3, e_cut=20.0, target_unit="kJ/mol")
    prior = bgflow.NormalDistribution(dim)
    layers = []
    for _ in range(2):
        layers += [
            bgflow.SplitFlow(1),
            bgflow.CouplingFlow(bgflow.AffineTransformer(
                shift_transformation=bgflow.DenseNet([1, 16, 1]),
                scale_transformation=bgflow.DenseNet([1, 16, 1]),
            )),
            bgflow.SwapFlow(),
            bgflow.InverseFlow(bgflow.SplitFlow(1)),
        ]
    generator = bgflow.BoltzmannGenerator(prior, bgflow.SequentialFlow(layers), gate)
    assert generator_target(generator) is gate

    kl = generator.kldiv(256)
    assert kl.shape == (256, 1)
    kl.mean().backward()
    grads = [p.grad for p in generator.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert gate.last_gated.shape == (256,)
    assert gate.statistics()["samples"] == 256

    x = torch.tensor([[0.0, 0.0], [50.0, 0.0]])
    gate.energy(x)
    assert gate.last_gated.tolist() == [False, True]  # the double well at x=50 is ~6e6


def test_bgflow_energies_in_kt_are_gated_in_kj_per_mol(bgflow):
    gate = ScheduledEnergyGate(bgflow.DoubleWellEnergy(dim=2), schedule=1e5, target_unit="kT", temperature=300.0)
    assert gate.e_max_kt == pytest.approx(4.009e4, rel=1e-4)
    x = torch.tensor([[14.0, 0.0], [15.0, 0.0]])  # x^4 - 4x^2: 3.76e4 and 4.97e4 kT
    gate.energy(x)
    assert gate.last_gated.tolist() == [False, True]


def test_the_progressive_trainer_is_a_bgflow_kl_trainer_and_trains_a_real_generator(bgflow):
    from bgflow_gate import ProgressiveKLTrainer

    assert issubclass(ProgressiveKLTrainer, bgflow.KLTrainer)
    torch.manual_seed(0)
    dim = 2
    layers = []
    for _ in range(2):
        layers += [
            bgflow.SplitFlow(1),
            bgflow.CouplingFlow(bgflow.AffineTransformer(
                shift_transformation=bgflow.DenseNet([1, 16, 1], activation=torch.nn.ReLU()),
                scale_transformation=bgflow.DenseNet([1, 16, 1], activation=torch.nn.Tanh()),
            )),
            bgflow.SwapFlow(),
            bgflow.InverseFlow(bgflow.SplitFlow(1)),
        ]
    generator = bgflow.BoltzmannGenerator(
        bgflow.NormalDistribution(dim), bgflow.SequentialFlow(layers), bgflow.DoubleWellEnergy(dim)
    )
    data = torch.cat([torch.randn(512, 1) * 0.3 + torch.randint(0, 2, (512, 1)) * 4 - 2, torch.randn(512, 1)], 1)
    trainer = ProgressiveKLTrainer(
        generator, torch.optim.Adam(generator.parameters(), lr=5e-3), target_unit="kJ/mol",
        schedule={"type": "three_stage", "hold_epochs": 1, "warmup_epochs": 2},
    )
    history = trainer.train(n_epochs=3, data=data, batchsize=64, w_energy=0.1)
    assert [r["epoch"] for r in history] == [0, 1, 2] and trainer.iters_per_epoch == 8
    assert history[-1]["nll"] < history[0]["nll"]
    assert isinstance(trainer.gate, ScheduledEnergyGate) and trainer.gate.target is generator_target(generator)
    assert not isinstance(generator_target(generator), ScheduledEnergyGate)  # the generator is left as it was
    assert tuple(trainer.reporter.losses()[0]) == ("KLL", "NLL")
