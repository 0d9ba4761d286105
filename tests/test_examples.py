"""The runnable examples work and show what they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gate_walkthrough_shows_the_legacy_schedule_gating_everything_and_the_default_not(capsys):
    gated = load("gate_walkthrough").main(["--epochs", "300", "--every", "50", "--batch", "256"])
    out = capsys.readouterr().out
    # epochs 0, 50, 100, 150, 200, 250, 300
    assert all(f >= 0.99 for f in gated["legacy"][:3])
    assert all(f < 0.1 for f in gated["three-stage"])
    assert gated["three-stage"][-1] == 1 / 256  # only the crashed (NaN) sample
    assert "three-stage: 99 % or more of the batch gated at 0 of 7 epochs shown" in out
    assert "non-finite coordinates 7" in out


def test_progressive_training_toy_shows_the_stall_the_fix_and_the_remedy(capsys):
    runs = load("progressive_training_toy").main(["--epochs", "25"])
    out = capsys.readouterr().out
    assert all(r["skip_rate"] == 1.0 for r in runs["legacy + batch"])
    assert all(r["skip_rate"] == 1.0 and r["steps_skipped"] == r["batches"] for r in runs["legacy + step"])
    assert runs["legacy + drop"][0]["skip_rate"] == 1.0 and runs["legacy + drop"][-1]["skip_rate"] == 0.0
    assert runs["legacy + drop"][-1]["energy_p50"] < 10.0
    assert sum(r["batches_skipped"] for r in runs["three-stage + drop"]) == 0
    assert runs["relax"][-1]["skip_rate"] == 0.0
    assert "every KL batch was skipped for 20 epochs" in out
    assert "remedy:  epoch 2: relaxed E_max by x100" in out


def test_the_alanine_dipeptide_recipe_runs_end_to_end_on_a_small_budget(tmp_path, capsys):
    import pytest

    pytest.importorskip("openmmtools")
    results = load("alanine_dipeptide").main(
        ["--nll-iters", "30", "--mixed-iters", "10", "--frames", "200", "--blocks", "2", "--hidden", "32",
         "--data-dir", str(tmp_path)]
    )
    assert list(results) == ["NLL model", "control (NLL only)", "KLTrainer (mixed)", "ProgressiveKLTrainer (mixed)"]
    for metrics in results.values():
        assert 0.0 <= metrics["below_e_cut"] <= 1.0 and metrics["phi_psi_kl"] >= 0.0
        assert 0.0 < metrics["ess_percent"] <= 100.0
    assert "ProgressiveKLTrainer (mixed)" in capsys.readouterr().out


def test_compare_schedules_shows_the_legacy_stall_and_writes_the_plots(tmp_path, capsys):
    import pytest

    pytest.importorskip("openmmtools")
    pytest.importorskip("matplotlib")
    runs = load("compare_schedules").main(
        ["--epochs", "6", "--iters-per-epoch", "2", "--frames", "200", "--blocks", "2", "--hidden", "32",
         "--data-dir", str(tmp_path), "--out", str(tmp_path / "cmp.png")]
    )
    assert list(runs) == ["no gate", "legacy + step", "three-stage, +entropy", "three-stage", "adaptive"]
    assert all(r["skip_rate"] == 1.0 for r in runs["legacy + step"])  # untrained energies >> 1e7 kJ/mol
    assert all(r["skip_rate"] == 0.0 for r in runs["three-stage"][:3])  # E_max 1e10 while they fall
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    assert "legacy + step" in capsys.readouterr().out


def test_compare_schedules_physical_story_trains_by_reverse_kl_alone_and_evaluates_against_md(tmp_path, capsys):
    import pytest

    pytest.importorskip("openmmtools")
    pytest.importorskip("matplotlib")
    result = load("compare_schedules").main(
        ["--story", "physical", "--epochs", "6", "--iters-per-epoch", "2", "--batch", "64", "--eval-samples", "400",
         "--frames", "200", "--data-dir", str(tmp_path), "--out", str(tmp_path / "phys.png")]
    )
    history, metrics = result["history"], result["metrics"]
    assert len(history) == 6 and all(r["skip_rate"] == 0.0 for r in history)
    assert all(r["nll"] != r["nll"] for r in history)  # no NLL: reverse KL alone, no data
    assert history[0]["energy_p50"] < 2000  # the physical start: median ~400 kJ/mol
    assert metrics["samples"] == 400 and metrics["below_e_cut"] > 0.5
    assert (tmp_path / "phys.png").stat().st_size > 10_000
    assert "below E_cut" in capsys.readouterr().out
