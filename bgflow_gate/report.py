"""The plots of a ``bgflow-gate train`` run, drawn from the files in its run directory.

``draw_plots(run_dir)`` reads ``evaluation.npz``, ``history_<stage>.csv`` and
``summary.json`` and writes three PNG files into ``run_dir/plots``:

* ``ramachandran.png``: phi/psi free energy (-ln of the histogram density, in kT, with a
  colour bar) of the MD test data and of the samples of every model of the run (NLL model,
  NLL-only control and mixed model; or the kl model of the ``kl_only`` route); the fraction
  of each basin and the KL to MD above each panel;
* ``energies.png``: energy histograms of the same on an axis that is linear up to
  E_cut and logarithmic above it, with E_cut marked;
* ``training.png``: per epoch of the gated stage (mixed, or kl), E_max (effective and
  scheduled), the KL skip rate (axis scaled to the data), the median, 90th percentile and
  maximum raw energy of the generated samples (a maximum that climbs by more than a decade
  is pointed out), and the losses of every training stage.

Needs matplotlib (``pip install bgflow-gate[plots]``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["draw_plots", "read_history", "read_summary", "PLOT_FILES", "format_summary"]

#: The files :func:`draw_plots` writes into ``plots/``.
PLOT_FILES = ("ramachandran.png", "energies.png", "training.png")

_LABELS = {"md": "MD (test data)", "nll": "NLL model", "control": "NLL-only control", "mixed": "mixed (gated)",
           "kl": "reverse KL only (gated)"}
_COLORS = {"md": "black", "nll": "tab:blue", "control": "tab:orange", "mixed": "tab:green", "kl": "tab:red"}
#: The training stages whose history the plots read, and the gated ones among them.
_STAGES = ("nll", "control", "mixed", "kl")
_GATED = ("mixed", "kl")


def _models(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, label)`` of MD and of every model the run evaluated, in the order of its metrics."""
    return [(key, _LABELS.get(key, key)) for key in ["md", *(k for k in summary["metrics"] if k != "md")]]


def read_history(path: str | Path) -> dict[str, np.ndarray]:
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


def _save(plt, fig, path: Path, title: str | None = None) -> None:
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _basin_text(metrics: dict[str, Any], key: str) -> str:
    text = ", ".join(f"{name.split(' ')[0]} {100 * v:.1f} %" for name, v in metrics[key]["basins"].items())
    return text + (f"\nKL to MD {metrics[key]['phi_psi_kl']:.2f}" if key != "md" else "\n")


def _ramachandran(plt, ev, summary, path: Path) -> None:
    models = _models(summary)
    rows = math.ceil(len(models) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 5 * rows), sharex=True, sharey=True, layout="constrained",
                             squeeze=False)
    edges = np.linspace(-180, 180, 61)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, models):
        phi, psi = np.degrees(ev[f"{key}_phi"]), np.degrees(ev[f"{key}_psi"])
        h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], density=True)
        with np.errstate(divide="ignore"):
            free = -np.log(h.T)
        mesh = ax.pcolormesh(edges, edges, free - np.nanmin(free[np.isfinite(free)]), cmap="viridis_r", vmin=0, vmax=8)
        ax.set_title(f"{label}, {len(phi)} samples\n{_basin_text(summary['metrics'], key)}", fontsize=10)
        for x in (-120, 0):
            ax.axvline(x, color="gray", lw=0.5, ls="--")
    for ax in axes[-1]:
        ax.set_xlabel("phi [deg]")
    for ax in axes[:, 0]:
        ax.set_ylabel("psi [deg]")
    fig.colorbar(mesh, ax=axes, label="free energy -ln p [kT] (0: most populated cell; white: no sample)", shrink=0.6)
    fig.suptitle(f"{summary['experiment']}: phi/psi free energy; basins (dashed lines): C5/beta phi < -120, "
                 "C7eq/alphaR -120 <= phi < 0, phi > 0")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _energy_bins(low: float, e_cut: float, high: float) -> np.ndarray:
    """Bin edges linear from ``low`` to ``e_cut`` and logarithmic from there to ``high``."""
    linear = np.linspace(low, e_cut, 60)
    if high <= e_cut * 1.01:
        return linear
    return np.concatenate([linear, np.geomspace(e_cut, high, 40)[1:]])


