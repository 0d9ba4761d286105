"""ScheduledEnergyGate at work: the default schedule against the legacy one that stalled.

The target is a small molecule-like energy: eight Lennard-Jones particles (sigma 0.34 nm,
epsilon 1 kJ/mol) in a weak harmonic trap. An untrained Boltzmann generator puts particles
on top of each other, with energies of 1e8 kJ/mol and more; as it trains, its samples
approach the cluster's minimum. Here a stand-in generator improves on a fixed timetable:
a squeezed cube that relaxes to the minimum-energy one, its typical energy falling from
3e9 kJ/mol by a decade every 30 epochs, with noise on every coordinate and one sample per
batch with NaN coordinates, as a crashed integration would give.

Every epoch both gates see the same batch:

* ``three-stage``: ``ThreeStageSchedule()``, the default (1e10 -> 1e5 kJ/mol, hold 50,
  warm-up to 300 epochs);
* ``legacy``: ``LinearSchedule()`` (1e7 -> 1e4 kJ/mol over 100 epochs), which tightens
  faster than the generator improves and rejects nearly every sample: a trainer that skips
  such batches learns nothing more.

Run::

    python examples/gate_walkthrough.py [--epochs 400] [--every 25] [--batch 1024]
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from bgflow_gate import LinearSchedule, ScheduledEnergyGate, ThreeStageSchedule, bg

SIGMA, EPSILON, N = 0.34, 1.0, 8


class LennardJonesCluster(bg.Energy):
    """Eight Lennard-Jones particles in a harmonic trap; positions in nm, energy in kJ/mol."""

    def __init__(self, trap: float = 10.0):
        super().__init__(3 * N)
        self.trap = trap
        self.pairs = torch.triu_indices(N, N, 1)

    def _energy(self, x):
        pos = x.view(*x.shape[:-1], N, 3)
        r2 = (pos[..., self.pairs[0], :] - pos[..., self.pairs[1], :]).pow(2).sum(-1)
        s6 = (SIGMA**2 / r2) ** 3
        lj = (4 * EPSILON * (s6 * s6 - s6)).sum(-1, keepdim=True)
        centre = pos - pos.mean(-2, keepdim=True)
        return lj + self.trap * centre.pow(2).sum((-2, -1)).unsqueeze(-1)


def minimum_cube() -> torch.Tensor:
    side = 2 ** (1 / 6) * SIGMA  # the pair distance of the Lennard-Jones minimum
    corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)))
    return (corners * side).flatten()


def stand_in_generator(epoch: float, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Samples that improve with the epoch: a cube squeezed so that the typical energy is
    about 10**(9.5 - epoch / 30) kJ/mol, relaxing to the minimum by epoch ~290, with Gaussian
    noise on every coordinate (0.03 nm at full size)."""
    typical = 10 ** (9.5 - epoch / 30)
    squeeze = min(1.0, (24 / typical) ** (1 / 12))  # 12 nearest-neighbour pairs of ~2 / s^12
    noise = 0.03 * squeeze  # nm, in proportion to the cube's size
    x = squeeze * minimum_cube() + noise * torch.randn(batch, 3 * N, generator=gen)
    x[0, 0] = math.nan  # one crashed sample per batch
    return x


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=400)
    parser.add_argument("--every", type=float, default=25)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    target = LennardJonesCluster()
    gates = {
        "three-stage": ScheduledEnergyGate(target, ThreeStageSchedule(), e_cut=500.0, target_unit="kJ/mol"),
        "legacy": ScheduledEnergyGate(target, LinearSchedule(), e_cut=500.0, target_unit="kJ/mol"),
    }
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"{'epoch':>6} {'raw p50 kJ/mol':>15} {'raw p90':>10} | "
        f"{'three-stage E_max':>17} {'gated':>7} | {'legacy E_max':>12} {'gated':>7}"
    )
    gated = {name: [] for name in gates}
    n_steps = int(args.epochs // args.every) + 1
    for step in range(n_steps):
        epoch = step * args.every
        x = stand_in_generator(epoch, args.batch, gen)
        for name, gate in gates.items():
            gate.set_epoch(epoch)
            gate.energy(x)
        s3, sl = (gates[name].statistics() for name in ("three-stage", "legacy"))
        for name, s in (("three-stage", s3), ("legacy", sl)):
            gated[name].append(s["gated_fraction"])
        print(
            f"{epoch:>6g} {s3['energy_p50']:>15.3e} {s3['energy_p90']:>10.2e} | "
            f"{s3['e_max']:>17.3e} {100 * s3['gated_fraction']:>6.1f}% | "
            f"{sl['e_max']:>12.3e} {100 * sl['gated_fraction']:>6.1f}%"
        )
    for name in gates:
        stalled = sum(f >= 0.99 for f in gated[name])
        print(f"{name}: 99 % or more of the batch gated at {stalled} of {n_steps} epochs shown")
    for name, gate in gates.items():
        print(f"\n{name} gate, whole run:")
        print(gate.report("total"))
    return gated


if __name__ == "__main__":
    main()
