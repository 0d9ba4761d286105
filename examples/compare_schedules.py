"""The seed's story on alanine dipeptide: the gate that stalls, and the schedule that does not.

The same generator (bgflow's RealNVP recipe on internal coordinates), from the same untrained
weights — its first samples sit at 1e8-1e15 kJ/mol —, trained by mixed NLL + KL from
scratch in four ways:

* ``no gate``: bgflow's plain ``KLTrainer``;
* ``legacy + step``: the linear schedule 1e7 -> 1e4 kJ/mol over 100 epochs, any gated sample
  skipping the whole step (the seed's failing policy);
* ``three-stage, +entropy``: the default schedule (1e10 -> 1e5 kJ/mol, hold 50, warm-up to
  300 epochs) with the ``drop`` policy, samples above E_cut keeping their -log|det J| term
  (``above_cut="energy+entropy"``, the behaviour before 0.2);
* ``three-stage``: the defaults: the same, samples above E_cut contributing their soft-cut
  energy only (``above_cut="energy"``);
* ``adaptive``: the defaults with ``adaptive_quantile=0.9``.

It plots the skip rate, the NLL and the median raw energy per epoch side by side
(``compare_schedules.png``) and prints the numbers the story turns on.

``--story physical`` tells the other story: the physically initialised flow
(:func:`bgflow_gate.systems.physical.physical_generator`, no MD data) trained by gated
reverse KL alone through ``ProgressiveKLTrainer``; MD frames only evaluate it. It prints
the fraction below E_cut, the basins, the phi/psi KL and the ESS, and plots the median raw
energy and the skip rate per epoch (``--out``).

Run::

    python examples/compare_schedules.py [--epochs 320] [--iters-per-epoch 5] [--out compare_schedules.png]
        [--runs "legacy + step" three-stage] [--json runs.json]
    python examples/compare_schedules.py --story physical [--epochs 400] [--iters-per-epoch 3] [--batch 256]
        [--lr 2e-4] [--eval-samples 20000]
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings

import numpy as np
import torch

from bgflow_gate import ProgressiveKLTrainer, ThreeStageSchedule, LinearSchedule, TrainingHealthWarning, bg
from bgflow_gate.systems.alanine import alanine_dipeptide, realnvp_generator
from bgflow_gate.systems.data import ReplicaExchangeSettings, generate_dataset
from bgflow_gate.units import kt_in_kjmol

TEMPERATURE = 300.0


def plain_run(generator, target, data, args) -> list[dict]:
    """bgflow's KLTrainer, recorded per epoch: mean losses, and the median energy of 256 samples."""
    trainer = bg.KLTrainer(generator, torch.optim.Adam(generator.parameters(), lr=args.lr))
    kt = kt_in_kjmol(TEMPERATURE)
    history = []
    for epoch in range(args.epochs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(args.iters_per_epoch, data=data, batchsize=args.batch, w_likelihood=0.9, w_energy=0.1)
        recent = trainer.reporter.recent(args.iters_per_epoch)
        with torch.no_grad():
            x = generator.sample(256)
            energy = target.energy(x).view(-1) * kt
        history.append({
            "epoch": epoch, "skip_rate": 0.0,
            "nll": float(np.nanmean(recent[1])), "kll": float(np.nanmean(recent[0])),
            "energy_p50": float(energy.nan_to_num(math.inf).median()),
        })
    return history


#: The runs: ``None`` is bgflow's plain KLTrainer, otherwise the ProgressiveKLTrainer's arguments.
RUNS = {
    "no gate": None,
    "legacy + step": dict(schedule=LinearSchedule(), skip_policy="step"),
    "three-stage, +entropy": dict(schedule=ThreeStageSchedule(), above_cut="energy+entropy"),
    "three-stage": dict(schedule=ThreeStageSchedule()),
    "adaptive": dict(schedule=ThreeStageSchedule(), adaptive_quantile=0.9),
}


def gated_run(generator, data, args, **kwargs) -> list[dict]:
    trainer = ProgressiveKLTrainer(
        generator, torch.optim.Adam(generator.parameters(), lr=args.lr), iters_per_epoch=args.iters_per_epoch,
        e_cut=500.0, **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        return trainer.train(n_epochs=args.epochs, data=data, batchsize=args.batch, w_likelihood=0.9, w_energy=0.1)


def plot(runs: dict, path: str, title: str = "alanine dipeptide, mixed NLL + KL from untrained weights") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, history in runs.items():
        epochs = [r["epoch"] for r in history]
        axes[0].plot(epochs, [100 * r["skip_rate"] for r in history], label=name)
        loss = "nll" if any(math.isfinite(r["nll"]) for r in history) else "kll"
        axes[1].plot(epochs, [r[loss] for r in history], label=name)
        axes[2].plot(epochs, [r["energy_p50"] for r in history], label=name)
    axes[0].set(title="KL batches skipped per epoch", xlabel="epoch", ylabel="%")
    axes[1].set(title=f"{loss.upper()} (applied batches)", xlabel="epoch", ylabel=loss.upper())
    axes[2].set(title="median raw energy of generator samples", xlabel="epoch", ylabel="kJ/mol", yscale="symlog")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def physical_story(args) -> dict:
    """The physical flow trained by gated reverse KL alone; the metrics of its samples against MD."""
    from bgflow_gate.systems.analysis import sample_metrics
    from bgflow_gate.systems.physical import physical_generator

    system = alanine_dipeptide("vacuum")
    target = system.energy(TEMPERATURE, platform_name="Reference")
    torch.manual_seed(args.seed)
    generator = physical_generator(system, target)
    reference = torch.as_tensor(_dataset(args).positions, dtype=torch.float64)
    trainer = ProgressiveKLTrainer(generator, torch.optim.Adam(generator.parameters(), lr=args.lr),
                                   train_likelihood=False, iters_per_epoch=args.iters_per_epoch, max_grad_norm=10.0)
    n_iter = args.epochs * args.iters_per_epoch
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optim, n_iter, eta_min=0.1 * args.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        history = trainer.train(n_epochs=args.epochs, batchsize=args.batch, schedulers=[(1, cosine)])
    kt = kt_in_kjmol(TEMPERATURE)
    with torch.no_grad():
        x, logw = generator.sample(args.eval_samples, with_log_weights=True)
        energies = target.energy(x.double()).view(-1).numpy() * kt
    metrics = sample_metrics(x.double(), energies, logw.view(-1).double().numpy(), reference, kt=kt, e_cut=500.0)
    target.bridge.close()
    return {"history": history, "metrics": metrics}


def _dataset(args):
    """The replica-exchange frames both stories use (from the cache after the first call)."""
    settings = ReplicaExchangeSettings(
        n_iterations=args.frames, steps_per_iteration=250, equilibration_iterations=40, platform="Reference"
    )
    return generate_dataset(settings, args.data_dir)


def print_physical(result: dict) -> None:
    m, h = result["metrics"], result["history"]
    skip = [r["skip_rate"] for r in h]
    print(f"median raw energy, epoch 0 -> {h[len(h) // 2]['epoch']} -> {h[-1]['epoch']}: "
          f"{h[0]['energy_p50']:.3g} -> {h[len(h) // 2]['energy_p50']:.3g} -> {h[-1]['energy_p50']:.3g} kJ/mol; "
          f"KL batches skipped {100 * np.mean(skip):.1f} %, epochs fully skipped {sum(s == 1.0 for s in skip)}")
    print(f"{m['samples']} samples: {100 * m['below_e_cut']:.2f} % below E_cut, basins {m['basins']}, "
          f"reweighted {m['basins_reweighted']}, phi/psi KL {m['phi_psi_kl']:.3f}, "
          f"ESS {m['ess_percent']:.2f} % ({m['effective_samples']:.0f} samples)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=320)
    parser.add_argument("--iters-per-epoch", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--frames", type=int, default=4000)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="compare_schedules.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (default: all)")
    parser.add_argument("--json", default=None, help="also write the histories here")
    parser.add_argument("--story", choices=("scratch", "physical"), default="scratch")
    parser.add_argument("--eval-samples", type=int, default=20000)
    args = parser.parse_args(argv)
    if args.story == "physical":
        result = physical_story(args)
        print_physical(result)
        plot({"physical flow": result["history"]}, args.out,
             title="alanine dipeptide, gated reverse KL alone from the physically initialised flow (no data)")
        return result

    system = alanine_dipeptide("vacuum")
    train, _ = (torch.as_tensor(a, dtype=torch.float32) for a in _dataset(args).split(0.2))
    torch.manual_seed(args.seed)
    generator, target = realnvp_generator(system, train, args.blocks, args.hidden, TEMPERATURE)
    initial = copy.deepcopy(generator.state_dict())

    def fresh():
        generator.load_state_dict(initial)  # the trainers leave the generator's target as it is
        torch.manual_seed(args.seed + 1)
        return generator

    runs = {}
    for name in args.runs:
        kwargs = RUNS[name]
        runs[name] = plain_run(fresh(), target, train, args) if kwargs is None else gated_run(fresh(), train, args, **kwargs)
        print(f"{name}: done", flush=True)
    plot(runs, args.out)
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump({k: [{f: r[f] for f in ("epoch", "skip_rate", "nll", "energy_p50")} for r in v]
                       for k, v in runs.items()}, fh)

    def first_full_stall(history):
        for i in range(len(history)):
            if all(r["skip_rate"] == 1.0 for r in history[i:]):
                return history[i]["epoch"]
        return None

    print(f"{'run':<22} {'first epoch of a stall to the end':>34} {'skip after epoch 50':>20} "
          f"{'NLL, last epoch':>16} {'E_p50 epoch 0':>14} {'E_p50, last epoch':>18}")
    for name, history in runs.items():
        late = [r["skip_rate"] for r in history if r["epoch"] >= 50]
        stall = first_full_stall(history)
        print(f"{name:<22} {str(stall) if stall is not None else '-':>34} "
              f"{(100 * np.mean(late)) if late else math.nan:>19.1f}% {history[-1]['nll']:>16.3g} "
              f"{history[0]['energy_p50']:>14.3g} {history[-1]['energy_p50']:>18.3g}")
    print(f"plots: {args.out}")
    if hasattr(target.bridge, "close"):
        target.bridge.close()
    return runs


if __name__ == "__main__":
    main()
