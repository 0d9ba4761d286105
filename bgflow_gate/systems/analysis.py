"""Analysis of alanine dipeptide samples: basins, free energies, importance weights,
statistical inefficiency, dataset checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .alanine import alanine_dipeptide, phi_psi

__all__ = [
    "basin_fractions",
    "phi_psi_kl",
    "kish_ess",
    "importance_weights",
    "ess_percent_interval",
    "ess_percent_blocks",
    "phi_free_energy_difference",
    "delta_f_bootstrap",
    "delta_f_time_series_error",
    "energy_wasserstein",
    "fraction_beyond_percentile",
    "md_metrics",
    "sample_metrics",
    "statistical_inefficiency",
    "validate_dataset",
    "format_validation",
    "RELIABLE_EFFECTIVE_SAMPLES",
    "TAIL_PERCENTILE",
]

#: Effective samples (Kish) from which on reweighted quantities are reported as meaningful:
#: a reweighted fraction p then has a standard error of about sqrt(p (1 - p) / 100) <= 5
#: points, and the phi free-energy difference one of about kT / sqrt(100 p (1 - p)).
RELIABLE_EFFECTIVE_SAMPLES = 100

#: The MD energy percentile whose exceedance by model samples is reported
#: (``beyond_md_energy_p999``): a model that samples the Boltzmann distribution puts 0.1 % of
#: its samples above it.
TAIL_PERCENTILE = 99.9

#: Basins of the phi/psi plane (degrees): phi < 0 splits at phi = -120 into C5/beta (extended)
#: and C7eq/alpha_R; phi > 0 holds C7ax/alpha_L.
BASINS = {
    "C5/beta": lambda phi, psi: phi < -120.0,
    "C7eq/alphaR": lambda phi, psi: (phi >= -120.0) & (phi < 0.0),
    "phi>0 (C7ax/alphaL)": lambda phi, psi: phi >= 0.0,
}


def basin_fractions(phi: np.ndarray, psi: np.ndarray) -> dict[str, float]:
    """Fraction of samples in each basin of :data:`BASINS` (angles in radians)."""
    phi_d, psi_d = np.degrees(phi), np.degrees(psi)
    return {name: float(np.mean(test(phi_d, psi_d))) for name, test in BASINS.items()}


def _weights(log_weights: np.ndarray) -> np.ndarray:
    """Importance weights scaled so the largest is 1; a non-finite log weight (e.g. a failed
    energy) gives weight zero."""
    lw = np.asarray(log_weights, dtype=float)
    finite = np.isfinite(lw)
    w = np.zeros_like(lw)
    if finite.any():
        w[finite] = np.exp(lw[finite] - lw[finite].max())
    return w


def importance_weights(log_weights: np.ndarray) -> np.ndarray:
    """Importance weights from log weights, the largest scaled to 1; a non-finite log weight
    gives weight zero."""
    return _weights(log_weights)


def kish_ess(log_weights: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` from log weights; samples with a
    non-finite log weight (e.g. a failed energy) have weight zero."""
    w = _weights(log_weights)
    return float(w.sum() ** 2 / np.square(w).sum()) if w.any() else 0.0


def ess_percent_interval(log_weights: np.ndarray, n_boot: int = 200, seed: int = 0) -> list[float]:
    """A bootstrap 95 % interval of the Kish ESS in percent of the samples: the 2.5th and
    97.5th percentiles over ``n_boot`` resamplings (with replacement) of the samples.

    >>> ess_percent_interval(np.zeros(1000))
    [100.0, 100.0]
    """
    w = _weights(log_weights)
    n = len(w)
    if n == 0 or not w.any():
        return [0.0, 0.0]
    picks = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    ws = w[picks]
    ess = ws.sum(1) ** 2 / np.maximum(np.square(ws).sum(1), np.finfo(float).tiny)
    return [float(100.0 * q / n) for q in np.percentile(ess, [2.5, 97.5])]


