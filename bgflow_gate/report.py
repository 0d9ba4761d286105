"""The plots of a ``bgflow-gate train`` run, drawn from the files in its run directory.

``draw_plots(run_dir)`` reads ``evaluation.npz``, ``history_<stage>.csv`` and
``summary.json`` and writes three PNG files into ``run_dir/plots``:

* ``ramachandran.png``: phi/psi free energy (-ln of the histogram density, in kT, with a
  colour bar) of the MD test data and of the samples of every model of the run (NLL model,
  NLL-only control and mixed model; or the kl model of the ``kl_only`` route): top row the
  samples as drawn, bottom row reweighted to the Boltzmann distribution, MD's panel first in
  both; the fraction of each basin, the KL to MD, and the reweighted row's ESS and
  ΔF(phi > 0 - phi < 0) with its 95 % interval above each panel;
* ``energies.png``: left, energy histograms of the same (samples as drawn) on an axis that is
  linear up to E_cut and logarithmic above it, with E_cut and MD's 99.9th percentile marked;
  right, the reweighted samples' energies against MD's on MD's range, with each model's
  Wasserstein distance to MD;
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

__all__ = ["draw_plots", "read_history", "read_summary", "PLOT_FILES", "format_summary", "format_delta_f",
           "format_number"]

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


def _basin_text(metrics: dict[str, Any], key: str, basins: str = "basins") -> str:
    text = ", ".join(f"{name.split(' ')[0]} {100 * v:.1f} %" for name, v in metrics[key][basins].items())
    return text + (f"\nKL to MD {metrics[key]['phi_psi_kl']:.2f}" if key != "md" else "\n")


def _free_energy_panel(ax, phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None, title: str):
    """-ln of the (weighted) phi/psi histogram density in kT, 0 at the most populated cell."""
    edges = np.linspace(-180, 180, 61)
    h, _, _ = np.histogram2d(np.degrees(phi), np.degrees(psi), bins=[edges, edges], weights=weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        free = -np.log(h.T / h.sum())
    floor = np.min(free[np.isfinite(free)]) if np.isfinite(free).any() else 0.0
    mesh = ax.pcolormesh(edges, edges, free - floor, cmap="viridis_r", vmin=0, vmax=8)
    ax.set_title(title, fontsize=9)
    for x in (-120, 0):
        ax.axvline(x, color="gray", lw=0.5, ls="--")
    return mesh


def _reweighted_title(summary: dict[str, Any], key: str, label: str) -> str:
    m = summary["metrics"][key]
    basins = _basin_text(summary["metrics"], key, "basins_reweighted").split("\n")[0]
    return (f"{label}, reweighted: ESS {m['ess_percent']:.3g} % ({m['effective_samples']:.0f} samples)\n{basins}\n"
            f"dF(phi>0-phi<0) {format_delta_f(m)} kJ/mol")


def _ramachandran(plt, ev, summary, path: Path) -> None:
    """Top row: MD and every model's samples as drawn; bottom row: MD again and the samples
    reweighted to the Boltzmann distribution (weights from ``<model>_logw``)."""
    from .systems.analysis import importance_weights

    models = _models(summary)
    cols = len(models)
    fig, axes = plt.subplots(2, cols, figsize=(4.4 * cols, 9.5), sharex=True, sharey=True, layout="constrained",
                             squeeze=False)
    md = summary["metrics"]["md"]
    for row in range(2):
        md_title = f"{_LABELS['md']}, {len(ev['md_phi'])} frames\n{_basin_text(summary['metrics'], 'md')}"
        md_title += f"dF(phi>0-phi<0) {format_delta_f(md)} kJ/mol"
        mesh = _free_energy_panel(axes[row, 0], ev["md_phi"], ev["md_psi"], None, md_title)
    for col, (key, label) in enumerate(models[1:], start=1):
        phi, psi = ev[f"{key}_phi"], ev[f"{key}_psi"]
        _free_energy_panel(axes[0, col], phi, psi, None,
                           f"{label}, {len(phi)} samples as drawn\n{_basin_text(summary['metrics'], key)}")
        if f"{key}_logw" in ev:
            _free_energy_panel(axes[1, col], phi, psi, importance_weights(ev[f"{key}_logw"]),
                               _reweighted_title(summary, key, label))
        else:
            axes[1, col].set_title(f"{label}: no log weights in evaluation.npz", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("phi [deg]")
    for ax in axes[:, 0]:
        ax.set_ylabel("psi [deg]")
    fig.colorbar(mesh, ax=axes, label="free energy -ln p [kT] (0: most populated cell; white: no sample)", shrink=0.6)
    fig.suptitle(f"{summary['experiment']}: phi/psi free energy, samples as drawn (top) and reweighted (bottom); "
                 "basins (dashed lines): C5/beta phi < -120, C7eq/alphaR -120 <= phi < 0, phi > 0")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _energy_bins(low: float, e_cut: float, high: float) -> np.ndarray:
    """Bin edges linear from ``low`` to ``e_cut`` and logarithmic from there to ``high``."""
    linear = np.linspace(low, e_cut, 60)
    if high <= e_cut * 1.01:
        return linear
    return np.concatenate([linear, np.geomspace(e_cut, high, 40)[1:]])


def _energies(plt, ev, summary, path: Path) -> None:
    """Left: energies of the samples as drawn against MD's (linear up to E_cut, logarithmic
    above), MD's 99.9th percentile marked; right: the samples reweighted to the Boltzmann
    distribution against MD's, on MD's range."""
    fig, (ax, right) = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [1.2, 1]})
    _raw_energies(ax, ev, summary)
    _reweighted_energies(right, ev, summary)
    _save(plt, fig, path, f"{summary['experiment']}: energies of generator samples vs MD at "
                          f"{summary['temperature_k']:g} K")


def _raw_energies(ax, ev, summary) -> None:
    e_cut, md, models = summary["e_cut_kjmol"], ev["md_energy"], _models(summary)
    samples = [ev[f"{k}_energy"] for k, _ in models[1:]]
    finite = np.concatenate([md, *(e[np.isfinite(e)] for e in samples)])
    low, high = float(np.min(md)) - 20, float(max(e_cut * 2, np.max(finite)))
    bins = _energy_bins(low, e_cut, high)
    ax.hist(md, bins=bins, density=True, histtype="step", color=_COLORS["md"], lw=2, label=_LABELS["md"])
    for (key, label), e in zip(models[1:], samples):
        m = summary["metrics"][key]
        tail = m.get("beyond_md_energy_p999")
        ax.hist(np.clip(e[np.isfinite(e)], low, high), bins=bins, density=True, histtype="step", color=_COLORS.get(key),
                label=f"{label}: {format_number(None if tail is None else 100 * tail)} % beyond MD's 99.9th "
                      f"percentile, {100 * m['below_e_cut']:.1f} % below E_cut")
    ax.axvline(np.percentile(md, 99.9), color="black", ls=":", label="MD's 99.9th percentile")
    ax.axvline(e_cut, color="red", ls="--", label=f"E_cut = {e_cut:g} kJ/mol")
    ax.set_xscale("symlog", linthresh=e_cut, linscale=2.0)
    ax.set_xlim(low, high)
    ax.set_xlabel("potential energy [kJ/mol] (linear up to E_cut, logarithmic above)")
    ax.set_ylabel("density [1 / (kJ/mol)]")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("samples as drawn", fontsize=10)


def _reweighted_energies(ax, ev, summary) -> None:
    from .systems.analysis import importance_weights

    md, models = ev["md_energy"], _models(summary)
    lo, hi = np.percentile(md, [0.1, 99.9])
    bins = np.linspace(lo - 0.2 * (hi - lo), hi + 0.3 * (hi - lo), 70)
    ax.hist(md, bins=bins, density=True, histtype="step", color=_COLORS["md"], lw=2, label=_LABELS["md"])
    for key, label in models[1:]:
        if f"{key}_logw" not in ev:
            continue
        e, w = ev[f"{key}_energy"], importance_weights(ev[f"{key}_logw"])
        keep = np.isfinite(e) & (w > 0)
        if not keep.any():
            continue
        m = summary["metrics"][key]
        ax.hist(e[keep], bins=bins, weights=w[keep], density=True, histtype="step", color=_COLORS.get(key),
                label=f"{label}: W1 to MD {format_number(m.get('energy_wasserstein_kjmol'), '.3g')} kJ/mol, "
                      f"{m['effective_samples']:.0f} effective samples")
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel("potential energy [kJ/mol]")
    ax.set_ylabel("density [1 / (kJ/mol)]")
    ax.legend(fontsize=8)
    ax.set_title("samples reweighted to the Boltzmann distribution", fontsize=10)


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


def format_number(value: float | None, spec: str = ".2f") -> str:
    """``value`` in the format ``spec``, ``n/a`` for ``None``."""
    return "n/a" if value is None else format(value, spec)


def format_delta_f(m: dict[str, Any]) -> str:
    """A model's reweighted ΔF in kJ/mol with its bootstrap 95 % interval, ``*`` when reweighting
    is unreliable; MD's with its standard error (time correlation counted)."""
    df = m.get("delta_f_phi_kjmol")
    if df is None:
        return "n/a"
    if "ess_percent" not in m:  # MD frames
        se = m.get("delta_f_phi_se_kjmol")
        return f"{df:.2f}" + (f" +- {se:.2f}" if se is not None else "")
    lo, hi = m.get("delta_f_phi_ci95_kjmol") or (None, None)
    low, high = format_number(lo, ".1f").replace("n/a", "-inf"), format_number(hi, ".1f").replace("n/a", "inf")
    text = f"{df:.2f} [{low}, {high}]"
    return text + ("" if m.get("reweighting_reliable", True) else "*")


