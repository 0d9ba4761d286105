"""Where a mixed NLL + KL iteration spends its time, with the OpenMM energy and with TorchEnergy.

``aa_300_450_cpu``'s model (the spline generator, 4 + 4 couplings × 128, 8 bins, float32) on
alanine dipeptide in vacuum, ``ProgressiveKLTrainer`` with the default gate, batch ``--batch``,
``w_likelihood=0.9, w_energy=0.1``. For each energy — the host's ``OpenMMEnergy`` (one
Reference worker) and :class:`~bgflow_gate.TorchEnergy` (float32 like the flow) — it times
``--iters`` iterations (best of ``--repeats`` rounds) and, inside them, the energy's own calls
(forward; the backward through a TorchEnergy is counted with the flow's), and prints the
energy's share of an iteration.

Usage::

    python benchmarks/bench_iteration.py [--batch 256] [--iters 20] [--repeats 3] [--frames 1200]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from bgflow_gate import ProgressiveKLTrainer, TorchEnergy, TrainingHealthWarning, bg
from bgflow_gate.systems.alanine import alanine_dipeptide
from bgflow_gate.systems.data import ReplicaExchangeSettings, generate_dataset
from bgflow_gate.systems.generators import spline_generator


class Timed(bg.Energy):
    """A target whose ``energy`` calls are timed (forward only)."""

    def __init__(self, inner):
        super().__init__(inner.dim)
        self.inner, self.seconds = inner, 0.0
        self.unit, self.temperature = "kT", 300.0
        self.accepts_nonfinite = getattr(inner, "accepts_nonfinite", False)

    def _energy(self, x):
        start = time.perf_counter()
        out = self.inner.energy(x)
        self.seconds += time.perf_counter() - start
        return out


def measure(system, train, target, args) -> tuple[float, float]:
    """Seconds per iteration and the energy's seconds per iteration (best round)."""
    torch.manual_seed(0)
    timed = Timed(target)
    generator = spline_generator(system, train, timed)
    trainer = ProgressiveKLTrainer(generator, torch.optim.Adam(generator.parameters(), lr=1e-4), iters_per_epoch=50)
    kwargs = dict(data=train, batchsize=args.batch, w_likelihood=0.9, w_energy=0.1)
    trainer.train(3, **kwargs)
    best = (float("inf"), 0.0)
    for _ in range(args.repeats):
        timed.seconds = 0.0
        start = time.perf_counter()
        trainer.train(args.iters, **kwargs)
        best = min(best, ((time.perf_counter() - start) / args.iters, timed.seconds / args.iters))
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", TrainingHealthWarning)
    system = alanine_dipeptide("vacuum")
    settings = ReplicaExchangeSettings(n_iterations=args.frames, steps_per_iteration=250, equilibration_iterations=40,
                                       platform="Reference")
    train = torch.as_tensor(generate_dataset(settings, args.data_dir).split(0.2)[0], dtype=torch.float32)
    openmm = system.energy(300.0, platform_name="Reference")
    engines = {"OpenMM Reference, 1 worker": openmm,
               "TorchEnergy float32": TorchEnergy.from_openmm(system.system, temperature=300.0)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"best of {args.repeats} x {args.iters} mixed iterations")
    results = {}
    for name, target in engines.items():
        per_iteration, energy = measure(system, train, target, args)
        results[name] = (per_iteration, energy)
        print(f"  {name:<28} {1e3 * per_iteration:8.1f} ms / iteration, energy {1e3 * energy:7.1f} ms "
              f"({100 * energy / per_iteration:.0f} %)")
    openmm.bridge.close()
    return results


if __name__ == "__main__":
    main()
