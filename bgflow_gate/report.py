"""The plots of a ``bgflow-gate train`` run, drawn from the files in its run directory.

``draw_plots(run_dir)`` reads ``evaluation.npz``, ``history_<stage>.csv`` and
``summary.json`` and writes three PNG files into ``run_dir/plots``:

* ``ramachandran.png``: phi/psi densities of the MD test data and of the samples of the
  NLL model, the NLL-only control and the mixed model, with the fraction of each basin;
* ``energies.png``: energy histograms of the same four, with E_cut marked;
* ``training.png``: per epoch, E_max (effective and scheduled), the KL skip rate, raw-energy
  quantiles of the gated samples and the losses of all three training stages.

Needs matplotlib (``pip install bgflow-gate[plots]``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["draw_plots", "read_history", "PLOT_FILES", "format_summary"]

#: The files :func:`draw_plots` writes into ``plots/``.
PLOT_FILES = ("ramachandran.png", "energies.png", "training.png")

_MODELS = (("md", "MD (test data)"), ("nll", "NLL model"), ("control", "NLL-only control"), ("mixed", "mixed (gated)"))
_COLORS = {"md": "black", "nll": "tab:blue", "control": "tab:orange", "mixed": "tab:green"}


def read_history(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """A CSV epoch history as columns of floats (empty cells are NaN; text columns skipped)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else []:
        try:
            columns[key] = np.array([float(r[key]) if r[key] not in ("", None) else math.nan for r in rows])
        except ValueError:
            continue
    return columns


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plots need matplotlib: pip install 'bgflow-gate[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: Optional[str] = None) -> None:
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ramachandran(plt, ev, summary, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.3), sharex=True, sharey=True)
    edges = np.linspace(-180, 180, 61)
    metrics = summary["metrics"]
    for ax, (key, label) in zip(axes, _MODELS):
        phi, psi = np.degrees(ev[f"{key}_phi"]), np.degrees(ev[f"{key}_psi"])
        h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], density=True)
        with np.errstate(divide="ignore"):
            free = -np.log(h.T)
        ax.pcolormesh(edges, edges, free - np.nanmin(free[np.isfinite(free)]), cmap="viridis_r", vmin=0, vmax=8)
        basins = metrics[key]["basins"]
        text = "\n".join(f"{name.split(' ')[0]}: {100 * v:.1f} %" for name, v in basins.items())
        if key != "md":
            text += f"\nKL to MD: {metrics[key]['phi_psi_kl']:.2f}"
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=8, color="white",
                bbox=dict(facecolor="black", alpha=0.5, lw=0))
        ax.set_title(f"{label} ({len(phi)} samples)")
        ax.set_xlabel("phi [deg]")
        ax.axvline(0, color="white", lw=0.5, ls="--")
    axes[0].set_ylabel("psi [deg]")
    _save(plt, fig, path, f"{summary['experiment']}: phi/psi free energy (kT, 0 = most populated cell)")


def _energies(plt, ev, summary, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    e_cut = summary["e_cut_kjmol"]
    md = ev["md_energy"]
    finite = [ev[f"{k}_energy"][np.isfinite(ev[f"{k}_energy"])] for k, _ in _MODELS[1:]]
    low = float(np.min(md)) - 20
    high = float(max(e_cut * 1.5, np.percentile(np.concatenate([md, *finite]), 99)))
    bins = np.linspace(low, high, 120)
    for key, label in _MODELS:
        e = ev[f"{key}_energy"]
        if key == "md":
            ax.hist(e, bins=bins, density=True, histtype="step", color=_COLORS[key], lw=2, label=label)
            continue
        m = summary["metrics"][key]
        ax.hist(np.clip(e[np.isfinite(e)], low, high), bins=bins, density=True, histtype="step", color=_COLORS[key],
                label=f"{label}: {100 * m['below_e_cut']:.1f} % below E_cut, ESS {m['ess_percent']:.2g} %")
    ax.axvline(e_cut, color="red", ls="--", label=f"E_cut = {e_cut:g} kJ/mol")
    ax.set_xlabel("potential energy [kJ/mol] (larger values in the last bin)")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"{summary['experiment']}: energies of generator samples vs MD at {summary['temperature_k']:g} K")
    _save(plt, fig, path)


