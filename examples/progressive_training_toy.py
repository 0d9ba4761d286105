"""ProgressiveKLTrainer on a toy target: the stall, the fix, and the automatic remedy.

The target is a steep well whose energy explodes away from its mode
(:mod:`bgflow_gate.systems.toy`): an untrained generator starts at ~2e8 kJ/mol, like an
untrained molecular flow. Four runs (and a fifth below; all five took 28 s on a 2-core
machine busy with other jobs):

1. ``legacy + batch``: the old linear schedule (1e7 -> 1e4 kJ/mol) with the rule "any
   gated sample skips the batch", reverse KL only. Every batch is skipped, nothing is
   learned, and the health monitor says so.
2. ``legacy + step``: the same schedule in mixed NLL + KL training with the original
   semantics (a gated sample skips the whole step, NLL included): still nothing learned.
3. ``legacy + drop``: mixed training with the default policy: gated samples leave the KL
   term, the NLL step goes on, and the KL term comes back once the model has improved.
4. ``three-stage + drop``: the default schedule, mixed training: trains with hardly any
   skipped batch.

A fifth run shows ``on_stall="relax"`` rescuing run 1 without a restart.

Run::

    python examples/progressive_training_toy.py [--epochs 40]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from bgflow_gate import LinearSchedule, ProgressiveKLTrainer, ThreeStageSchedule, TrainingHealthWarning
from bgflow_gate.systems.toy import steep_well_generator
from bgflow_gate.targets import generator_target


def run(name: str, schedule, epochs: int, mixed: bool, **kwargs) -> list[dict]:
    torch.manual_seed(0)
    generator = steep_well_generator()
    data = generator_target(generator).sample(2560, generator=torch.Generator().manual_seed(1))
    trainer = ProgressiveKLTrainer(
        generator, torch.optim.Adam(generator.parameters(), lr=0.05), train_likelihood=mixed,
        schedule=schedule, target_unit="kJ/mol", iters_per_epoch=10, **kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingHealthWarning)
        history = trainer.train(n_epochs=epochs, data=data if mixed else None, batchsize=256, w_energy=0.1)
    last = history[-1]
    skipped = sum(r["batches_skipped"] for r in history)
    batches = sum(r["batches"] for r in history)
    print(f"\n== {name}: KL batches skipped {skipped}/{batches}; last epoch: E_max {last['e_max']:.3g} kJ/mol, "
          f"median raw energy {last['energy_p50']:.3g} kJ/mol, NLL {last['nll']:.3g}")
    for step in range(0, epochs, max(1, epochs // 5)):
        print("   " + trainer.summary_line(history[step]).split("  !")[0])
    for w in caught:
        print(f"   monitor: {w.message}")
    for action in (a for r in history for a in r["actions"]):
        print(f"   remedy:  {action}")
    return history


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    legacy = LinearSchedule(1e7, 1e4, epochs=10)
    fast = ThreeStageSchedule(1e10, 1e5, hold_epochs=5, warmup_epochs=30)
    return {
        "legacy + batch": run("legacy + batch (reverse KL)", legacy, args.epochs, mixed=False, skip_policy="batch"),
        "legacy + step": run("legacy + step (mixed)", legacy, args.epochs, mixed=True, skip_policy="step"),
        "legacy + drop": run("legacy + drop (mixed)", legacy, args.epochs, mixed=True),
        "three-stage + drop": run("three-stage + drop (mixed)", fast, args.epochs, mixed=True),
        "relax": run(
            "legacy + drop, on_stall='relax' (reverse KL)", legacy, args.epochs, mixed=False,
            on_stall="relax", monitor={"stall_epochs": 3}, relax_factor=100.0,
        ),
    }


if __name__ == "__main__":
    main()
