"""The seed's promises over a long run: "skip < 10 % after epoch 100, no stall over 1,500 epochs".

A cheap configuration of the seed's scenario: bgflow's alanine dipeptide recipe (a RealNVP on
the mixed internal coordinates, OpenMM energy in vacuum at 300 K) from untrained weights,
mixed NLL + KL (0.9 / 0.1), the default gate (three-stage schedule 1e10 -> 1e5 kJ/mol, hold
50, warm-up to 300 epochs, E_cut 500, ``drop``, ``above_cut="energy"``), with
``--iters-per-epoch`` iterations of ``--batch`` samples per epoch. It prints the skip rate
per schedule stage and per window of epochs, the median raw energy along the run, and the
longest run of epochs in which every KL batch was skipped.

Usage::

    python benchmarks/bench_long_schedule.py [--epochs 1500] [--iters-per-epoch 1] [--batch 128]
        [--above-cut energy] [--adaptive-quantile 0.9] [--on-stall relax] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from bgflow_gate import ProgressiveKLTrainer, ThreeStageSchedule, TrainingHealthWarning
from bgflow_gate.systems.alanine import alanine_dipeptide, realnvp_generator
from bgflow_gate.systems.data import ReplicaExchangeSettings, generate_dataset


def longest_stall(history: list[dict]) -> int:
    """The longest run of consecutive epochs in which every KL batch was skipped."""
    best = run = 0
    for record in history:
        run = run + 1 if record["batches"] and record["batches_skipped"] == record["batches"] else 0
        best = max(best, run)
    return best


def report(history: list[dict], schedule: ThreeStageSchedule, window: int) -> None:
    stages: dict[str, list[float]] = {}
    for r in history:
        stages.setdefault(schedule.stage_of(r["epoch"]), []).append(r["skip_rate"])
    print("skip rate per stage: " + ", ".join(f"{k} {100 * np.mean(v):.1f} % ({len(v)} epochs)" for k, v in stages.items()))
    after = [r["skip_rate"] for r in history if r["epoch"] >= 100]
    print(f"skip rate after epoch 100: {100 * np.mean(after):.2f} %" if after else "no epoch after 100")
    print(f"longest stall (every KL batch skipped): {longest_stall(history)} epochs")
    print(f"{'epochs':>12} {'skip %':>8} {'E_p50 (median of window)':>26} {'samples above E_cut %':>22}")
    for start in range(0, len(history), window):
        part = history[start : start + window]
        above = sum(r["samples_above_cut"] for r in part) / max(1, sum(r["samples"] for r in part))
        print(f"{part[0]['epoch']:>5}-{part[-1]['epoch']:<6} {100 * np.mean([r['skip_rate'] for r in part]):>8.1f} "
              f"{np.median([r['energy_p50'] for r in part]):>26.3g} {100 * above:>22.1f}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1500)
    parser.add_argument("--iters-per-epoch", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--above-cut", default="energy")
    parser.add_argument("--adaptive-quantile", type=float, default=None)
    parser.add_argument("--on-stall", default="warn", choices=("warn", "relax"))
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    system = alanine_dipeptide("vacuum")
    settings = ReplicaExchangeSettings(n_iterations=args.frames, steps_per_iteration=250, equilibration_iterations=40,
                                       platform="Reference")
    train, _ = (torch.as_tensor(a, dtype=torch.float32) for a in generate_dataset(settings, args.data_dir).split(0.2))
    torch.manual_seed(args.seed)
    generator, target = realnvp_generator(system, train, args.blocks, args.hidden)
    schedule = ThreeStageSchedule()
    trainer = ProgressiveKLTrainer(generator, torch.optim.Adam(generator.parameters(), lr=5e-4), schedule=schedule,
                                   iters_per_epoch=args.iters_per_epoch, above_cut=args.above_cut,
                                   adaptive_quantile=args.adaptive_quantile, on_stall=args.on_stall)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        history = trainer.train(n_epochs=args.epochs, data=train, batchsize=args.batch, w_likelihood=0.9, w_energy=0.1)
    print(f"{args.epochs} epochs x {args.iters_per_epoch} iterations x {args.batch} samples, RealNVP {args.blocks} x "
          f"{args.hidden}, above_cut={args.above_cut!r}, adaptive_quantile={args.adaptive_quantile}, "
          f"on_stall={args.on_stall!r}: {time.perf_counter() - start:.0f} s, torch threads {torch.get_num_threads()}")
    actions = [a for r in history for a in r["actions"]]
    print(f"stall remedies: {len(actions)}" + (f" (first: {actions[0]}; last: {actions[-1]})" if actions else ""))
    report(history, schedule, args.window)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{k: v for k, v in r.items() if k not in ("alerts", "actions")} for r in history], fh)
    target.bridge.close()
    return history


if __name__ == "__main__":
    main()