def _training(plt, histories, summary, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    mixed = histories.get("mixed", {})
    ax = axes[0, 0]
    if mixed:
        ax.plot(mixed["epoch"], mixed["e_max"], label="E_max (effective)", color="tab:red")
        ax.plot(mixed["epoch"], mixed["scheduled_e_max"], ls="--", label="E_max (schedule)", color="gray")
        ax.axhline(summary["e_cut_kjmol"], color="tab:purple", ls=":", label="E_cut")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("mixed stage: gate thresholds [kJ/mol]")
    ax.set_xlabel("epoch of the mixed stage")
    ax = axes[0, 1]
    if mixed:
        ax.plot(mixed["epoch"], 100 * mixed["skip_rate"], color="tab:red", label="KL batches skipped")
        ax.plot(mixed["epoch"], 100 * mixed["samples_gated"] / np.maximum(mixed["samples"], 1),
                color="tab:gray", label="samples gated")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
    ax.set_title("mixed stage: skip rate [%]")
    ax.set_xlabel("epoch of the mixed stage")
    ax = axes[1, 0]
    if mixed:
        for key, style in (("energy_p50", "-"), ("energy_p90", "--"), ("energy_max", ":")):
            if key in mixed:
                ax.plot(mixed["epoch"], np.abs(mixed[key]), ls=style, color="tab:green", label=f"|{key[7:]}|")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("mixed stage: raw energy of generated samples [kJ/mol]")
    ax.set_xlabel("epoch of the mixed stage")
    ax = axes[1, 1]
    offset = 0
    nll = histories.get("nll", {})
    if nll:
        ax.plot(nll["epoch"], nll["nll"], color=_COLORS["nll"], label="NLL stage: NLL")
        offset = len(nll["epoch"])
    for stage in ("control", "mixed"):
        h = histories.get(stage, {})
        if h:
            ax.plot(offset + h["epoch"], h["nll"], color=_COLORS[stage], label=f"{stage}: NLL")
    if mixed and np.isfinite(mixed["kll"]).any():
        twin = ax.twinx()
        twin.plot(offset + mixed["epoch"], mixed["kll"], color=_COLORS["mixed"], ls=":", label="mixed: KL loss")
        twin.set_ylabel("KL loss [kT]")
        twin.legend(fontsize=8, loc="upper center")
    ax.set_title("losses")
    ax.set_xlabel("epoch (NLL stage, then its continuations)")
    ax.set_ylabel("NLL")
    ax.legend(fontsize=8)
    _save(plt, fig, path, f"{summary['experiment']}: training")


def draw_plots(run_dir: Union[str, Path]) -> list[Path]:
    """(Re-)draw the plots of the run in ``run_dir``; returns the files written."""
    root = Path(run_dir)
    summary_path, ev_path = root / "summary.json", root / "evaluation.npz"
    for path in (summary_path, ev_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {root} is not a finished run of 'bgflow-gate train'")
    plt = _pyplot()
    summary = json.loads(summary_path.read_text())
    histories = {}
    for stage in ("nll", "control", "mixed"):
        path = root / f"history_{stage}.csv"
        if path.is_file():
            histories[stage] = read_history(path)
    out = root / "plots"
    out.mkdir(exist_ok=True)
    with np.load(ev_path) as ev:
        ev = dict(ev)
    paths = [out / name for name in PLOT_FILES]
    _ramachandran(plt, ev, summary, paths[0])
    _energies(plt, ev, summary, paths[1])
    _training(plt, histories, summary, paths[2])
    return paths


def format_summary(summary: dict) -> str:
    """The metrics of a run's summary as a small table."""
    lines = [
        f"{'model':<10} {'below E_cut':>12} {'phi/psi KL':>11} {'ESS %':>9} {'median E':>11} {'dF(phi>0-phi<0)':>16}"
    ]
    for key, m in summary["metrics"].items():
        if key == "md":
            continue
        df = m["delta_f_phi_kjmol"]
        lines.append(
            f"{key:<10} {100 * m['below_e_cut']:>11.1f}% {m['phi_psi_kl']:>11.3f} {m['ess_percent']:>9.3g} "
            f"{m['energy_median_kjmol']:>11.4g} {('%.2f' % df) if df is not None else 'n/a':>16}"
        )
    md_df = summary["metrics"]["md"]["delta_f_phi_kjmol"]
    lines.append(f"{'MD':<10} {'':>12} {'':>11} {'':>9} {'':>11} {('%.2f' % md_df) if md_df is not None else 'n/a':>16}")
    c = summary["mixed_vs_control"]
    lines.append(
        f"mixed vs control: below E_cut {100 * c['below_e_cut_gain']:+.2f} points "
        f"(+- {100 * c['below_e_cut_gain_standard_error']:.2f}), ESS {c['ess_percent_gain']:+.3g} points, "
        f"KL {c['phi_psi_kl_change']:+.3f} -> {'the mixed stage helped' if c['mixed_helps'] else 'the mixed stage did NOT help'}"
    )
    lines.append("wall time [s]: " + ", ".join(
        f"{k} {v:.0f}" for k, v in summary["wall_seconds"].items() if v is not None))
    return "\n".join(lines)
