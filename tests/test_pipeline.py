"""``bgflow-gate train`` / ``report``: the run directory, its summary, resuming a killed run."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

pytest.importorskip("openmmtools")

from bgflow_gate.cli import main  # noqa: E402
from bgflow_gate.config import load_experiments, run_settings  # noqa: E402
from bgflow_gate.pipeline import TRAINING_STAGES, RunError, train_experiment  # noqa: E402
from bgflow_gate.report import PLOT_FILES, read_history  # noqa: E402
from bgflow_gate.trainer import ProgressiveKLTrainer  # noqa: E402

TINY = """
tiny:
  device: cpu
  E_cut: 500.0
  E_max: 100000.0
  data: {n_replicas: 3, t_max: 450.0, n_iterations: 60, steps_per_iteration: 20,
         equilibration_iterations: 2, platform: Reference}
  gate:
    schedule: {type: three_stage, e_initial: 1.0e+10, hold_epochs: 1, warmup_epochs: 2}
  model: {n_torsion_layers: 2, n_rest_layers: 2, hidden: 16, n_bins: 4, dtype: float64}
  training: {batch_size: 16, iters_per_epoch: 2, nll_epochs: 3, mixed_epochs: 3, warmup_epochs: 1}
  energy: {platform: Reference}
  evaluation: {n_samples: 64, bins: 20}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "experiments.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def settings_of(config, **changes):
    settings = run_settings(load_experiments(config), "tiny")
    for section, values in changes.items():
        settings[section] = {**settings[section], **values}
    return settings


