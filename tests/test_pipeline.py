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
from bgflow_gate import ProgressiveKLTrainer  # noqa: E402
from tiny_runs import tiny_experiment  # noqa: E402

TINY = tiny_experiment(
    "tiny", model="{n_torsion_layers: 2, n_rest_layers: 2, hidden: 16, n_bins: 4, dtype: float64}",
    training="{batch_size: 16, iters_per_epoch: 2, nll_epochs: 3, mixed_epochs: 3, warmup_epochs: 1}",
    energy="{platform: Reference}",
)


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


def test_resume_refuses_changed_settings_naming_each_key_and_both_values(config, data_dir, finished, tmp_path):
    out, _ = finished
    message = r"settings changed .*\(training\.batch_size: 16 in the run, 8 now; training\.lr: 0\.001 in the run, 0\.5 now\)"
    with pytest.raises(RunError, match=message):
        train_experiment(settings_of(config, training={"lr": 0.5, "batch_size": 8}), out, data_dir=data_dir,
                         resume=True, progress=False, log=lambda _: None)


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
    original = ProgressiveKLTrainer.train

    def kill(trainer, record):
        if trainer.gate is not None and len(trainer.history) == 2:  # second epoch of the mixed stage
            raise KeyboardInterrupt

    def train_and_kill(self, *args, on_epoch_end=(), **kwargs):
        callbacks = [on_epoch_end] if callable(on_epoch_end) else list(on_epoch_end)
        return original(self, *args, on_epoch_end=[*callbacks, kill], **kwargs)

    monkeypatch.setattr(ProgressiveKLTrainer, "train", train_and_kill)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_experiment(settings_of(config), out, data_dir=data_dir, progress=False, log=lambda _: None)
    progress = json.loads((out / "progress.json").read_text())
    assert "control" in progress and "mixed" not in progress
    monkeypatch.setattr(ProgressiveKLTrainer, "train", original)
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


# -- the run directory: lock, finished runs, failed starts, bad --out -----------------------------------


def test_a_second_process_on_a_locked_run_gets_an_error_naming_the_holder(config, data_dir, finished):
    import os

    from bgflow_gate.pipeline import RunLock

    out, _ = finished
    holder = RunLock(out)
    holder.acquire()
    try:
        with pytest.raises(RunError, match=rf"{out} is in use by process {os.getpid()} "):
            train_experiment(settings_of(config), out, data_dir=data_dir, resume=True, progress=False,
                             log=lambda _: None)
    finally:
        holder.release()


def test_resume_on_a_finished_run_says_so_and_evaluates_nothing(config, data_dir, finished):
    out, summary = finished
    before = (out / "evaluation.npz").stat().st_mtime_ns
    lines = []
    again = train_experiment(settings_of(config), out, data_dir=data_dir, resume=True, progress=False, log=lines.append)
    assert lines == [f"the run in {out} finished earlier; nothing to resume ('bgflow-gate report {out}' "
                     "re-draws its plots)"]
    assert again == summary and (out / "evaluation.npz").stat().st_mtime_ns == before


def test_a_start_that_failed_before_training_does_not_block_the_same_command(config, data_dir, tmp_path, monkeypatch):
    import bgflow_gate.pipeline as pipeline

    def failing_run(*args):
        raise ValueError("data failed")

    out = tmp_path / "failed_start"
    monkeypatch.setattr(pipeline, "_run", failing_run)
    with pytest.raises(ValueError, match="data failed"):
        train_experiment(settings_of(config), out, data_dir=data_dir, progress=False, log=lambda _: None)
    assert (out / "settings.json").is_file()
    monkeypatch.setattr(pipeline, "_run", lambda *args: {"ran": True})
    assert train_experiment(settings_of(config), out, data_dir=data_dir, progress=False, log=lambda _: None) == {"ran": True}


def test_a_directory_with_other_files_is_still_refused(config, data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="already holds files; pass --resume"):
        train_experiment(settings_of(config), tmp_path, data_dir=data_dir, progress=False, log=lambda _: None)
    assert not (tmp_path / "settings.json").exists()