def ess_percent_blocks(log_weights: np.ndarray, n_blocks: int = 5) -> list[float]:
    """The Kish ESS in percent of each of ``n_blocks`` consecutive, disjoint blocks of the
    samples (independent draws: independent estimates). A rare sample with a large weight
    lowers only its own block; the bootstrap of :func:`ess_percent_interval` cannot show such
    a tail when the sample set lacks it, the spread of the blocks can.

    >>> ess_percent_blocks(np.zeros(10), n_blocks=2)
    [100.0, 100.0]
    """
    blocks = np.array_split(np.asarray(log_weights, dtype=float), n_blocks)
    return [100.0 * kish_ess(b) / len(b) if len(b) else 0.0 for b in blocks]


def phi_free_energy_difference(phi: np.ndarray, kt: float, weights: np.ndarray | None = None) -> float | None:
    """``F(phi > 0) - F(phi < 0) = -kT ln(P(phi > 0) / P(phi < 0))`` in the unit of ``kt``;
    ``None`` when either side holds no (weighted) sample."""
    w = np.ones_like(phi, dtype=float) if weights is None else np.asarray(weights, dtype=float)
    positive, negative = w[phi >= 0].sum(), w[phi < 0].sum()
    if positive <= 0 or negative <= 0:
        return None
    return float(-kt * math.log(positive / negative))


def _finite(value: float) -> float | None:
    """``value`` as a float, ``None`` when it is not finite (``summary.json`` holds no NaN)."""
    return float(value) if value is not None and np.isfinite(value) else None


