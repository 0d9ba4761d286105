"""The long reference for alanine dipeptide in vacuum at 300 K: ΔF(phi > 0 - phi < 0), basin
populations and the energy distribution from independent replica-exchange runs.

Each run is a :class:`~bgflow_gate.systems.data.ReplicaExchangeSettings` dataset (the frames of
the 300 K replica), loaded from the data cache or, if it is missing there, generated with
:func:`~bgflow_gate.systems.data.generate_dataset` and stored (``--only-cached`` skips missing
runs instead). The defaults are four runs, seeds 11-14, of 4 replicas on 300-500 K, 20,000
exchange iterations of 250 steps of 1 fs after 200 of equilibration: 5.05 ns per replica per
run, 20 ns per replica in all.

Per run: ΔF = -kT ln(P(phi >= 0) / P(phi < 0)) in kJ/mol with the error bar of its time
correlation (the statistical inefficiency g of the indicator series phi >= 0: standard error
kT / sqrt(p (1 - p) N / g)), basin populations, energy mean and percentiles. Combined: ΔF of
all frames pooled; the mean of the runs' ΔF with the standard error of the mean over runs
(the spread between independent runs: no model of the correlation needed) and its Student-t
95 % interval; and the runs' statistical-inefficiency errors combined (inverse variance). A
model's reweighted ΔF (``summary.json``: ``delta_f_phi_kjmol``) and its energy histogram
(``plots/energies.png``) are compared with these numbers.

Run::

    python examples/reference_free_energy.py [--data-dir DIR] [--seeds 11 12 13 14]
        [--only-cached] [--json reference.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bgflow_gate.systems.alanine import phi_psi
from bgflow_gate.systems.analysis import basin_fractions, delta_f_time_series_error
from bgflow_gate.systems.data import ReplicaExchangeSettings, default_data_dir, generate_dataset
from bgflow_gate.units import kt_in_kjmol

#: Energy percentiles reported (the 99.9th is the one ``beyond_md_energy_p999`` counts against).
PERCENTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)


def energy_summary(energies: np.ndarray) -> dict:
    """Mean, standard deviation and :data:`PERCENTILES` (keys ``"0.1"`` ... ``"99.9"``) of the
    finite energies, in kJ/mol."""
    e = np.asarray(energies, dtype=float)
    e = e[np.isfinite(e)]
    return {
        "mean_kjmol": float(e.mean()),
        "std_kjmol": float(e.std()),
        "percentiles_kjmol": {f"{q:g}": float(v) for q, v in zip(PERCENTILES, np.percentile(e, PERCENTILES))},
    }


def run_estimates(phi: np.ndarray, psi: np.ndarray, energies: np.ndarray, kt: float) -> dict:
    """The estimates of one run from its frames in time order.

    Parameters
    ----------
    phi, psi : numpy.ndarray
        Backbone angles (radians) of the frames.
    energies : numpy.ndarray
        Their potential energies in kJ/mol.
    kt : float
        kT in kJ/mol.

    Returns
    -------
    dict
        ``frames``, ``delta_f_kjmol`` with ``delta_f_se_kjmol`` and ``delta_f_ci95_kjmol`` (time
        correlation counted), ``statistical_inefficiency`` and ``independent_frames`` of the
        phi-sign series, ``basins``, ``energy`` (:func:`energy_summary`).
    """
    err = delta_f_time_series_error(phi, kt)
    return {
        "frames": int(len(phi)),
        "delta_f_kjmol": err["delta_f"],
        "delta_f_se_kjmol": err["standard_error"],
        "delta_f_ci95_kjmol": err["ci95"],
        "statistical_inefficiency": err["statistical_inefficiency"],
        "independent_frames": err["independent_frames"],
        "basins": basin_fractions(phi, psi),
        "energy": energy_summary(energies),
    }


def _t95(dof: int) -> float:
    """The 97.5th percentile of Student's t with ``dof`` degrees of freedom (scipy if
    installed, else the normal 1.96)."""
    try:
        from scipy.stats import t
    except ImportError:
        return 1.96
    return float(t.ppf(0.975, dof))


def combine(runs: list[dict], phi: np.ndarray, psi: np.ndarray, energies: np.ndarray, kt: float) -> dict:
    """The estimates of all runs together.

    Parameters
    ----------
    runs : list of dict
        :func:`run_estimates` of each run.
    phi, psi, energies : numpy.ndarray
        All runs' frames, concatenated.
    kt : float
        kT in kJ/mol.

    Returns
    -------
    dict
        ``runs``, ``runs_with_delta_f`` (runs with frames on both sides of phi = 0: only these
        enter the mean and the errors), ``frames``, ``delta_f_kjmol`` (all frames pooled),
        ``delta_f_mean_of_runs_kjmol`` with ``delta_f_sem_between_runs_kjmol`` (standard
        deviation of the runs' ΔF over sqrt(runs)) and ``delta_f_ci95_between_runs_kjmol``
        (Student t; both ``None`` for one run), ``delta_f_se_statistical_inefficiency_kjmol``
        (the runs' errors combined: 1 / sqrt(sum 1 / se^2)), ``basins``, ``energy``.
    """
    values = np.array([r["delta_f_kjmol"] for r in runs if r["delta_f_kjmol"] is not None], dtype=float)
    errors = np.array([r["delta_f_se_kjmol"] for r in runs if r["delta_f_se_kjmol"] is not None], dtype=float)
    sem = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else None
    mean = float(values.mean()) if len(values) else None
    pooled = delta_f_time_series_error(phi, kt)["delta_f"]
    return {
        "runs": len(runs),
        "runs_with_delta_f": len(values),
        "frames": int(len(phi)),
        "delta_f_kjmol": pooled,
        "delta_f_mean_of_runs_kjmol": mean,
        "delta_f_sem_between_runs_kjmol": sem,
        "delta_f_ci95_between_runs_kjmol": (
            [mean - _t95(len(values) - 1) * sem, mean + _t95(len(values) - 1) * sem] if sem is not None else None),
        "delta_f_se_statistical_inefficiency_kjmol": (
            float(1 / math.sqrt(np.sum(errors ** -2.0))) if len(errors) else None),
        "basins": basin_fractions(phi, psi),
        "energy": energy_summary(energies),
    }


def _settings(args: argparse.Namespace, seed: int) -> ReplicaExchangeSettings:
    return ReplicaExchangeSettings(
        solvent="vacuum", t_min=args.t_min, t_max=args.t_max, n_replicas=args.n_replicas,
        n_iterations=args.n_iterations, steps_per_iteration=args.steps_per_iteration,
        equilibration_iterations=args.equilibration_iterations, seed=seed,
    )


def load_runs(args: argparse.Namespace) -> list[tuple[ReplicaExchangeSettings, object]]:
    """``(settings, dataset)`` of each seed: from the cache, generated if missing there (or,
    with ``--only-cached``, skipped with a line saying so)."""
    out = []
    for seed in args.seeds:
        settings = _settings(args, seed)
        path = Path(args.data_dir) / f"alanine_{settings.solvent}_{settings.key}.npz"
        if args.only_cached and not path.is_file():
            print(f"seed {seed}: {path} is not there yet, skipped")
            continue
        out.append((settings, generate_dataset(settings, args.data_dir, progress=not args.quiet)))
    return out


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _format(runs: list[dict], seeds: list[int], combined: dict) -> list[str]:
    basin_names = list(combined["basins"])
    lines = [f"{'seed':>6} {'frames':>7} {'dF [kJ/mol]':>12} {'+- se (g)':>10} {'g':>6} "
             + " ".join(f"{n.split(' ')[0]:>12}" for n in basin_names) + f" {'E mean':>9}"]
    for seed, r in zip(seeds, runs):
        df, se = r["delta_f_kjmol"], r["delta_f_se_kjmol"]
        lines.append(f"{seed:>6} {r['frames']:>7} {_number(df, '.3f'):>12} {_number(se, '.3f'):>10} "
                     f"{r['statistical_inefficiency']:>6.1f} "
                     + " ".join(f"{100 * r['basins'][n]:>11.2f}%" for n in basin_names)
                     + f" {r['energy']['mean_kjmol']:>9.2f}")
    c, sem = combined, combined["delta_f_sem_between_runs_kjmol"]
    lines.append(f"combined ({c['runs']} runs, {c['frames']} frames): dF(phi>0 - phi<0) = "
                 f"{_number(c['delta_f_kjmol'], '.3f')} kJ/mol (pooled frames); {c['runs_with_delta_f']} of {c['runs']} "
                 "runs have frames on both sides of phi = 0 (only these enter the mean and the errors)")
    if sem is not None:
        lo, hi = c["delta_f_ci95_between_runs_kjmol"]
        lines.append(f"  mean of runs {c['delta_f_mean_of_runs_kjmol']:.3f} +- {sem:.3f} kJ/mol (standard error of the "
                     f"mean over runs; Student-t 95 % interval {lo:.3f} .. {hi:.3f})")
    lines.append(f"  +- {_number(c['delta_f_se_statistical_inefficiency_kjmol'], '.3f')} kJ/mol (statistical "
                 "inefficiency, runs combined by inverse variance)")
    lines.append("basins: " + ", ".join(f"{n} {100 * v:.2f} %" for n, v in c["basins"].items()))
    e = c["energy"]
    lines.append(f"energy: mean {e['mean_kjmol']:.2f} kJ/mol, std {e['std_kjmol']:.2f}; percentiles "
                 + ", ".join(f"{q}: {v:.2f}" for q, v in e["percentiles_kjmol"].items()))
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(default_data_dir()), help="the data cache (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14], help="one independent run each")
    p.add_argument("--t-min", type=float, default=300.0, help="the temperature of the frames [K]")
    p.add_argument("--t-max", type=float, default=500.0)
    p.add_argument("--n-replicas", type=int, default=4)
    p.add_argument("--n-iterations", type=int, default=20000, help="frames per run")
    p.add_argument("--steps-per-iteration", type=int, default=250)
    p.add_argument("--equilibration-iterations", type=int, default=200)
    p.add_argument("--only-cached", action="store_true", help="skip runs that are not in the cache")
    p.add_argument("--quiet", action="store_true", help="no progress line while generating")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    logging.getLogger("pymbar").setLevel(logging.ERROR)  # openmmtools' pymbar banners
    kt = kt_in_kjmol(args.t_min)
    loaded = load_runs(args)
    if not loaded:
        raise SystemExit("no run to analyse (all missing from the cache and --only-cached given)")
    runs, frames = [], []
    for settings, dataset in loaded:
        phi, psi = (a.numpy() for a in phi_psi(torch.as_tensor(dataset.positions, dtype=torch.float64)))
        runs.append({"seed": settings.seed, "path": str(dataset.path),
                     "acceptance": [float(a) for a in dataset.acceptance],
                     **run_estimates(phi, psi, dataset.energies, kt)})
        frames.append((phi, psi, np.asarray(dataset.energies, dtype=float)))
    phi, psi, energies = (np.concatenate(a) for a in zip(*frames))
    combined = combine(runs, phi, psi, energies, kt)
    first = loaded[0][0]
    print(f"alanine dipeptide in vacuum at {args.t_min:g} K (kT {kt:.4f} kJ/mol): {len(runs)} replica-exchange runs of "
          f"{first.n_replicas} replicas on {first.t_min:g}-{first.t_max:g} K, {first.simulated_ns:.2f} ns per replica "
          f"each ({len(runs) * first.simulated_ns:.1f} ns per replica in all)")
    print("\n".join(_format(runs, [s.seed for s, _ in loaded], combined)))
    result = {"kt_kjmol": kt, "settings": {k: v for k, v in asdict(first).items() if k != "seed"},
              "ns_per_replica_per_run": first.simulated_ns, "runs": runs, "combined": combined}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"written: {args.json}")
    return result


if __name__ == "__main__":
    main()