def _energies(plt, ev, summary, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.8))
    e_cut, md, models = summary["e_cut_kjmol"], ev["md_energy"], _models(summary)
    samples = [ev[f"{k}_energy"] for k, _ in models[1:]]
    finite = np.concatenate([md, *(e[np.isfinite(e)] for e in samples)])
    low, high = float(np.min(md)) - 20, float(max(e_cut * 2, np.max(finite)))
    bins = _energy_bins(low, e_cut, high)
    for (key, label), e in zip(models, [md, *samples]):
        if key == "md":
            ax.hist(e, bins=bins, density=True, histtype="step", color=_COLORS[key], lw=2, label=label)
            continue
        m = summary["metrics"][key]
        ax.hist(np.clip(e[np.isfinite(e)], low, high), bins=bins, density=True, histtype="step", color=_COLORS[key],
                label=f"{label}: {100 * m['below_e_cut']:.1f} % below E_cut, ESS {m['ess_percent']:.2g} % "
                      f"({m['effective_samples']:.0f} effective samples)")
    ax.axvline(e_cut, color="red", ls="--", label=f"E_cut = {e_cut:g} kJ/mol")
    ax.set_xscale("symlog", linthresh=e_cut, linscale=2.0)
    ax.set_xlim(low, high)
    ax.set_xlabel(f"potential energy [kJ/mol] (linear up to E_cut, logarithmic above)")
    ax.set_ylabel("density [1 / (kJ/mol)]")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"{summary['experiment']}: energies of generator samples vs MD at {summary['temperature_k']:g} K")
    _save(plt, fig, path)


def _thresholds_panel(ax, mixed, summary) -> None:
    ax.plot(mixed["epoch"], mixed["e_max"], label="E_max (effective)", color="tab:red")
    ax.plot(mixed["epoch"], mixed["scheduled_e_max"], ls="--", label="E_max (schedule)", color="gray")
    ax.axhline(summary["e_cut_kjmol"], color="tab:purple", ls=":", label="E_cut")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def _skip_panel(ax, mixed) -> None:
    skipped = 100 * mixed["skip_rate"]
    gated = 100 * mixed["samples_gated"] / np.maximum(mixed["samples"], 1)
    ax.plot(mixed["epoch"], skipped, color="tab:red", marker=".", label="KL batches skipped")
    ax.plot(mixed["epoch"], gated, color="tab:gray", marker=".", label="samples gated")
    top = float(np.nanmax(np.concatenate([skipped, gated, [0.0]])))
    ax.set_ylim(0, min(100, max(1.0, 1.2 * top)))
    ax.legend(fontsize=8)


def _raw_energy_panel(ax, mixed) -> None:
    labels = {"energy_p50": ("median", "-"), "energy_p90": ("90th percentile", "--"), "energy_max": ("maximum", ":")}
    for key, (label, style) in labels.items():
        if key in mixed:
            ax.plot(mixed["epoch"], mixed[key], ls=style, color="tab:green", label=label)
    ax.set_yscale("symlog", linthresh=100)
    top = mixed.get("energy_max")
    if top is not None and np.isfinite(top).sum() >= 2:
        first, last = top[np.isfinite(top)][[0, -1]]
        if first > 0 and last > 10 * first:
            ax.annotate(f"maximum rose {first:.2g} -> {last:.2g} kJ/mol:\nsamples above E_max are dropped "
                        "from the KL term", xy=(0.02, 0.97), xycoords="axes fraction", fontsize=8, color="tab:red",
                        va="top")
    ax.legend(fontsize=8, loc="lower right")


def _losses_panel(ax, histories) -> None:
    offset, nll = 0, histories.get("nll", {})
    gated = next((s for s in _GATED if s in histories), None)
    if nll:
        ax.plot(nll["epoch"], nll["nll"], color=_COLORS["nll"], label="NLL stage: NLL")
        offset = len(nll["epoch"])
    for stage in ("control", "mixed"):
        h = histories.get(stage, {})
        if h:
            ax.plot(offset + h["epoch"], h["nll"], color=_COLORS[stage], label=f"{stage}: NLL")
    h = histories.get(gated, {})
    if h and np.isfinite(h["kll"]).any():
        twin = ax.twinx() if histories.get("nll") else ax
        twin.plot(offset + h["epoch"], h["kll"], color=_COLORS[gated], ls=":", label=f"{gated}: KL loss")
        twin.set_ylabel("KL loss [kT]")
        twin.legend(fontsize=8, loc="upper center")
    ax.set_xlabel("epoch (NLL stage, then its continuations)" if nll else "epoch")
    if nll:
        ax.set_ylabel("NLL")
        ax.legend(fontsize=8)


