"""Energies of untrained alanine dipeptide generators: how physical is the start?

Every generator is sampled before any training (``--samples`` configurations, default
4,000) and its samples' energies (amber96, vacuum, kJ/mol) are summarised: median, 90th and
99th percentile, fraction above 1e8 kJ/mol and fraction below E_cut = 500 kJ/mol.

Generators:

* ``physical`` variants (:mod:`bgflow_gate.systems.physical`, no MD data): the z-matrix
  from the chiral frame N-CA-C with siblings referenced to each other, five uniform rotors
  (phi, psi, three methyls) or two (phi, psi); and the z-matrix builder's own global
  choice (CB and HA placed from the acetyl carbon), with and without sibling references.
* ``spline``: the pipeline's spline generator (bonds, angles and rigid block standardised
  on MD data, every torsion uniform).
* ``realnvp``: bgflow's RealNVP recipe on the mixed IC transform fitted on MD data.

The MD data (for the last two only) are the ``smoke`` experiment's replica-exchange frames
(~20 s to generate, cached in ``--data-dir``).

Run::

    python examples/untrained_energies.py [--samples 4000] [--data-dir data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bgflow_gate.config import DEFAULT_CONFIG, data_settings, load_experiments
from bgflow_gate.systems.alanine import alanine_dipeptide, realnvp_generator
from bgflow_gate.systems.data import generate_dataset
from bgflow_gate.systems.generators import spline_generator
from bgflow_gate.systems.physical import (
    ALL_ROTORS, BACKBONE_ROTORS, global_z_matrix, minimized_positions, physical_generator,
)
from bgflow_gate.units import kt_in_kjmol

TEMPERATURE = 300.0
E_CUT = 500.0


def energy_summary(energies: np.ndarray) -> dict[str, float]:
    """Quantiles and threshold fractions of energies in kJ/mol (non-finite counts as high)."""
    e = np.where(np.isfinite(energies), energies, np.inf)
    return {
        "p50": float(np.quantile(e, 0.5)),
        "p90": float(np.quantile(e, 0.9)),
        "p99": float(np.quantile(e, 0.99)),
        "above_1e8": float(np.mean(e > 1e8)),
        "below_e_cut": float(np.mean(e < E_CUT)),
    }


def sample_energies(generator, target, n: int) -> np.ndarray:
    """Energies (kJ/mol) of ``n`` samples of ``generator`` under ``target`` (kT)."""
    with torch.no_grad():
        x = generator.sample(n)
        return target.energy(x.double()).view(-1).numpy() * kt_in_kjmol(TEMPERATURE)


def md_train_frames(data_dir: str) -> torch.Tensor:
    """The smoke experiment's MD training frames (float32, nm)."""
    settings = data_settings(load_experiments(DEFAULT_CONFIG), "smoke")
    train, _ = generate_dataset(settings, data_dir, progress=False).split(0.2)
    return torch.as_tensor(train, dtype=torch.float32)


def generators(system, target, data_dir: str) -> dict:
    """Name -> zero-argument builder of every generator compared."""
    minimum = minimized_positions(system)
    builder_z = global_z_matrix(system.topology, frame=None, siblings=False)
    builder_sib = global_z_matrix(system.topology, frame=None)
    physical = {
        "physical, chiral frame, 5 rotors": dict(rotors=ALL_ROTORS),
        "physical, chiral frame, phi/psi only": dict(rotors=BACKBONE_ROTORS),
        "physical, builder's frame, 5 rotors": dict(z_matrix=builder_z),
        "physical, builder's frame + siblings, 5 rotors": dict(z_matrix=builder_sib),
    }
    built = {
        name: (lambda kw=kw: physical_generator(system, target, positions=minimum, **kw))
        for name, kw in physical.items()
    }
    built["spline (MD-standardised)"] = lambda: spline_generator(system, md_train_frames(data_dir), target)
    built["realnvp (bgflow recipe)"] = lambda: realnvp_generator(system, md_train_frames(data_dir))[0]
    return built


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    system = alanine_dipeptide("vacuum")
    target = system.energy(TEMPERATURE, platform_name="Reference")
    results = {}
    print(f"{'generator':<48} {'p50':>10} {'p90':>10} {'p99':>10} {'>1e8':>7} {'<500':>7} {'s':>5}")
    for name, build in generators(system, target, args.data_dir).items():
        torch.manual_seed(args.seed)
        generator = build()
        start = time.perf_counter()
        row = energy_summary(sample_energies(generator, target, args.samples))
        row["seconds"] = time.perf_counter() - start
        results[name] = row
        print(f"{name:<48} {row['p50']:>10.3g} {row['p90']:>10.3g} {row['p99']:>10.3g} "
              f"{100 * row['above_1e8']:>6.2f}% {100 * row['below_e_cut']:>6.1f}% {row['seconds']:>5.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": args.samples, "seed": args.seed, "generators": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