def delta_f_bootstrap(
    phi: np.ndarray, kt: float, weights: np.ndarray | None = None, n_boot: int = 200, seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap error bar of :func:`phi_free_energy_difference` over independent samples.

    Parameters
    ----------
    phi : numpy.ndarray
        Phi angles (radians) of independent samples (a generator's; MD frames are correlated:
        use :func:`delta_f_time_series_error`).
    kt : float
        kT; the result is in its unit.
    weights : numpy.ndarray, optional
        Importance weights (default: all equal).
    n_boot : int
        Resamplings with replacement of the samples (weights travel with their samples).
    seed : int
        Seeds the resampling.

    Returns
    -------
    dict
        ``ci95``: the 2.5th and 97.5th percentiles of the resampled ΔF (the 6th smallest and
        6th largest of 200), an end ``None`` where a resampling left one side of phi = 0
        without weight (ΔF unbounded); ``standard_error``: the standard deviation of the
        resampled ΔF (``None`` if any was unbounded). Both ``None`` without samples.
    """
    phi = np.asarray(phi, dtype=float)
    w = np.ones_like(phi) if weights is None else np.nan_to_num(np.asarray(weights, dtype=float))
    n = len(phi)
    if n == 0 or not w.any():
        return {"ci95": [None, None], "standard_error": None}
    positive = np.where(phi >= 0, w, 0.0)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        pos, tot = counts @ positive, counts @ w
        with np.errstate(divide="ignore", invalid="ignore"):
            values[b] = -kt * np.log(pos / (tot - pos)) if tot > 0 else np.nan
    values = np.sort(np.where(np.isnan(values), np.inf, values))
    k = int(math.floor(0.025 * n_boot))
    se = float(np.std(values, ddof=1)) if np.isfinite(values).all() and n_boot > 1 else None
    return {"ci95": [_finite(values[k]), _finite(values[n_boot - 1 - k])], "standard_error": se}


def delta_f_time_series_error(phi: np.ndarray, kt: float) -> dict[str, Any]:
    """ΔF(phi > 0 - phi < 0) of a time series of frames with an error bar that counts its
    time correlation.

    The fraction p of frames at phi >= 0 has the standard error ``sqrt(p (1 - p) g / N)``,
    ``g`` the :func:`statistical_inefficiency` of the indicator series ``phi >= 0``; ΔF =
    -kT ln(p / (1 - p)) then has ``kT / sqrt(p (1 - p) N / g)`` (first order).

    Parameters
    ----------
    phi : numpy.ndarray
        Phi angles (radians) in time order.
    kt : float
        kT; the result is in its unit.

    Returns
    -------
    dict
        ``delta_f``, ``standard_error``, ``ci95`` (``delta_f`` -+ 1.96 standard errors),
        ``statistical_inefficiency`` (g) and ``independent_frames`` (N / g); ΔF and its
        error bar ``None`` when one side holds no frame.
    """
    phi = np.asarray(phi, dtype=float)
    inside = (phi >= 0).astype(float)
    g = statistical_inefficiency(inside) if len(phi) else 1.0
    n_eff = len(phi) / g
    delta_f = phi_free_energy_difference(phi, kt) if len(phi) else None
    out = {"delta_f": delta_f, "standard_error": None, "ci95": [None, None],
           "statistical_inefficiency": float(g), "independent_frames": float(n_eff)}
    if delta_f is not None:
        p = inside.mean()
        se = kt / math.sqrt(p * (1 - p) * n_eff)
        out.update(standard_error=se, ci95=[delta_f - 1.96 * se, delta_f + 1.96 * se])
    return out


def energy_wasserstein(
    u: np.ndarray, v: np.ndarray, u_weights: np.ndarray | None = None, v_weights: np.ndarray | None = None,
) -> float | None:
    """The 1-D Wasserstein (earth mover's) distance between two weighted samples,
    ``integral |F_u(x) - F_v(x)| dx`` of their weighted empirical CDFs (in the unit of the
    values; equal to ``scipy.stats.wasserstein_distance``).

    Values that are not finite, and values of zero weight, are left out (a failed energy has
    weight zero after reweighting); ``None`` when either side has nothing left.

    >>> energy_wasserstein(np.array([0.0, 1.0]), np.array([2.0]))
    1.5
    """
    def clean(values, weights):
        values = np.asarray(values, dtype=float)
        weights = np.ones_like(values) if weights is None else np.nan_to_num(np.asarray(weights, dtype=float))
        keep = np.isfinite(values) & (weights > 0)
        order = np.argsort(values[keep])
        return values[keep][order], np.concatenate([[0.0], np.cumsum(weights[keep][order])])

    (us, ucum), (vs, vcum) = clean(u, u_weights), clean(v, v_weights)
    if len(us) == 0 or len(vs) == 0:
        return None
    grid = np.sort(np.concatenate([us, vs]))
    f_u = ucum[np.searchsorted(us, grid[:-1], "right")] / ucum[-1]
    f_v = vcum[np.searchsorted(vs, grid[:-1], "right")] / vcum[-1]
    return float(np.sum(np.abs(f_u - f_v) * np.diff(grid)))


def fraction_beyond_percentile(
    values: np.ndarray, reference: np.ndarray, percentile: float = TAIL_PERCENTILE,
) -> float | None:
    """Fraction of ``values`` (unweighted) above the ``percentile``-th percentile of the finite
    ``reference`` values; a non-finite value counts as beyond. ``None`` without a finite
    reference value.

    >>> fraction_beyond_percentile(np.array([1.0, 5.0, np.nan, 0.0]), np.arange(5.0), 50.0)
    0.5
    """
    reference = np.asarray(reference, dtype=float)
    reference = reference[np.isfinite(reference)]
    if len(reference) == 0:
        return None
    threshold = np.percentile(reference, percentile)
    return float(np.mean(~(np.asarray(values, dtype=float) <= threshold)))


def md_metrics(phi: np.ndarray, psi: np.ndarray, kt: float, energies: np.ndarray | None = None) -> dict[str, Any]:
    """Basin populations and the phi free-energy difference of MD frames, with an error bar
    that counts their time correlation (:func:`delta_f_time_series_error`).

    Parameters
    ----------
    phi, psi : numpy.ndarray
        Angles (radians) of the frames, in time order.
    kt : float
        kT in kJ/mol.
    energies : numpy.ndarray, optional
        The frames' energies in kJ/mol: adds their mean and their
        :data:`TAIL_PERCENTILE`-th percentile.

    Returns
    -------
    dict
        ``frames``, ``basins``, ``delta_f_phi_kjmol``, ``delta_f_phi_se_kjmol``,
        ``delta_f_phi_ci95_kjmol``, ``phi_sign_statistical_inefficiency``; with ``energies``
        also ``energy_mean_kjmol`` and ``energy_p999_kjmol``.
    """
    err = delta_f_time_series_error(phi, kt)
    out = {
        "frames": int(len(phi)),
        "basins": basin_fractions(phi, psi),
        "delta_f_phi_kjmol": err["delta_f"],
        "delta_f_phi_se_kjmol": err["standard_error"],
        "delta_f_phi_ci95_kjmol": err["ci95"],
        "phi_sign_statistical_inefficiency": err["statistical_inefficiency"],
    }
    if energies is not None:
        e = np.asarray(energies, dtype=float)
        e = e[np.isfinite(e)]
        out["energy_mean_kjmol"] = _finite(e.mean()) if len(e) else None
        out["energy_p999_kjmol"] = _finite(np.percentile(e, TAIL_PERCENTILE)) if len(e) else None
    return out


def sample_metrics(
    x: torch.Tensor, energies: np.ndarray, log_weights: np.ndarray, reference: torch.Tensor, *,
    kt: float, e_cut: float, bins: int = 60, reference_energies: np.ndarray | None = None,
) -> dict[str, Any]:
    """The metrics of generator samples ``x`` against MD frames ``reference``.

    Parameters
    ----------
    x : torch.Tensor
        Samples ``[n, 66]`` (nm); ``reference``: MD test frames.
    energies : numpy.ndarray
        Their energies in kJ/mol (non-finite: a failed evaluation).
    log_weights : numpy.ndarray
        Their log importance weights ``-u(x) - log q(x)`` (up to a constant).
    kt : float
        kT in kJ/mol at the target's temperature.
    e_cut : float
        The soft-cut energy in kJ/mol.
    bins : int
        Histogram bins per angle (``phi_psi_kl``).
    reference_energies : numpy.ndarray, optional
        The MD frames' energies in kJ/mol; without them the two energy distances are ``None``.

    Returns
    -------
    dict
        ``samples``; ``energy_wasserstein_kjmol`` (:func:`energy_wasserstein` of the reweighted
        energies to MD's), ``beyond_md_energy_p999`` (unweighted fraction above MD's 99.9th
        energy percentile; MD itself: 0.001), ``below_e_cut`` (non-finite energies count as
        above), ``energy_median_kjmol``; ``phi_psi_kl``; ``effective_samples`` (Kish),
        ``ess_percent`` (of ``samples``), ``ess_percent_ci95`` (bootstrap),
        ``ess_percent_blocks`` (:func:`ess_percent_blocks`); ``basins``,
        ``basins_reweighted``; ``delta_f_phi_kjmol`` (reweighted; ``None`` if a side is empty)
        with ``delta_f_phi_ci95_kjmol`` and ``delta_f_phi_se_kjmol`` (:func:`delta_f_bootstrap`);
        ``reweighting_reliable`` (at least :data:`RELIABLE_EFFECTIVE_SAMPLES` effective samples).
    """
    phi, psi = (a.numpy() for a in phi_psi(x.detach().double()))
    w, ess = _weights(log_weights), kish_ess(log_weights)
    return {
        "samples": int(len(energies)),
        **_energy_metrics(energies, w, reference_energies, e_cut),
        "phi_psi_kl": phi_psi_kl(x, reference, bins=bins),
        "effective_samples": ess,
        "ess_percent": 100.0 * ess / len(energies),
        "ess_percent_ci95": ess_percent_interval(log_weights),
        "ess_percent_blocks": ess_percent_blocks(log_weights),
        "basins": basin_fractions(phi, psi),
        **_reweighted(phi, psi, w, kt),
        "reweighting_reliable": bool(ess >= RELIABLE_EFFECTIVE_SAMPLES),
    }


def _energy_metrics(energies: np.ndarray, w: np.ndarray, reference: np.ndarray | None, e_cut: float) -> dict[str, Any]:
    """The energy entries of :func:`sample_metrics`."""
    energies, has_ref = np.asarray(energies, dtype=float), reference is not None
    return {
        "energy_wasserstein_kjmol": energy_wasserstein(energies, reference, u_weights=w) if has_ref else None,
        "beyond_md_energy_p999": fraction_beyond_percentile(energies, reference) if has_ref else None,
        "below_e_cut": float(np.mean(np.isfinite(energies) & (energies < e_cut))),
        "energy_median_kjmol": float(np.median(np.where(np.isfinite(energies), energies, np.inf))),
    }


def _reweighted(phi: np.ndarray, psi: np.ndarray, w: np.ndarray, kt: float) -> dict[str, Any]:
    """The reweighted entries of :func:`sample_metrics`: basins and ΔF with its bootstrap."""
    total = w.sum()
    basins = {name: float(w[test(np.degrees(phi), np.degrees(psi))].sum() / total) if total > 0 else math.nan
              for name, test in BASINS.items()}
    boot = delta_f_bootstrap(phi, kt, w)
    return {
        "basins_reweighted": basins,
        "delta_f_phi_kjmol": phi_free_energy_difference(phi, kt, w),
        "delta_f_phi_ci95_kjmol": boot["ci95"],
        "delta_f_phi_se_kjmol": boot["standard_error"],
    }


def phi_psi_kl(samples: torch.Tensor, reference: torch.Tensor, bins: int = 60) -> float:
    """KL(reference || samples) between the phi/psi histograms on ``bins`` x ``bins`` cells
    (a floor of 1e-6 per cell before normalising avoids log 0)."""
    edges = np.linspace(-math.pi, math.pi, bins + 1)

    def hist(x: torch.Tensor) -> np.ndarray:
        phi, psi = (a.numpy() for a in phi_psi(x.detach().double()))
        h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges])
        h = h + 1e-6
        return h / h.sum()

    p, q = hist(reference), hist(samples)
    return float(np.sum(p * np.log(p / q)))


def statistical_inefficiency(series: np.ndarray) -> float:
    """``g = 1 + 2 sum_t (1 - t/N) C(t)``, the autocorrelation summed until it first drops
    below zero; ``N / g`` is the number of effectively independent samples."""
    x = np.asarray(series, dtype=float)
    n = len(x)
    x = x - x.mean()
    var = np.dot(x, x) / n
    if n < 2 or var == 0:
        return 1.0
    g = 1.0
    for t in range(1, n - 1):
        c = np.dot(x[:-t], x[t:]) / ((n - t) * var)
        if c <= 0:
            break
        g += 2.0 * c * (1.0 - t / n)
    return max(g, 1.0)


def validate_dataset(dataset, n_energy_checks: int = 200) -> dict[str, Any]:
    """Check a dataset: finite coordinates and energies, energies recomputed with the force
    field, phi/psi coverage of the basins, crossings between phi < 0 and phi > 0, statistical
    inefficiency. ``problems`` lists what failed, one phrase each (empty: the data are fine)."""
    from .data import ENERGY_TOLERANCE_KJMOL, recompute_energies

    positions = dataset.positions.astype(np.float64)
    energies = np.asarray(dataset.energies, dtype=float)
    finite = np.isfinite(positions).all(axis=1)
    idx = np.unique(np.linspace(0, len(positions) - 1, min(n_energy_checks, len(positions))).astype(int))
    idx = idx[finite[idx] & np.isfinite(energies[idx])]  # non-finite values are reported on their own
    diffs = np.abs(recompute_energies(positions[idx], dataset.settings.solvent) - energies[idx])
    phi, psi = (a.numpy() for a in phi_psi(torch.as_tensor(positions[finite])))
    report = {
        "frames": len(positions),
        "finite": bool(finite.all()),
        "nonfinite_frames": int((~finite).sum()),
        "energies_finite": bool(np.isfinite(energies).all()),
        "energy_checked": len(idx),
        "energy_max_abs_diff_kjmol": float(np.max(diffs, initial=0.0)) if len(idx) else math.nan,
        "energy_mean_kjmol": float(np.nanmean(energies)) if np.isfinite(energies).any() else math.nan,
        "basins": basin_fractions(phi, psi),
        "phi_crossings": int(np.count_nonzero(np.diff((phi >= 0).astype(int)))),
        "g_energy": statistical_inefficiency(energies[np.isfinite(energies)]),
        "g_phi": statistical_inefficiency(np.cos(phi)),
        "acceptance": [float(a) for a in dataset.acceptance],
        "seconds": dataset.seconds,
    }
    report["energies_match"] = bool(report["energy_max_abs_diff_kjmol"] < ENERGY_TOLERANCE_KJMOL)
    report["problems"] = _problems(report)
    return report


def _problems(report: dict[str, Any]) -> list[str]:
    """The failed checks of a :func:`validate_dataset` report, one phrase each."""
    basins = report["basins"]
    checks = {
        f"non-finite coordinates in {report['nonfinite_frames']} frames": report["finite"],
        "non-finite energies": report["energies_finite"],
        "energies differ from the force field": report["energies_match"],
        "a phi < 0 basin is not sampled": basins["C5/beta"] > 0 and basins["C7eq/alphaR"] > 0,
    }
    return [problem for problem, ok in checks.items() if not ok]


def format_validation(report: dict[str, Any]) -> str:
    """A readable account of :func:`validate_dataset`'s report, with verdicts, ending in a
    summary line: ``all checks passed`` or the number of problems and what they are."""
    ok = lambda flag: "ok" if flag else "PROBLEM"  # noqa: E731
    basins = report["basins"]
    lines = [
        f"frames: {report['frames']}, coordinates finite: {ok(report['finite'])}, "
        f"energies finite: {ok(report['energies_finite'])}",
        f"energies recomputed on {report['energy_checked']} frames: max |diff| "
        f"{report['energy_max_abs_diff_kjmol']:.2e} kJ/mol ({ok(report['energies_match'])}), "
        f"mean {report['energy_mean_kjmol']:.2f} kJ/mol",
        "basins: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in basins.items())
        + f" ({ok(basins['C5/beta'] > 0 and basins['C7eq/alphaR'] > 0)} for phi < 0; phi > 0 "
        f"{'sampled' if basins['phi>0 (C7ax/alphaL)'] > 0 else 'NOT sampled'})",
        f"phi sign changes: {report['phi_crossings']}",
        f"statistical inefficiency: energy {report['g_energy']:.1f}, cos(phi) {report['g_phi']:.1f} "
        f"(~{report['frames'] / report['g_phi']:.0f} independent frames for the phi distribution)",
    ]
    if report["acceptance"]:
        lines.append("exchange acceptance: " + " ".join(f"{a:.2f}" for a in report["acceptance"]))
    if not math.isnan(report["seconds"]):
        lines.append(f"generated in {report['seconds']:.0f} s")
    problems = report["problems"]
    lines.append(f"{len(problems)} PROBLEM{'S' if len(problems) > 1 else ''}: {'; '.join(problems)}"
                 if problems else "all checks passed")
    return "\n".join(lines)
