"""The metrics that tell trained models apart (issue 13): the energy Wasserstein distance to
MD, the fraction beyond MD's 99.9th energy percentile, ΔF(phi > 0 - phi < 0) with a bootstrap
error bar (samples) and a time-correlation error bar (MD frames), and the functions of
``examples/reference_free_energy.py`` on synthetic phi series."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from bgflow_gate.systems.analysis import (
    delta_f_bootstrap,
    delta_f_time_series_error,
    energy_wasserstein,
    fraction_beyond_percentile,
    md_metrics,
    phi_free_energy_difference,
)

KT = 2.5


def _reference_module():
    path = Path(__file__).parents[1] / "examples" / "reference_free_energy.py"
    spec = importlib.util.spec_from_file_location("reference_free_energy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markov_phi(n: int, stay: float, p_positive: float, seed: int) -> np.ndarray:
    """A two-state (phi = -1 / +1 rad) Markov chain with stationary P(phi > 0) = p_positive and
    correlation ``lambda = stay`` per step: statistical inefficiency (1 + lambda) / (1 - lambda)."""
    rng = np.random.default_rng(seed)
    state = np.empty(n, dtype=bool)
    state[0] = rng.random() < p_positive
    redraw = rng.random(n) >= stay
    fresh = rng.random(n) < p_positive
    for t in range(1, n):
        state[t] = fresh[t] if redraw[t] else state[t - 1]
    return np.where(state, 1.0, -1.0)


# -- energy_wasserstein -----------------------------------------------------------------------


def test_wasserstein_of_a_hand_computed_case():
    # F_u steps 0 -> 1/2 at 0 and -> 1 at 1; F_v steps 0 -> 1 at 2:
    # integral |F_u - F_v| = 1/2 on [0, 1] + 1 on [1, 2] = 1.5
    assert energy_wasserstein(np.array([0.0, 1.0]), np.array([2.0])) == pytest.approx(1.5, abs=1e-12)


def test_wasserstein_with_weights_of_a_hand_computed_case():
    # u: 0 (weight 3) and 4 (weight 1); v: 1. |F_u - F_v| = 3/4 on [0, 1], 1/4 on [1, 4]
    got = energy_wasserstein(np.array([0.0, 4.0]), np.array([1.0]), u_weights=np.array([3.0, 1.0]))
    assert got == pytest.approx(0.75 + 0.75, abs=1e-12)


def test_wasserstein_of_a_shift_is_the_shift_and_of_a_copy_zero():
    e = np.random.default_rng(0).normal(-40.0, 5.0, 500)
    assert energy_wasserstein(e + 7.0, e) == pytest.approx(7.0, rel=1e-12)
    assert energy_wasserstein(e, e) == pytest.approx(0.0, abs=1e-12)


def test_wasserstein_leaves_out_non_finite_values_and_zero_weights():
    u, v = np.array([0.0, 1.0, np.nan, np.inf, 1e9]), np.array([2.0])
    w = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    assert energy_wasserstein(u, v, u_weights=w) == pytest.approx(1.5, abs=1e-12)
    assert energy_wasserstein(np.array([np.nan]), v) is None


def test_wasserstein_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    u, v = rng.normal(0.0, 3.0, 700), rng.gumbel(1.0, 2.0, 300)
    uw, vw = rng.exponential(size=700), rng.exponential(size=300)
    assert energy_wasserstein(u, v) == pytest.approx(stats.wasserstein_distance(u, v), rel=1e-10)
    assert energy_wasserstein(u, v, uw, vw) == pytest.approx(
        stats.wasserstein_distance(u, v, u_weights=uw, v_weights=vw), rel=1e-10)


# -- fraction_beyond_percentile ---------------------------------------------------------------


def test_fraction_beyond_the_99_9th_percentile_of_a_reference():
    reference = np.arange(10_001.0)  # 99.9th percentile: 9990
    values = np.array([9989.0, 9990.0, 9990.5, 20_000.0, np.nan, np.inf, -5.0, 0.0])
    assert fraction_beyond_percentile(values, reference) == pytest.approx(4 / 8)  # 9990.5, 2e4, nan, inf


def test_samples_from_the_reference_distribution_put_0_1_percent_beyond():
    rng = np.random.default_rng(2)
    got = fraction_beyond_percentile(rng.normal(size=400_000), rng.normal(size=400_000))
    assert got == pytest.approx(0.001, abs=0.0003)
    assert fraction_beyond_percentile(np.zeros(3), np.array([np.nan])) is None


# -- delta_f_bootstrap ------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_the_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_samples(weighted):
    rng = np.random.default_rng(4)
    widths, errors = [], []
    for n in (1_000, 16_000):
        phi = np.where(rng.random(n) < 0.2, 1.0, -1.0)
        w = rng.exponential(size=n) if weighted else None
        estimate = phi_free_energy_difference(phi, KT, w)
        boot = delta_f_bootstrap(phi, KT, w)
        lo, hi = boot["ci95"]
        assert lo < estimate < hi
        assert boot["standard_error"] == pytest.approx((hi - lo) / 3.92, rel=0.25)
        widths.append(hi - lo)
        errors.append(boot["standard_error"])
    assert widths[1] < widths[0] / 2.5 and errors[1] < errors[0] / 2.5  # 16x samples: ~1/4


def test_the_bootstrap_standard_error_matches_the_binomial_one():
    # unweighted: se(dF) = kT / sqrt(n p (1 - p)) = 2.5 / sqrt(4000 * 0.25 * 0.75) = 0.0913
    phi = np.where(np.random.default_rng(5).random(4000) < 0.25, 1.0, -1.0)
    assert delta_f_bootstrap(phi, KT)["standard_error"] == pytest.approx(KT / math.sqrt(4000 * 0.1875), rel=0.15)


def test_a_bootstrap_that_can_empty_a_side_has_an_open_end():
    phi = np.array([1.0] + [-1.0] * 99)  # one sample at phi > 0: most resamplings of 100 lose it some of the time
    boot = delta_f_bootstrap(phi, KT)
    assert boot["ci95"][0] is not None and boot["ci95"][1] is None and boot["standard_error"] is None
    assert delta_f_bootstrap(np.array([]), KT) == {"ci95": [None, None], "standard_error": None}


# -- delta_f_time_series_error and md_metrics -------------------------------------------------


def test_the_time_series_error_grows_with_the_correlation_as_sqrt_g():
    p = 0.25
    independent = delta_f_time_series_error(_markov_phi(40_000, 0.0, p, 6), KT)
    correlated = delta_f_time_series_error(_markov_phi(40_000, 0.9, p, 7), KT)
    assert independent["statistical_inefficiency"] == pytest.approx(1.0, abs=0.1)
    assert correlated["statistical_inefficiency"] == pytest.approx(19.0, rel=0.2)  # (1 + 0.9) / (1 - 0.9)
    assert independent["standard_error"] == pytest.approx(KT / math.sqrt(40_000 * p * (1 - p)), rel=0.1)
    assert correlated["standard_error"] / independent["standard_error"] == pytest.approx(math.sqrt(19.0), rel=0.15)
    lo, hi = correlated["ci95"]
    assert lo < correlated["delta_f"] < hi and hi - lo == pytest.approx(3.92 * correlated["standard_error"])
    assert lo < -KT * math.log(p / (1 - p)) < hi


def test_md_metrics_carry_the_error_bar_and_the_energy_tail():
    phi = _markov_phi(5_000, 0.5, 0.3, 8)
    m = md_metrics(phi, np.zeros_like(phi), KT, energies=np.arange(5_000.0))
    assert m["delta_f_phi_se_kjmol"] > 0 and m["phi_sign_statistical_inefficiency"] == pytest.approx(3.0, rel=0.2)
    assert m["energy_mean_kjmol"] == pytest.approx(2499.5) and m["energy_p999_kjmol"] == pytest.approx(4994.001)
    one_sided = md_metrics(np.full(10, -1.0), np.zeros(10), KT)
    assert one_sided["delta_f_phi_kjmol"] is None and one_sided["delta_f_phi_se_kjmol"] is None


# -- examples/reference_free_energy.py --------------------------------------------------------


def test_the_reference_run_estimates_of_a_synthetic_series():
    ref = _reference_module()
    phi = _markov_phi(20_000, 0.8, 0.2, 9)
    energies = np.random.default_rng(9).normal(-40.0, 5.0, 20_000)
    run = ref.run_estimates(phi, np.zeros_like(phi), energies, KT)
    assert run["frames"] == 20_000
    assert run["delta_f_kjmol"] == pytest.approx(-KT * math.log(np.mean(phi > 0) / np.mean(phi < 0)))
    assert run["statistical_inefficiency"] == pytest.approx(9.0, rel=0.2)  # (1 + 0.8) / (1 - 0.8)
    assert run["basins"]["phi>0 (C7ax/alphaL)"] == pytest.approx(np.mean(phi > 0))
    assert run["energy"]["mean_kjmol"] == pytest.approx(energies.mean())
    assert run["energy"]["percentiles_kjmol"]["50"] == pytest.approx(np.median(energies))


def test_the_reference_combines_runs_with_the_spread_between_them():
    ref = _reference_module()
    runs = [ref.run_estimates(phi, np.zeros_like(phi), np.zeros_like(phi), KT)
            for phi in (_markov_phi(10_000, 0.5, 0.2, s) for s in range(4))]
    per_run = np.array([r["delta_f_kjmol"] for r in runs])
    phis = [_markov_phi(10_000, 0.5, 0.2, s) for s in range(4)]
    combined = ref.combine(runs, np.concatenate(phis), np.zeros(40_000), np.zeros(40_000), KT)
    assert combined["runs"] == 4 and combined["frames"] == 40_000
    assert combined["delta_f_mean_of_runs_kjmol"] == pytest.approx(per_run.mean())
    assert combined["delta_f_sem_between_runs_kjmol"] == pytest.approx(per_run.std(ddof=1) / 2.0)
    pooled = -KT * math.log(np.mean(np.concatenate(phis) > 0) / np.mean(np.concatenate(phis) < 0))
    assert combined["delta_f_kjmol"] == pytest.approx(pooled)
    # the per-run errors (statistical inefficiency) combine as 1 / sqrt(sum 1 / se^2)
    se = np.array([r["delta_f_se_kjmol"] for r in runs])
    assert combined["delta_f_se_statistical_inefficiency_kjmol"] == pytest.approx(1 / math.sqrt(np.sum(se ** -2.0)))
    # the two error bars of four runs of the same process agree within a factor ~2
    assert 0.3 < combined["delta_f_sem_between_runs_kjmol"] / combined["delta_f_se_statistical_inefficiency_kjmol"] < 3
    single = ref.combine(runs[:1], phis[0], np.zeros(10_000), np.zeros(10_000), KT)
    assert single["delta_f_sem_between_runs_kjmol"] is None


def test_the_reference_script_generates_loads_and_writes_its_json(tmp_path, capsys):
    import json

    pytest.importorskip("openmm")
    ref = _reference_module()
    short = ["--data-dir", str(tmp_path), "--n-replicas", "2", "--t-max", "400", "--n-iterations", "300",
             "--steps-per-iteration", "100", "--equilibration-iterations", "10", "--quiet"]
    ref.main(short + ["--seeds", "3"])  # generates seed 3 into the cache
    result = ref.main(short + ["--seeds", "3", "4", "--only-cached", "--json", str(tmp_path / "ref.json")])
    out = capsys.readouterr().out
    assert "seed 4: " in out and "not there yet, skipped" in out
    written = json.loads((tmp_path / "ref.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert [r["seed"] for r in written["runs"]] == [3] and written["runs"][0]["frames"] == 300
    assert written["combined"]["runs"] == 1 and written["combined"]["delta_f_sem_between_runs_kjmol"] is None
    assert written["ns_per_replica_per_run"] == pytest.approx(0.031)
    assert sum(written["combined"]["basins"].values()) == pytest.approx(1.0)


# -- the summary: mixed_vs_control and the printed table ----------------------------------------


def _model(tail: float, w1: float, ess: float, kl: float = 0.3) -> dict:
    return {"samples": 10_000, "beyond_md_energy_p999": tail, "energy_wasserstein_kjmol": w1, "below_e_cut": 0.998,
            "ess_percent": ess, "ess_percent_ci95": [0.8 * ess, 1.3 * ess], "effective_samples": 100 * ess,
            "phi_psi_kl": kl, "energy_median_kjmol": -40.0, "delta_f_phi_kjmol": 11.0,
            "delta_f_phi_ci95_kjmol": [9.5, None], "delta_f_phi_se_kjmol": None, "reweighting_reliable": ess >= 1.0}


def test_mixed_helps_when_fewer_samples_lie_beyond_mds_99_9th_percentile_and_the_ess_grows():
    from bgflow_gate.pipeline import _comparison

    c = _comparison({"control": _model(0.03, 5.0, 0.5), "mixed": _model(0.01, 4.0, 0.8)})
    assert c["beyond_md_energy_p999_change"] == pytest.approx(-0.02)
    assert c["beyond_md_energy_p999_change_standard_error"] == pytest.approx(
        math.sqrt((0.03 * 0.97 + 0.01 * 0.99) / 10_000))
    assert c["energy_wasserstein_change_kjmol"] == pytest.approx(-1.0) and c["mixed_helps"] is True
    assert _comparison({"control": _model(0.01, 5.0, 0.5), "mixed": _model(0.03, 4.0, 0.8)})["mixed_helps"] is False


def test_the_printed_table_leads_with_the_energy_metrics_and_gives_the_intervals():
    from bgflow_gate.report import format_summary

    md = {"delta_f_phi_kjmol": 10.8, "delta_f_phi_se_kjmol": 1.4, "basins": {}}
    summary = {"metrics": {"md": md, "kl": _model(0.0074, 3.5, 0.0657)}, "stages": {}, "wall_seconds": {"kl": 538.0}}
    header, row, md_row, *rest = format_summary(summary).splitlines()
    assert header.split()[:5] == ["model", "E", "W1", "to", "MD"]
    assert row.split()[:4] == ["kl", "3.5", "0.74", "%"]
    assert "0.0657 [0.0526, 0.0854]" in row and "11.00 [9.5, inf]*" in row
    assert md_row.split()[0] == "MD" and md_row.endswith("10.80 +- 1.40")


def test_the_ess_of_each_fifth_shows_a_rare_large_weight_that_one_block_holds():
    from bgflow_gate.systems.analysis import ess_percent_blocks, kish_ess

    rng = np.random.default_rng(3)
    lw = rng.normal(0.0, 0.5, size=10_000)
    lw[123] = 12.0  # one rare sample with a huge weight, in the first fifth
    blocks = ess_percent_blocks(lw)
    assert len(blocks) == 5 and blocks[0] < 1.0 and min(blocks[1:]) > 70.0
    assert blocks[1] == pytest.approx(100.0 * kish_ess(lw[2000:4000]) / 2000)