def test_an_out_that_is_a_file_is_an_error_and_the_file_is_untouched(config, tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--experiment", "tiny", "--config", str(config), "--out", str(path), "--quiet"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"bgflow-gate train: error: --out {path} is a file; pass a directory for the run\n"
    assert path.read_text() == "keep me"


def test_an_out_that_cannot_be_created_is_an_error_naming_it(config, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--experiment", "tiny", "--config", str(config), "--out", str(tmp_path / "file" / "run"), "--quiet"])
    assert exc.value.code == 2
    assert f"cannot create the run directory {tmp_path / 'file' / 'run'}" in capsys.readouterr().err


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes into read-only directories")
def test_resume_and_report_on_a_read_only_run_are_errors_that_say_so(config, data_dir, finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "read_only"
    shutil.copytree(finished[0], out)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        with pytest.raises(RunError, match=f"the run directory {out} is read-only"):
            train_experiment(settings_of(config), out, data_dir=data_dir, resume=True, progress=False,
                             log=lambda _: None)
        with pytest.raises(SystemExit):
            main(["report", str(out)])
        assert "cannot write the plots" in capsys.readouterr().err
    finally:
        for path in [out, *out.rglob("*")]:
            path.chmod(0o755)


def test_report_on_a_run_whose_plots_cannot_be_written_is_an_error_saying_what_to_do(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished[0], out, ignore=shutil.ignore_patterns("plots"))
    (out / "plots").write_text("a file where the plots go")
    with pytest.raises(SystemExit) as exc:
        main(["report", str(out)])
    assert exc.value.code == 2
    assert "cannot write the plots into" in capsys.readouterr().err


def test_the_summary_names_its_numbers_and_flags_reweighting_on_few_effective_samples(finished):
    _, summary = finished
    for stage in TRAINING_STAGES:
        m = summary["metrics"][stage]
        assert "ess" not in m and m["effective_samples"] == pytest.approx(m["ess_percent"] * m["samples"] / 100)
        assert m["reweighting_reliable"] is (m["effective_samples"] >= 100)
    assert summary["mixed_vs_control"]["phi_psi_kl_noise"] == 0.1
    for key in ("effective_samples", "reweighting_reliable", "phi_psi_kl_noise", "delta_f_phi_kjmol"):
        assert key in summary["glossary"]


def test_the_printed_table_marks_free_energies_from_too_few_effective_samples(finished):
    from bgflow_gate.report import format_summary

    text = format_summary(finished[1])
    assert "* reweighted from fewer than 100 effective samples: unreliable" in text
    assert "eff. samples" in text.splitlines()[0]


def test_report_on_a_run_with_a_damaged_evaluation_says_how_to_evaluate_again(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "damaged_evaluation"
    shutil.copytree(finished[0], out)
    (out / "evaluation.npz").write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit) as exc:
        main(["report", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert f"{out / 'evaluation.npz'} is damaged" in err and f"delete {out / 'summary.json'}" in err


def test_report_reads_a_summary_written_with_the_old_names(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "old_names"
    shutil.copytree(finished[0], out)
    summary = json.loads((out / "summary.json").read_text())
    for key in TRAINING_STAGES:
        summary["metrics"][key]["ess"] = summary["metrics"][key].pop("effective_samples")
        del summary["metrics"][key]["reweighting_reliable"]
    summary["mixed_vs_control"]["kl_noise_level"] = summary["mixed_vs_control"].pop("phi_psi_kl_noise")
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(out)]) == 0
    assert "(noise ~0.1)" in capsys.readouterr().out


def test_by_default_the_mixed_stage_and_the_evaluation_use_the_torch_energy_and_the_summary_says_why(finished):
    _, summary = finished
    assert summary["route"] == "nll_then_mixed"
    assert summary["energy"]["target"] == ("energy: torch (TorchEnergy on the run's device; energy.backend auto, "
                                           "and TorchEnergy supports every force of this system)")


@pytest.mark.slow
def test_nll_patience_stops_the_nll_stage_and_keeps_its_best_epoch(config, data_dir, tmp_path, monkeypatch):
    from bgflow_gate.training import EarlyStopping

    script, weights = iter([3.0, 2.0, 2.5, 2.7, 1.0, 1.0]), []

    def scripted(self, generator):
        weights.append({k: v.clone() for k, v in generator.flow.state_dict().items()})
        return next(script)

    monkeypatch.setattr(EarlyStopping, "held_out_nll", scripted)
    settings = settings_of(config, training={"nll_epochs": 6, "nll_patience": 2, "mixed_epochs": 2,
                                             "mixed_lr_floor": 0.1})
    out, lines = tmp_path / "stopped", []
    summary = train_experiment(settings, out, data_dir=data_dir, progress=False, log=lines.append)
    assert summary["stages"]["nll"]["epochs"] == 4  # best after epoch 1 (of 0..), two more without
    assert any("[nll] kept epoch 2 (test NLL 2.000; 4 epochs trained, patience 2)" in line for line in lines)
    kept = torch.load(out / "models" / "nll.pt")
    assert all(torch.equal(kept[k], weights[1][k]) for k in kept)
    lrs = {stage: read_history(out / f"history_{stage}.csv")["lr"] for stage in ("control", "mixed")}
    assert lrs["control"].tolist() == lrs["mixed"].tolist()
    assert lrs["mixed"][-1] < lrs["mixed"][0] <= settings["training"]["mixed_lr"]


@pytest.mark.slow
def test_rollback_tolerance_rolls_a_gated_stage_back_and_the_log_and_progress_say_so(config, data_dir, tmp_path,
                                                                                   monkeypatch):
    from bgflow_gate.training import RollbackOnRise

    original, losses = RollbackOnRise.__call__, iter([9.0, 9.0, 5.0, 4.0, 9.0])

    def scripted(self, trainer, record):
        record["kll"] = next(losses)
        return original(self, trainer, record)

    monkeypatch.setattr(RollbackOnRise, "__call__", scripted)
    settings = settings_of(config, training={"mixed_epochs": 5, "rollback_tolerance": 1.0})
    out, lines = tmp_path / "rolled", []
    summary = train_experiment(settings, out, data_dir=data_dir, progress=False, log=lines.append)
    assert "[mixed] rolled back to epoch 3: KL loss 9 > best 4 + 1" in lines  # epochs 0-1: the gate's warm-up
    assert summary["stages"]["mixed"]["actions"] == ["rolled back to epoch 3: KL loss 9 > best 4 + 1"]
    assert "actions" not in summary["stages"]["control"]


@pytest.mark.slow
def test_a_run_killed_right_after_a_rollback_resumes_to_the_weights_put_back(config, data_dir, tmp_path, monkeypatch):
    from bgflow_gate.training import RollbackOnRise

    original_call, original_train = RollbackOnRise.__call__, ProgressiveKLTrainer.train
    script = {}

    def scripted(self, trainer, record):
        record["kll"] = script["losses"][record["epoch"]]
        return original_call(self, trainer, record)

    def kill_after_rollback(trainer, record):
        if record["actions"] and trainer.gate is not None:
            raise KeyboardInterrupt

    def train_and_kill(self, *args, on_epoch_end=(), **kwargs):
        return original_train(self, *args, on_epoch_end=[*on_epoch_end, kill_after_rollback], **kwargs)

    monkeypatch.setattr(RollbackOnRise, "__call__", scripted)
    settings = settings_of(config, training={"mixed_epochs": 5, "rollback_tolerance": 1.0})
    script["losses"] = [9.0, 9.0, 5.0, 4.0, 9.0]
    reference = tmp_path / "whole"
    train_experiment(settings, reference, data_dir=data_dir, progress=False, log=lambda _: None)
    monkeypatch.setattr(ProgressiveKLTrainer, "train", train_and_kill)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_experiment(settings, killed, data_dir=data_dir, progress=False, log=lambda _: None)
    monkeypatch.setattr(ProgressiveKLTrainer, "train", original_train)
    train_experiment(settings, killed, data_dir=data_dir, resume=True, progress=False, log=lambda _: None)
    got, want = torch.load(killed / "models" / "mixed.pt"), torch.load(reference / "models" / "mixed.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)
