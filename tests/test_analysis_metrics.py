"""Metrics of generator samples and MD frames: Kish ESS, the phi free-energy difference,
md_metrics and sample_metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")
pytest.importorskip("openmmtools")
pytest.importorskip("mdtraj")

from bgflow_gate.systems.alanine import PHI_ATOMS, alanine_dipeptide, phi_psi  # noqa: E402
from bgflow_gate.systems.analysis import (  # noqa: E402
    kish_ess,
    md_metrics,
    phi_free_energy_difference,
    sample_metrics,
)

KT = 2.5  # kJ/mol, about 300 K
ACE_SIDE = [0, 1, 2, 3, 4, 5, 7]  # the acetyl cap and H on N: turn together about N-CA
W_1_1_2_0 = np.array([0.0, 0.0, math.log(2.0), -np.inf])  # log weights of 1, 1, 2, 0
W_1_2_1_0 = np.array([0.0, math.log(2.0), 0.0, -np.inf])


@pytest.fixture(scope="module")
def start():
    return alanine_dipeptide("vacuum").positions_tensor()


def with_phi(x: torch.Tensor, phi_degrees) -> torch.Tensor:
    """Copies of the configuration ``x`` ``[1, 66]`` with phi set by turning the acetyl side
    about the N-CA bond (Rodrigues' rotation)."""
    out = []
    for target in phi_degrees:
        pos = x.reshape(22, 3).clone()
        n, ca = pos[PHI_ATOMS[1]], pos[PHI_ATOMS[2]]
        k = (ca - n) / (ca - n).norm()
        angle = phi_psi(x)[0].item() - math.radians(target)  # turning C by a lowers phi by a
        v = pos[ACE_SIDE] - n
        c, s = math.cos(angle), math.sin(angle)
        pos[ACE_SIDE] = n + v * c + torch.cross(k.expand_as(v), v, dim=-1) * s + k * (v @ k)[:, None] * (1 - c)
        out.append(pos.reshape(1, 66))
    out = torch.cat(out)
    assert np.allclose(np.degrees(phi_psi(out)[0].numpy()), phi_degrees, atol=1e-8)
    return out


# -- kish_ess -----------------------------------------------------------------------------------


def test_equal_log_weights_give_an_ess_of_n():
    assert kish_ess(np.full(7, -3.0)) == pytest.approx(7.0, rel=1e-12)


def test_weights_one_one_two_give_an_ess_of_eight_thirds():
    assert kish_ess(np.log([1.0, 1.0, 2.0])) == pytest.approx(8 / 3, rel=1e-12)


def test_a_non_finite_log_weight_is_a_zero_weight():
    assert kish_ess(np.array([0.0, -np.inf, 0.0])) == pytest.approx(2.0, rel=1e-12)
    assert kish_ess(np.array([0.0, np.nan, 0.0, np.inf])) == pytest.approx(2.0, rel=1e-12)


def test_one_dominant_weight_gives_an_ess_of_one():
    assert kish_ess(np.array([0.0, -50.0, -50.0, -50.0])) == pytest.approx(1.0, rel=1e-12)


def test_the_ess_does_not_change_when_a_constant_is_added_to_every_log_weight():
    lw = np.random.default_rng(0).normal(size=50)
    assert kish_ess(lw + 1000.0) == pytest.approx(kish_ess(lw), rel=1e-12)
    assert kish_ess(lw - 1000.0) == pytest.approx(kish_ess(lw), rel=1e-12)


def test_all_weights_non_finite_give_an_ess_of_zero():
    assert kish_ess(np.array([np.nan, -np.inf, np.inf])) == 0.0
    assert kish_ess(np.array([])) == 0.0


# -- phi_free_energy_difference ---------------------------------------------------------------


def test_one_of_four_samples_at_positive_phi_gives_minus_kt_ln_one_third():
    phi = np.array([-1.0, -2.0, 0.5, -0.1])
    assert phi_free_energy_difference(phi, KT) == pytest.approx(-KT * math.log(1 / 3), rel=1e-12)


def test_phi_of_exactly_zero_counts_as_positive():
    assert phi_free_energy_difference(np.array([0.0, -1.0]), KT) == pytest.approx(0.0, abs=1e-12)


def test_weights_that_balance_the_two_sides_give_zero():
    phi = np.array([-1.0, -2.0, 0.5])
    assert phi_free_energy_difference(phi, KT, weights=np.array([1.0, 1.0, 2.0])) == pytest.approx(0.0, abs=1e-12)


def test_an_empty_side_gives_none():
    assert phi_free_energy_difference(np.array([-1.0, -2.0, -0.1]), KT) is None
    assert phi_free_energy_difference(np.array([1.0, 2.0]), KT) is None
    assert phi_free_energy_difference(np.array([-1.0, 1.0]), KT, weights=np.array([1.0, 0.0])) is None


# -- md_metrics -------------------------------------------------------------------------------


def test_md_metrics_give_frames_basins_and_the_phi_free_energy_difference():
    phi = np.radians([-150.0, -60.0, -90.0, 60.0])
    m = md_metrics(phi, np.zeros(4), KT)
    assert m["frames"] == 4
    assert m["basins"] == {"C5/beta": 0.25, "C7eq/alphaR": 0.5, "phi>0 (C7ax/alphaL)": 0.25}
    assert m["delta_f_phi_kjmol"] == pytest.approx(-KT * math.log(1 / 3), rel=1e-12)


def test_md_metrics_without_a_positive_phi_frame_give_no_free_energy_difference():
    assert md_metrics(np.radians([-150.0, -60.0]), np.zeros(2), KT)["delta_f_phi_kjmol"] is None


# -- sample_metrics ---------------------------------------------------------------------------


def test_non_finite_energies_count_as_above_the_cut_and_in_the_median(start):
    x = with_phi(start, [-150.0, -60.0, 60.0, 70.0])
    m = sample_metrics(x, np.array([1.0, 2.0, np.nan, 1000.0]), np.zeros(4), x, kt=KT, e_cut=500.0)
    assert m["samples"] == 4
    assert m["below_e_cut"] == 0.5
    assert m["energy_median_kjmol"] == pytest.approx(501.0)  # median of 1, 2, 1000, inf


def test_equal_log_weights_give_full_ess_and_ess_percent_is_100_ess_over_n(start):
    x = with_phi(start, [-150.0, -60.0, 60.0, 70.0])
    m = sample_metrics(x, np.zeros(4), np.zeros(4), x, kt=KT, e_cut=500.0)
    assert m["effective_samples"] == pytest.approx(4.0, rel=1e-12) and m["ess_percent"] == pytest.approx(100.0, rel=1e-12)
    m = sample_metrics(x, np.zeros(4), W_1_1_2_0, x, kt=KT, e_cut=500.0)
    assert m["effective_samples"] == pytest.approx(8 / 3, rel=1e-12)
    assert m["ess_percent"] == pytest.approx(100.0 * m["effective_samples"] / 4, rel=1e-12)
    assert m["reweighting_reliable"] is False  # 8/3 effective samples, far below 100


def test_the_phi_psi_kl_of_the_reference_to_itself_is_zero_and_to_another_basin_is_large(start):
    reference = with_phi(start, [-150.0, -60.0, -90.0, -100.0])
    same = sample_metrics(reference, np.zeros(4), np.zeros(4), reference, kt=KT, e_cut=500.0)
    assert abs(same["phi_psi_kl"]) < 1e-6
    elsewhere = with_phi(start, [60.0, 70.0, 80.0, 90.0])
    other = sample_metrics(elsewhere, np.zeros(4), np.zeros(4), reference, kt=KT, e_cut=500.0)
    assert other["phi_psi_kl"] > 10.0  # the 1e-6 floor per cell makes it finite: ln(1e6) ~ 13.8


def test_basins_are_counted_and_reweighted_and_sum_to_one(start):
    x = with_phi(start, [-150.0, -60.0, 60.0, 70.0])
    m = sample_metrics(x, np.zeros(4), W_1_1_2_0, x, kt=KT, e_cut=500.0)
    assert m["basins"] == pytest.approx({"C5/beta": 0.25, "C7eq/alphaR": 0.25, "phi>0 (C7ax/alphaL)": 0.5})
    assert m["basins_reweighted"] == pytest.approx({"C5/beta": 0.25, "C7eq/alphaR": 0.25, "phi>0 (C7ax/alphaL)": 0.5})
    assert sum(m["basins_reweighted"].values()) == pytest.approx(1.0, rel=1e-12)


def test_the_reweighted_phi_free_energy_difference_uses_the_weights(start):
    x = with_phi(start, [-150.0, -60.0, 60.0, 70.0])
    balanced = sample_metrics(x, np.zeros(4), W_1_1_2_0, x, kt=KT, e_cut=500.0)
    assert balanced["delta_f_phi_kjmol"] == pytest.approx(0.0, abs=1e-12)
    one_in_three = sample_metrics(x, np.zeros(4), W_1_2_1_0, x, kt=KT, e_cut=500.0)
    assert one_in_three["delta_f_phi_kjmol"] == pytest.approx(-KT * math.log(1 / 3), rel=1e-12)


def test_no_sample_at_positive_phi_gives_no_free_energy_difference(start):
    x = with_phi(start, [-150.0, -60.0, -90.0])
    m = sample_metrics(x, np.zeros(3), np.zeros(3), x, kt=KT, e_cut=500.0)
    assert m["delta_f_phi_kjmol"] is None


def test_the_ess_interval_brackets_the_estimate_and_narrows_with_more_samples():
    from bgflow_gate.systems.analysis import ess_percent_interval, kish_ess

    rng = np.random.default_rng(3)
    widths = []
    for n in (2_000, 32_000):
        log_w = rng.normal(0.0, 1.0, n)  # log-normal weights: ESS = exp(-1) = 36.8 % of n
        lo, hi = ess_percent_interval(log_w)
        assert lo < 100 * kish_ess(log_w) / n < hi
        assert lo < 100 * math.exp(-1.0) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # 16x the samples: about a quarter of the width