@pytest.fixture(scope="module")
def finished(config, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    summary = train_experiment(settings_of(config), out, data_dir=data_dir, progress=False, log=lambda _: None)
    return out, summary


def test_a_run_writes_models_histories_evaluation_summary_and_plots(finished):
    out, summary = finished
    for stage in TRAINING_STAGES:
        assert (out / "models" / f"{stage}.pt").is_file()
        assert len(read_history(out / f"history_{stage}.csv")["epoch"]) == 3
    assert (out / "evaluation.npz").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    assert all((out / "plots" / name).stat().st_size > 10_000 for name in PLOT_FILES)


def test_the_summary_holds_finite_metrics_for_the_nll_model_the_control_and_the_mixed_model(finished):
    _, summary = finished
    for stage in TRAINING_STAGES:
        m = summary["metrics"][stage]
        assert m["samples"] == 64
        assert 0.0 <= m["below_e_cut"] <= 1.0
        assert math.isfinite(m["phi_psi_kl"]) and m["phi_psi_kl"] >= 0
        assert 0.0 < m["ess_percent"] <= 100.0
        assert sum(m["basins"].values()) == pytest.approx(1.0)
    comparison = summary["mixed_vs_control"]
    assert comparison["below_e_cut_gain"] == pytest.approx(
        summary["metrics"]["mixed"]["below_e_cut"] - summary["metrics"]["control"]["below_e_cut"]
    )
    assert set(summary["wall_seconds"]) == {"data", "nll", "control", "mixed", "evaluation"}
    assert summary["stages"]["mixed"]["batches"] == 6
    assert summary["targets"]["phi_psi_kl_below_0.5"] == (summary["metrics"]["mixed"]["phi_psi_kl"] < 0.5)


def test_control_and_mixed_start_from_the_nll_model_and_only_the_mixed_stage_is_gated(finished):
    out, _ = finished
    nll = read_history(out / "history_nll.csv")
    control, mixed = read_history(out / "history_control.csv"), read_history(out / "history_mixed.csv")
    assert all(math.isnan(v) for v in control["e_max"])
    assert mixed["e_max"][0] == 1e10 and mixed["e_max"][-1] == 1e5
    assert (mixed["samples"] == 32).all()
    # both continuations start where the NLL stage ended, far below the untrained NLL
    assert abs(control["nll"][0] - nll["nll"][-1]) < abs(nll["nll"][0] - nll["nll"][-1])


def test_an_occupied_run_directory_needs_resume(config, data_dir, finished):
    out, _ = finished
    with pytest.raises(RunError, match="already holds files; pass --resume"):
        train_experiment(settings_of(config), out, data_dir=data_dir, progress=False, log=lambda _: None)


def test_resume_refuses_changed_settings_and_an_empty_directory(config, data_dir, finished, tmp_path):
    out, _ = finished
    with pytest.raises(RunError, match=r"settings changed .*training"):
        train_experiment(settings_of(config, training={"lr": 0.5}), out, data_dir=data_dir, resume=True,
                         progress=False, log=lambda _: None)
    with pytest.raises(RunError, match="nothing to resume"):
        train_experiment(settings_of(config), tmp_path / "new", data_dir=data_dir, resume=True,
                         progress=False, log=lambda _: None)


def test_a_run_killed_in_the_mixed_stage_resumes_to_the_same_weights(config, data_dir, finished, tmp_path, monkeypatch):
    reference, _ = finished
    original = ProgressiveKLTrainer._end_epoch

    def killing_end_epoch(self, ipe, epoch_schedulers):
        record = original(self, ipe, epoch_schedulers)
        if self.gate is not None and len(self.history) == 2:  # second epoch of the mixed stage
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(ProgressiveKLTrainer, "_end_epoch", killing_end_epoch)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_experiment(settings_of(config), out, data_dir=data_dir, progress=False, log=lambda _: None)
    progress = json.loads((out / "progress.json").read_text())
    assert "control" in progress and "mixed" not in progress
    monkeypatch.setattr(ProgressiveKLTrainer, "_end_epoch", original)
    lines = []
    summary = train_experiment(settings_of(config), out, data_dir=data_dir, resume=True, progress=False, log=lines.append)
    assert any("[nll] finished earlier" in line for line in lines)
    assert any("[mixed] resumed" in line and "at epoch 2" in line for line in lines)
    for stage in TRAINING_STAGES:
        got = torch.load(out / "models" / f"{stage}.pt")
        want = torch.load(reference / "models" / f"{stage}.pt")
        assert all(torch.equal(got[k], want[k]) for k in want), stage
    assert len(read_history(out / "history_mixed.csv")["epoch"]) == 3
    assert summary["metrics"]["mixed"]["phi_psi_kl"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["metrics"]["mixed"]["phi_psi_kl"]
    )


def test_the_train_and_report_commands(config, data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--experiment", "tiny", "--config", str(config), "--out", str(out),
            "--data-dir", str(data_dir), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "mixed vs control" in text and "below E_cut" in text
    for path in (out / "plots").iterdir():
        path.unlink()
    assert main(["report", str(out)]) == 0
    assert "plots:" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(PLOT_FILES)


def test_report_on_a_directory_without_a_run_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_a_gpu_experiment_without_cuda_is_an_error_unless_device_cpu(config, tmp_path, capsys):
    path = tmp_path / "gpu.yaml"
    path.write_text(textwrap.dedent(TINY).replace("device: cpu", "device: cuda"))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["train", "--experiment", "tiny", "--config", str(path), "--out", str(tmp_path / "r")])
    assert "pass --device cpu" in capsys.readouterr().err
    assert run_settings(load_experiments(path), "tiny", device="cpu")["device"] == "cpu"


@pytest.mark.slow
def test_train_under_torchrun_with_two_gloo_ranks_trains_the_global_batch(config, data_dir, finished, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "two_ranks"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "bgflow_gate.cli", "train", "--experiment", "tiny", "--config", str(config),
        "--data-dir", str(data_dir), "--out", str(out), "--quiet",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # rank 0 alone reports
    mixed = read_history(out / "history_mixed.csv")
    assert list(mixed["batches"]) == [2, 2, 2]  # global batches: one per iteration
    assert list(mixed["samples"]) == [64, 64, 64]  # 2 iterations x 16 samples x 2 ranks
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"md", *TRAINING_STAGES}
    state = torch.load(out / "checkpoints" / "mixed.pt", weights_only=False)
    assert len(state["ranks"]) == 2 and not any(k.startswith("_flow.module.") for k in state["bg"])
    single = torch.load(finished[0] / "models" / "nll.pt")
    assert single.keys() == torch.load(out / "models" / "nll.pt").keys()  # the same model files
