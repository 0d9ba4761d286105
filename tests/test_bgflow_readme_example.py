"""bgflow's README example (a RealNVP block on a double well) runs on bgflow_gate.bg unchanged."""

from __future__ import annotations

import torch

from bgflow_gate import bg


def test_the_bgflow_readme_minimal_example_runs_unchanged():
    # the example's code, with `import bgflow as bg` replaced by `from bgflow_gate import bg`
    dim = 2
    prior = bg.NormalDistribution(dim)
    target = bg.DoubleWellEnergy(dim)
    layers = []
    layers.append(bg.SplitFlow(dim // 2))
    layers.append(bg.CouplingFlow(
        bg.AffineTransformer(
            shift_transformation=bg.DenseNet([dim // 2, 4, dim // 2], activation=torch.nn.ReLU()),
            scale_transformation=bg.DenseNet([dim // 2, 4, dim // 2], activation=torch.nn.Tanh()),
        )
    ))
    layers.append(bg.InverseFlow(bg.SplitFlow(dim // 2)))
    flow = bg.SequentialFlow(layers)
    generator = bg.BoltzmannGenerator(prior, flow, target)
    samples = generator.sample(1000)

    assert samples.shape == (1000, 2)
    assert torch.isfinite(samples).all()
    x, dlogp = generator.sample(10, with_dlogp=True)
    assert torch.allclose(generator.energy(x), prior.energy(*flow(x, inverse=True)[:1]) - flow(x, inverse=True)[1], atol=1e-5)


def test_the_readme_generator_trains_with_the_kl_trainer():
    torch.manual_seed(0)
    dim = 2
    prior = bg.NormalDistribution(dim)
    target = bg.DoubleWellEnergy(dim)
    layers = []
    for _ in range(3):
        layers += [
            bg.SplitFlow(dim // 2),
            bg.CouplingFlow(bg.AffineTransformer(
                shift_transformation=bg.DenseNet([dim // 2, 16, dim // 2], activation=torch.nn.ReLU()),
                scale_transformation=bg.DenseNet([dim // 2, 16, dim // 2], activation=torch.nn.Tanh()),
            )),
            bg.SwapFlow(),
            bg.InverseFlow(bg.SplitFlow(dim // 2)),
        ]
    generator = bg.BoltzmannGenerator(prior, bg.SequentialFlow(layers), target)
    trainer = bg.KLTrainer(generator, optim=torch.optim.Adam(generator.parameters(), lr=5e-3), train_likelihood=False)
    before = generator.kldiv(2000).mean().item()
    trainer.train(150, batchsize=256)
    after = generator.kldiv(2000).mean().item()
    assert after < before - 0.5
