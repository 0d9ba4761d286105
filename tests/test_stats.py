"""EnergyStatistics: device-side counters and histogram quantiles."""

from __future__ import annotations

import math

import pytest
import torch

from bgflow_gate.stats import EnergyStatistics, GateReason


def update(stats, values, reasons=None):
    e = torch.tensor(values, dtype=torch.float64)
    r = torch.zeros(len(values), dtype=torch.uint8) if reasons is None else torch.tensor(reasons, dtype=torch.uint8)
    stats.update(e, r)


def test_quantiles_match_nearest_rank_within_one_bin_over_many_decades():
    g = torch.Generator().manual_seed(0)
    magnitudes = 10 ** (torch.rand(5000, generator=g, dtype=torch.float64) * 16 - 2)
    signs = torch.where(torch.rand(5000, generator=g) < 0.2, -1.0, 1.0).double()
    values = magnitudes * signs
    stats = EnergyStatistics()
    stats.update(values, torch.zeros(5000, dtype=torch.uint8))
    for q in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0):
        exact = torch.quantile(values, q, interpolation="nearest").item()
        assert abs(stats.quantile(q) - exact) <= 0.0116 * (1 + abs(exact)), q


def test_a_single_value_is_reproduced_exactly():
    stats = EnergyStatistics()
    update(stats, [-123.456])
    assert stats.quantile(0.5) == -123.456
    assert stats.summary()["energy_p90"] == -123.456


def test_non_finite_energies_rank_above_every_finite_one():
    stats = EnergyStatistics()
    update(stats, [1.0, 2.0, math.inf, math.nan], reasons=[0, 0, GateReason.NONFINITE_ENERGY, GateReason.NONFINITE_ENERGY])
    assert stats.quantile(0.0) == 1.0
    assert stats.quantile(1 / 3) == pytest.approx(2.0, rel=0.012)
    assert stats.quantile(1.0) == math.inf
    s = stats.summary()
    assert (s["energy_min"], s["energy_max"], s["nonfinite_energy"]) == (1.0, math.inf, 2)


def test_samples_never_evaluated_are_counted_but_not_ranked():
    stats = EnergyStatistics()
    update(stats, [5.0, math.nan, math.nan], reasons=[0, GateReason.NONFINITE_COORDINATES, GateReason.TARGET_ERROR])
    s = stats.summary()
    assert (s["samples"], s["gated"], s["nonfinite"], s["target_errors"]) == (3, 2, 1, 1)
    assert s["energy_p50"] == s["energy_max"] == 5.0


def test_an_empty_accumulator_reads_out_as_nan():
    s = EnergyStatistics().summary()
    assert s["samples"] == 0
    assert all(math.isnan(s[k]) for k in ("gated_fraction", "energy_min", "energy_p50", "energy_max"))


def test_merge_equals_accumulating_everything_in_one():
    a, b, both = EnergyStatistics(), EnergyStatistics(), EnergyStatistics()
    first, second = [1.0, 1e3, 1e9], [-4.0, 7.0]
    update(a, first, [0, 0, GateReason.OVER_E_MAX])
    update(b, second)
    update(both, first, [0, 0, GateReason.OVER_E_MAX])
    update(both, second)
    a.merge(b)
    assert a.summary() == both.summary()


def test_state_dict_round_trip_keeps_every_number():
    stats = EnergyStatistics()
    update(stats, [3.0, 4e5, math.inf], [0, 1, 2])
    restored = EnergyStatistics()
    restored.load_state_dict(stats.state_dict())
    assert restored.summary() == stats.summary()
    empty = EnergyStatistics()
    empty.load_state_dict(EnergyStatistics().state_dict())
    assert empty.summary()["samples"] == 0


def test_quantile_outside_zero_one_is_an_error():
    with pytest.raises(ValueError, match=r"quantile must lie in \[0, 1\]"):
        EnergyStatistics().quantile(1.5)


def test_the_largest_finite_energy_is_a_quantile_even_when_non_finite_ones_exist():
    stats = EnergyStatistics()
    update(stats, [1.0, 2.0, 3.0, math.inf], reasons=[0, 0, 0, GateReason.NONFINITE_ENERGY])
    assert stats.summary()["energy_max"] == math.inf
    assert stats.quantile(2 / 3) == 3.0


def test_many_small_calls_are_folded_so_the_buffer_stays_small():
    stats = EnergyStatistics()
    for i in range(EnergyStatistics.FOLD_CALLS + 10):
        update(stats, [float(i)])
    assert len(stats._pending) == 10
    assert stats.summary()["samples"] == EnergyStatistics.FOLD_CALLS + 10


def test_history_as_json_lines_writes_null_for_nan_and_infinity(tmp_path):
    import json

    from bgflow_gate.training import write_history

    write_history([{"epoch": 0, "kll": math.nan, "energy_max": math.inf, "alerts": []}], tmp_path / "h.jsonl")
    assert json.loads((tmp_path / "h.jsonl").read_text()) == {"epoch": 0, "kll": None, "energy_max": None, "alerts": []}