def _training(plt, histories, summary, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    stage = next((s for s in _GATED if s in histories), "mixed")
    gated = histories.get(stage, {})
    panels = (
        (axes[0, 0], _thresholds_panel, (summary,), f"{stage} stage: gate thresholds [kJ/mol]"),
        (axes[0, 1], _skip_panel, (), f"{stage} stage: skipped and gated [%]"),
        (axes[1, 0], _raw_energy_panel, (), f"{stage} stage: raw energy of generated samples [kJ/mol]"),
    )
    for ax, draw, extra, title in panels:
        if gated:
            draw(ax, gated, *extra)
        ax.set_title(title)
        ax.set_xlabel(f"epoch of the {stage} stage")
    _losses_panel(axes[1, 1], histories)
    axes[1, 1].set_title("losses")
    _save(plt, fig, path, f"{summary['experiment']}: training")


def _upgrade(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary written by bgflow-gate 0.1.0 with today's names (``ess`` is
    ``effective_samples``, ``kl_noise_level`` is ``phi_psi_kl_noise``)."""
    from .systems.analysis import RELIABLE_EFFECTIVE_SAMPLES

    for key, m in summary["metrics"].items():
        if key != "md" and "ess" in m:
            m["effective_samples"] = m.pop("ess")
            m.setdefault("reweighting_reliable", m["effective_samples"] >= RELIABLE_EFFECTIVE_SAMPLES)
    comparison = summary.get("mixed_vs_control") or {}
    if "kl_noise_level" in comparison:
        comparison["phi_psi_kl_noise"] = comparison.pop("kl_noise_level")
    return summary


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a run (one written by an earlier version with today's names); a
    ``ValueError`` naming the file when it is not one."""
    path = Path(run_dir) / "summary.json"
    try:
        return _upgrade(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a finished run of 'bgflow-gate train'") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is damaged (not JSON); 'bgflow-gate train --resume' on the run writes it again") from None


def _read_evaluation(path: Path, root: Path) -> dict[str, np.ndarray]:
    """The arrays of ``evaluation.npz``; a ``ValueError`` saying how to redo a damaged one."""
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as ev:
            return dict(ev)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({' '.join(str(err).split())}); delete {root / 'summary.json'} and "
                         f"run 'bgflow-gate train --resume --out {root}' with its experiment to evaluate again") from None


def draw_plots(run_dir: str | Path) -> list[Path]:
    """(Re-)draw the plots of the run in ``run_dir``; returns the files written."""
    root = Path(run_dir)
    ev_path = root / "evaluation.npz"
    if not ev_path.is_file():
        raise FileNotFoundError(f"{ev_path} is missing: {root} is not a finished run of 'bgflow-gate train'")
    summary = read_summary(root)
    plt = _pyplot()
    histories = {}
    for stage in _STAGES:
        path = root / f"history_{stage}.csv"
        if path.is_file():
            histories[stage] = read_history(path)
    out = root / "plots"
    out.mkdir(exist_ok=True)
    ev = _read_evaluation(ev_path, root)
    paths = [out / name for name in PLOT_FILES]
    _ramachandran(plt, ev, summary, paths[0])
    _energies(plt, ev, summary, paths[1])
    _training(plt, histories, summary, paths[2])
    return paths


def _df_cell(m: dict[str, Any]) -> str:
    df = m["delta_f_phi_kjmol"]
    if df is None:
        return "n/a"
    return f"{df:.2f}" + ("" if m.get("reweighting_reliable", True) else "*")


def format_summary(summary: dict) -> str:
    """The metrics of a run's summary as a small table, with what needs saying about them."""
    lines = [f"{'model':<10} {'below E_cut':>12} {'phi/psi KL':>11} {'ESS %':>9} {'eff. samples':>13} "
             f"{'median E':>11} {'dF(phi>0-phi<0)':>16}"]
    models = {k: m for k, m in summary["metrics"].items() if k != "md"}
    for key, m in models.items():
        lines.append(
            f"{key:<10} {100 * m['below_e_cut']:>11.1f}% {m['phi_psi_kl']:>11.3f} {m['ess_percent']:>9.3g} "
            f"{m['effective_samples']:>13.1f} {m['energy_median_kjmol']:>11.4g} {_df_cell(m):>16}"
        )
    md_df = summary["metrics"]["md"]["delta_f_phi_kjmol"]
    lines.append(f"{'MD':<10} {'':>12} {'':>11} {'':>9} {'':>13} {'':>11} "
                 f"{('%.2f' % md_df) if md_df is not None else 'n/a':>16}")
    if any(not m.get("reweighting_reliable", True) for m in models.values()):
        lines.append("* reweighted from fewer than 100 effective samples: unreliable (reweighted basins too)")
    c = summary.get("mixed_vs_control")
    if c is None:
        return "\n".join(lines + _gated_lines(summary))
    lines.append(
        f"mixed vs control: below E_cut {100 * c['below_e_cut_gain']:+.2f} points "
        f"(+- {100 * c['below_e_cut_gain_standard_error']:.2f}), ESS {c['ess_percent_gain']:+.3g} points, "
        f"phi/psi KL {c['phi_psi_kl_change']:+.3f} (noise ~{c['phi_psi_kl_noise']:g}) -> "
        f"{'the mixed stage helped' if c['mixed_helps'] else 'the mixed stage did NOT help'}"
    )
    return "\n".join(lines + _gated_lines(summary))


def _gated_lines(summary: dict) -> list[str]:
    """A warning when the highest raw energy of the gated stage's batches rose, and the wall times."""
    lines = []
    for stage in _GATED:
        rise = summary["stages"].get(stage, {}).get("raw_energy_max_kjmol") or {}
        first, last = rise.get("first_epoch"), rise.get("last_epoch")
        if first is not None and last is not None and first > 0 and last > 10 * first:
            lines.append(f"{stage} stage: the highest raw energy of a batch rose from {first:.2g} to {last:.2g} kJ/mol "
                         "(samples above E_max are dropped from the KL term; see plots/training.png)")
    lines.append("wall time [s]: " + ", ".join(
        f"{k} {v:.0f}" for k, v in summary["wall_seconds"].items() if v is not None))
    return lines
