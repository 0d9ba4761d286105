"""bgflow's alanine dipeptide recipe, with ProgressiveKLTrainer in place of KLTrainer.

The shape of bgflow's alanine dipeptide notebook: data, a mixed internal-coordinate
transform, a prior and RealNVP coupling blocks on the internal coordinates, a
``BoltzmannGenerator`` with the OpenMM energy as its target, NLL training, then a mixed
NLL + KL stage. It runs unchanged on real bgflow or on bgflow-gate's host
(``from bgflow_gate import bg``).

The mixed stage is run three ways from the same NLL checkpoint and seed and judged against
each other:

* ``control``: NLL only, as long as the mixed stage (the fair control: continuing NLL on an
  overfit model also changes things);
* ``KLTrainer``: bgflow's plain trainer, mixed NLL + KL;
* ``ProgressiveKLTrainer``: the same mixed stage through the gate (drop samples above
  E_max = 1e5 kJ/mol, lin-log above E_cut = 500 kJ/mol, gradient norm clipped at 10).

Metrics on generator samples: the fraction below E_cut, the phi/psi histogram KL divergence to
the test data (60 x 60 bins; differences below ~0.1 are noise), and Kish's effective sample
size of the importance weights.

Run::

    python examples/alanine_dipeptide.py                       # ~2 minutes on 2 cores
    python examples/alanine_dipeptide.py --nll-iters 5000 --mixed-iters 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings

import torch

from bgflow_gate import ConstantSchedule, ProgressiveKLTrainer, TrainingHealthWarning, bg
from bgflow_gate.systems.alanine import alanine_dipeptide, phi_psi, realnvp_generator
from bgflow_gate.systems.analysis import phi_psi_kl
from bgflow_gate.systems.data import ReplicaExchangeSettings, generate_dataset
from bgflow_gate.units import kt_in_kjmol

TEMPERATURE = 300.0
E_CUT = 500.0  # kJ/mol


@torch.no_grad()
def evaluate(generator, target, test: torch.Tensor, n: int = 4000) -> dict:
    x, own_energy = generator.sample(n, with_energy=True)
    u = target.energy(x)  # the raw target, not the gate: kT
    kt = kt_in_kjmol(TEMPERATURE)
    logw = (own_energy - u).view(-1)
    logw = torch.where(torch.isfinite(logw), logw, torch.full_like(logw, -math.inf))
    ess = bg.effective_sample_size(logw).item() / n if torch.isfinite(logw).any() else 0.0
    phi, _ = phi_psi(x.double())
    return {
        "below_e_cut": float((u.view(-1) * kt < E_CUT).float().mean()),
        "phi_psi_kl": phi_psi_kl(x, test),
        "ess_percent": 100 * ess,
        "phi_positive": float((phi > 0).float().mean()),
        "energy_median_kjmol": float(u.view(-1).median() * kt),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nll-iters", type=int, default=2000)
    parser.add_argument("--mixed-iters", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--frames", type=int, default=4000, help="replica-exchange frames (0.25 ps apart)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", TrainingHealthWarning)

    system = alanine_dipeptide("vacuum")
    settings = ReplicaExchangeSettings(
        n_iterations=args.frames, steps_per_iteration=250, equilibration_iterations=40, platform="Reference"
    )
    dataset = generate_dataset(settings, args.data_dir)
    train, test = (torch.as_tensor(a, dtype=torch.float32) for a in dataset.split(0.2))
    torch.manual_seed(args.seed)
    generator, target = realnvp_generator(system, train, args.blocks, args.hidden, TEMPERATURE)

    start = time.perf_counter()
    nll = ProgressiveKLTrainer(generator, torch.optim.Adam(generator.parameters(), lr=5e-4), train_energy=False)
    nll.train(args.nll_iters, data=train, batchsize=args.batch)
    results = {"NLL model": {**evaluate(generator, target, test), "seconds": time.perf_counter() - start}}
    checkpoint = copy.deepcopy(generator.state_dict())

    def continuation(name, make_trainer, **train_kwargs):
        generator.load_state_dict(checkpoint)  # the trainers leave the generator's target as it is
        torch.manual_seed(args.seed + 1)
        optim = torch.optim.Adam(generator.parameters(), lr=5e-4)
        trainer = make_trainer(optim)
        begin = time.perf_counter()
        trainer.train(args.mixed_iters, data=train, batchsize=args.batch, **train_kwargs)
        results[name] = {**evaluate(generator, target, test), "seconds": time.perf_counter() - begin}

    continuation("control (NLL only)", lambda o: ProgressiveKLTrainer(generator, o, train_energy=False))
    continuation(
        "KLTrainer (mixed)", lambda o: bg.KLTrainer(generator, o), w_likelihood=0.9, w_energy=0.1
    )
    continuation(
        "ProgressiveKLTrainer (mixed)",
        lambda o: ProgressiveKLTrainer(
            generator, o, schedule=ConstantSchedule(1e5), e_cut=E_CUT, max_grad_norm=10.0,
            iters_per_epoch=max(1, len(train) // args.batch),
        ),
        w_likelihood=0.9, w_energy=0.1,
    )

    print(f"\nalanine dipeptide (vacuum, {TEMPERATURE:g} K), host {bg.HOST}: {len(train)} training frames, "
          f"{args.blocks} RealNVP blocks x {args.hidden}, NLL {args.nll_iters} + mixed {args.mixed_iters} iterations")
    print(f"{'model':<30} {'below E_cut':>11} {'phi/psi KL':>10} {'ESS %':>8} {'phi>0':>7} {'E_p50 kJ/mol':>13} {'s':>6}")
    for name, r in results.items():
        print(f"{name:<30} {100 * r['below_e_cut']:>10.1f}% {r['phi_psi_kl']:>10.2f} {r['ess_percent']:>8.3f} "
              f"{100 * r['phi_positive']:>6.1f}% {r['energy_median_kjmol']:>13.1f} {r['seconds']:>6.0f}")
    print(json.dumps(results))
    if hasattr(target.bridge, "close"):  # the host's bridge; bgflow's has no close()
        target.bridge.close()
    return results


if __name__ == "__main__":
    main()