def format_summary(summary: dict) -> str:
    """The metrics of a run's summary as a small table, with what needs saying about them."""
    lines = [f"{'model':<10} {'E W1 to MD':>11} {'>MD E p99.9':>12} {'ESS % [95 %]':>22} {'eff. samples':>13} "
             f"{'dF(phi>0-phi<0) [95 %]':>24} {'phi/psi KL':>11} {'below E_cut':>12} {'median E':>10}"]
    models = {k: m for k, m in summary["metrics"].items() if k != "md"}
    for key, m in models.items():
        ci, tail = m.get("ess_percent_ci95"), m.get("beyond_md_energy_p999")
        ess = f"{m['ess_percent']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
        lines.append(
            f"{key:<10} {format_number(m.get('energy_wasserstein_kjmol'), '.3g'):>11} "
            f"{format_number(None if tail is None else 100 * tail, '.2f') + ' %':>12} "
            f"{ess:>22} {m['effective_samples']:>13.1f} {format_delta_f(m):>24} "
            f"{m['phi_psi_kl']:>11.3f} {100 * m['below_e_cut']:>11.1f}% {m['energy_median_kjmol']:>10.4g}"
        )
    md = summary["metrics"]["md"]
    lines.append(f"{'MD':<10} {'':>11} {'0.1 %':>12} {'':>22} {'':>13} {format_delta_f(md):>24}")
    lines.append("energies in kJ/mol; E W1 to MD: Wasserstein distance of the reweighted energy distribution to MD's; "
                 ">MD E p99.9: samples (unweighted) above MD's 99.9th energy percentile")
    if any(not m.get("reweighting_reliable", True) for m in models.values()):
        lines.append("* reweighted from fewer than 100 effective samples: unreliable (reweighted basins too)")
    c = summary.get("mixed_vs_control")
    if c is not None:
        lines.append(_comparison_line(c))
    return "\n".join(lines + _gated_lines(summary))


def _comparison_line(c: dict[str, Any]) -> str:
    """The mixed model against its control, in one line."""
    tail, w1 = c.get("beyond_md_energy_p999_change"), c.get("energy_wasserstein_change_kjmol")
    energy = (f"beyond MD's 99.9th energy percentile {100 * tail:+.2f} points "
              f"(+- {100 * c['beyond_md_energy_p999_change_standard_error']:.2f}), " if tail is not None else "")
    energy += f"energy W1 {w1:+.3g} kJ/mol, " if w1 is not None else ""
    return (
        f"mixed vs control: {energy}ESS {c['ess_percent_gain']:+.3g} points, "
        f"phi/psi KL {c['phi_psi_kl_change']:+.3f} (noise ~{c['phi_psi_kl_noise']:g}), below E_cut "
        f"{100 * c['below_e_cut_gain']:+.2f} points (+- {100 * c['below_e_cut_gain_standard_error']:.2f}) -> "
        f"{'the mixed stage helped' if c['mixed_helps'] else 'the mixed stage did NOT help'}"
    )


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
