"""The ``smoke`` experiment of the repository's experiments file, end to end (CI runs it):
data generation included, every file of the run directory, finite metrics, complete histories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("openmmtools")
pytest.importorskip("matplotlib")

from bgflow_gate.cli import main  # noqa: E402
from bgflow_gate.config import load_experiments, run_settings  # noqa: E402
from bgflow_gate.pipeline import TRAINING_STAGES  # noqa: E402
from bgflow_gate.report import PLOT_FILES, read_history  # noqa: E402

REPO_CONFIG = Path(__file__).parents[1] / "bgflow_gate" / "experiments.yaml"


@pytest.mark.slow
def test_the_smoke_experiment_runs_end_to_end_and_its_summary_is_complete(tmp_path, capsys):
    out = tmp_path / "smoke"
    argv = ["train", "--experiment", "smoke", "--config", str(REPO_CONFIG), "--out", str(out),
            "--data-dir", str(tmp_path / "data"), "--quiet"]
    assert main(argv) == 0
    assert "mixed vs control" in capsys.readouterr().out
    settings = run_settings(load_experiments(REPO_CONFIG), "smoke")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "smoke"
    assert all((out / "plots" / name).stat().st_size > 10_000 for name in PLOT_FILES)
    expected_epochs = {"nll": settings["training"]["nll_epochs"], "control": settings["training"]["mixed_epochs"],
                       "mixed": settings["training"]["mixed_epochs"]}
    for stage in TRAINING_STAGES:
        history = read_history(out / f"history_{stage}.csv")
        assert history["epoch"].tolist() == list(range(expected_epochs[stage]))
        assert all(math.isfinite(v) for v in history["nll"])
        m = summary["metrics"][stage]
        assert m["samples"] == settings["evaluation"]["n_samples"]
        for key in ("below_e_cut", "phi_psi_kl", "ess_percent", "energy_median_kjmol"):
            assert math.isfinite(m[key]), (stage, key)
        assert summary["stages"][stage]["epochs"] == expected_epochs[stage]
    assert all(v is not None and v >= 0 for v in summary["wall_seconds"].values())
    assert summary["stages"]["mixed"]["batches"] == settings["training"]["mixed_epochs"] * settings["training"]["iters_per_epoch"]
