"""HealthMonitor: each warning sign of a stalled gated training fires once, with numbers."""

from __future__ import annotations

import math
import warnings

import pytest

from bgflow_gate import HealthMonitor, TrainingHealthWarning


def record(epoch, batches=10, skipped=0, p50=1e3, logdet=float("nan"), kll=float("nan"), nll=float("nan"), e_max=1e5):
    return {
        "epoch": epoch, "batches": batches, "batches_skipped": skipped,
        "skip_rate": skipped / batches if batches else 0.0, "energy_p50": p50,
        "logdet_mean": logdet, "kll": kll, "nll": nll, "e_max": e_max,
    }


def run(monitor, records, stage="final"):
    """Feed records one epoch at a time; return {check: epoch it fired}."""
    fired = {}
    history = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for r in records:
            history.append(r)
            for name, message in monitor.check(history, stage):
                fired[name] = (r["epoch"], message)
    assert all(issubclass(w.category, TrainingHealthWarning) for w in caught)
    assert len(caught) == len(fired)  # one warning per check
    return fired


def test_all_skipped_fires_once_after_stall_epochs_in_a_row():
    fired = run(HealthMonitor(stall_epochs=4), [record(e, skipped=10) for e in range(10)])
    epoch, message = fired["all_skipped"]
    assert epoch == 3
    assert "every KL batch was skipped for 4 epochs (E_max 1e+05 kJ/mol, median raw energy 1e+03 kJ/mol)" in message


def test_all_skipped_is_not_fooled_by_one_applied_batch():
    records = [record(e, skipped=10 if e != 2 else 9) for e in range(5)]
    assert "all_skipped" not in run(HealthMonitor(stall_epochs=4), records)


def test_skip_rate_above_the_stages_expected_level_fires_after_the_window():
    records = [record(e, skipped=2) for e in range(6)]  # 20 %: above 10 %, below the warm-up's 25 %
    epoch, message = run(HealthMonitor(skip_window=3), records, stage="final")["skip_rate_high"]
    assert epoch == 2 and "KL skip rate 20% has been above 10%, the expected level of the final stage" in message
    assert "skip_rate_high" not in run(HealthMonitor(skip_window=3), records, stage="warm-up")
    custom = HealthMonitor(skip_window=3, expected_skip_rate={"final": 0.5})
    assert "skip_rate_high" not in run(custom, records, stage="final")


def test_a_median_energy_rising_by_a_decade_over_the_window_fires():
    rising = [record(e, p50=10 ** (3 + 0.25 * e)) for e in range(8)]
    epoch, message = run(HealthMonitor(energy_window=6), rising)["energy_rising"]
    assert epoch == 5  # 1.25 decades over epochs 0..5
    assert "the median raw energy rose from 1e+03 to 1.78e+04 kJ/mol over 6 epochs" in message
    falling = [record(e, p50=10 ** (8 - 0.5 * e)) for e in range(8)]
    assert "energy_rising" not in run(HealthMonitor(energy_window=6), falling)


def test_a_log_det_that_does_not_change_means_the_flow_is_frozen():
    frozen = [record(e, logdet=1.25) for e in range(5)]
    epoch, message = run(HealthMonitor(flat_window=5), frozen)["logdet_flat"]
    assert epoch == 4 and "the mean log-det stayed at 1.25 for 5 epochs" in message
    moving = [record(e, logdet=1.25 + 1e-3 * e) for e in range(5)]
    assert "logdet_flat" not in run(HealthMonitor(flat_window=5), moving)


def test_a_loss_that_stops_improving_fires_after_the_patience():
    improving = [record(e, kll=100.0 - e) for e in range(30)]
    assert "loss_flat" not in run(HealthMonitor(loss_patience=5), improving)
    plateau = [record(e, kll=max(100.0 - e, 90.0)) for e in range(30)]
    epoch, message = run(HealthMonitor(loss_patience=5), plateau)["loss_flat"]
    assert epoch == 15 and "the KLL loss has not improved on 90 for 5 epochs" in message
    nll_only = [record(e, nll=max(5.0 - e, 1.0)) for e in range(12)]
    assert "NLL loss" in run(HealthMonitor(loss_patience=5), nll_only)["loss_flat"][1]


def test_rearm_lets_a_check_fire_again_on_later_epochs_and_state_round_trips():
    monitor = HealthMonitor(stall_epochs=2)
    history = [record(0, skipped=10), record(1, skipped=10)]
    with pytest.warns(TrainingHealthWarning):
        assert [n for n, _ in monitor.check(history, "final")] == ["all_skipped"]
    monitor.rearm("all_skipped", 2)
    history.append(record(2, skipped=10))
    assert monitor.check(history, "final") == []  # only epoch 2 counts since re-arming
    history.append(record(3, skipped=10))
    with pytest.warns(TrainingHealthWarning, match="epoch 3"):
        assert [n for n, _ in monitor.check(history, "final")] == ["all_skipped"]
    restored = HealthMonitor(stall_epochs=2)
    restored.load_state_dict(monitor.state_dict())
    assert restored.fired == {"all_skipped": 3}


def test_an_unknown_stage_in_the_expected_skip_rates_is_an_error():
    with pytest.raises(ValueError, match="unknown stage.*warmup; the stages are hold, warm-up"):
        HealthMonitor(expected_skip_rate={"warmup": 0.3})


def test_a_slow_rise_over_five_windows_fires_too_but_a_slow_fall_does_not():
    slow = [record(e, p50=10 ** (6 + 0.03 * e)) for e in range(60)]  # 0.27 decades per 10 epochs
    epoch, message = run(HealthMonitor(energy_window=10), slow)["energy_rising"]
    assert epoch == 49 and "over 50 epochs" in message  # medians of epochs 0-9 and 40-49: 1.2 decades
    falling = [record(e, p50=10 ** (8 - 0.03 * e)) for e in range(60)]
    assert "energy_rising" not in run(HealthMonitor(energy_window=10), falling)
