"""The levers of ``aa_vacuum_is``, one at a time: each variant changes one thing of the
shipped experiment, trains it through the pipeline and prints what its models reach.

A variant is the experiment ``aa_vacuum_is`` of the shipped experiments file with the
overrides in :data:`VARIANTS` (section -> key -> value; ``data: aa_300_450_cpu`` takes that
experiment's whole data section). Each run writes its own run directory under ``--out``
(``--resume`` continues a killed one); ``--table`` prints the table of every finished run there.

Run::

    python examples/ess_ablation.py --variant less_data [--out runs/ablation] [--resume]
    python examples/ess_ablation.py --table [--out runs/ablation]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from bgflow_gate.config import DEFAULT_CONFIG, load_experiments, run_settings
from bgflow_gate.systems.analysis import ess_percent_blocks
from bgflow_gate.pipeline import train_experiment

BASE = "aa_vacuum_is"

#: What each variant changes, and why it is a lever.
VARIANTS = {
    "baseline": {},  # as shipped: reverse KL and NLL weighted 0.5 each in the mixed stage
    "seed_1": {"training": {"seed": 1}},
    "kl_weight_0.9": {"training": {"w_likelihood": 0.1, "w_energy": 0.9}},
    "kl_weight_0.9_no_rollback": {"training": {"w_likelihood": 0.1, "w_energy": 0.9, "rollback_tolerance": None}},
    "kl_weight_0.9_seed_1": {"training": {"w_likelihood": 0.1, "w_energy": 0.9, "seed": 1}},
    "kl_weight_0.9_mixed_lr_low": {"training": {"w_likelihood": 0.1, "w_energy": 0.9, "mixed_lr": 5e-5}},
    "kl_weight_0.9_rest_splines": {"training": {"w_likelihood": 0.1, "w_energy": 0.9},
                                   "model": {"rest_spline_bins": 8}},  # splines after the affine couplings
    # 4x the batch at the same number of iterations: what a GPU affords at about the same wall
    # time (an iteration there is bound by kernel launches, not by the batch)
    "batch_2048": {"training": {"batch_size": 2048}},
    "mixed_240": {"training": {"mixed_epochs": 240}},  # the gated stage 3x as long (the control too)
    "more_data": {"data": {"n_iterations": 80000}},  # 80,000 frames (8 ns per replica) instead of 40,000
    # 8,000 frames of 6 replicas 300-700 K (2 ns) instead of 40,000 (4 ns); no rollback
    "kl_weight_0.9_less_data": {"data": "aa_300_450_cpu",
                                "training": {"w_likelihood": 0.1, "w_energy": 0.9, "rollback_tolerance": None}},
}


def variant_settings(name: str, config: str | Path = DEFAULT_CONFIG) -> dict:
    """The run settings of variant ``name``."""
    experiments = load_experiments(config)
    experiment = copy.deepcopy(experiments[BASE])
    for section, change in VARIANTS[name].items():
        if isinstance(change, str):  # another experiment's whole section
            experiment[section] = copy.deepcopy(experiments[change][section])
        else:
            experiment[section] = {**experiment.get(section, {}), **change}
    experiments[f"{BASE}.{name}"] = experiment
    return run_settings(experiments, f"{BASE}.{name}")


def row(name: str, run: Path) -> str:
    """One table row per model of a finished run: ESS with its interval and the ESS of each fifth
    of the samples, dF(phi), energy W1, time."""
    summary = json.loads((run / "summary.json").read_text())
    evaluation, lines = np.load(run / "evaluation.npz"), []
    for stage, m in summary["metrics"].items():
        if stage == "md":
            continue
        lo, hi = m["ess_percent_ci95"]
        df = m.get("delta_f_phi_kjmol")
        df_text = "n/a" if df is None else f"{df:.1f} ± {m.get('delta_f_phi_se_kjmol') or float('nan'):.1f}"
        w1 = m.get("energy_wasserstein_kjmol")
        w1_text = "n/a" if w1 is None else f"{w1:.2f}"
        seconds = summary["stages"].get(stage, {}).get("seconds", float("nan"))
        blocks = ess_percent_blocks(evaluation[f"{stage}_logw"])  # also for runs evaluated before the blocks
        blocks_text = f"{min(blocks):.1f}–{max(blocks):.1f}"
        lines.append(f"| {name} | {stage} | {m['ess_percent']:.1f} ({lo:.1f}–{hi:.1f}) | {blocks_text} | {df_text} | {w1_text} | "
                     f"{m['phi_psi_kl']:.3f} | {seconds / 60:.1f} |")
    return "\n".join(lines)


def table(out: Path) -> str:
    head = ("| variant | model | ESS % (95 % interval) | ESS % of each fifth | ΔF(φ>0 − φ<0) kJ/mol ± se "
            "| energy W1 to MD kJ/mol | φ/ψ KL | stage minutes |\n|---|---|---|---|---|---|---|---|")
    rows = [row(name, out / name) for name in VARIANTS if (out / name / "summary.json").is_file()]
    return "\n".join([head, *rows])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS))
    p.add_argument("--out", default="runs/ablation", help="one run directory per variant below it")
    p.add_argument("--resume", action="store_true", help="continue the variant's killed run")
    p.add_argument("--table", action="store_true", help="print the table of the finished variants")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.variant:
        train_experiment(variant_settings(args.variant), out / args.variant, resume=args.resume, progress=False,
                         log=lambda line: print(line, flush=True))
    if args.table or not args.variant:
        print(table(out))


if __name__ == "__main__":
    main()
