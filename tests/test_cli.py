"""Specification of the ``bgflow-gate`` command line."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from bgflow_gate.cli import build_parser, main
from bgflow_gate.units import kt_in_kjmol
from formulas import three_stage_formula

REPO_CONFIG = str(Path(__file__).parents[1] / "bgflow_gate" / "experiments.yaml")


def run(capsys, *argv):
    """Run ``bgflow-gate argv``; return (exit status, stdout, stderr)."""
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys, *argv):
    status, out, err = run(capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out)


# -- tables --------------------------------------------------------------------------------


def test_schedule_without_options_prints_the_default_three_stage_table(capsys):
    status, out, err = run(capsys, "schedule")
    assert status == 0
    assert err == ""
    assert "ThreeStageSchedule(e_initial=1e+10, e_final=100000, hold_epochs=50, warmup_epochs=300)" in out
    for value in ("1.0000e+10", "5.6234e+08", "3.1623e+07", "1.7783e+06", "1.0000e+05"):
        assert value in out


def test_schedule_of_an_experiment_from_the_config_file(capsys):
    status, out, _ = run(capsys, "schedule", "--experiment", "legacy_linear", "--config", REPO_CONFIG)
    assert status == 0
    assert "LinearSchedule(e_initial=1e+07, e_final=10000, epochs=100)" in out
    assert "5.0050e+06" in out


def test_options_override_the_default_schedule(capsys):
    status, out, _ = run(capsys, "schedule", "--warmup-epochs", "500")
    assert status == 0
    assert "warmup_epochs=500" in out
    assert "50 <= epoch < 500" in out


def test_options_override_an_experiments_schedule(capsys):
    data = run_json(
        capsys, "schedule", "--experiment", "lenient", "--config", REPO_CONFIG, "--e-final", "1e4"
    )
    assert data["schedule"] == {
        "type": "three_stage",
        "e_initial": 1e10,
        "e_final": 1e4,
        "hold_epochs": 50,
        "warmup_epochs": 500,
    }


def test_type_linear_with_epochs_and_at_list(capsys):
    status, out, _ = run(capsys, "schedule", "--type", "linear", "--epochs", "10", "--at", "0,5,10")
    assert status == 0
    rows = [line.split() for line in out.splitlines()[-3:]]
    assert rows == [
        ["0", "descent", "1.0000e+07"],
        ["5", "descent", "5.0050e+06"],
        ["10", "final", "1.0000e+04"],
    ]


def test_type_constant_with_value(capsys):
    data = run_json(capsys, "schedule", "--type", "constant", "--value", "3e4", "--at", "0,100")
    assert [row["e_max_kjmol"] for row in data["table"]] == [3e4, 3e4]


def test_temperature_adds_a_kt_column_to_the_table(capsys):
    status, out, _ = run(capsys, "schedule", "--temperature", "300", "--at", "300")
    assert status == 0
    assert "E_max [kT @ 300 K]" in out
    assert out.splitlines()[-1].split() == ["300", "final", "1.0000e+05", "4.0091e+04"]


# -- JSON ------------------------------------------------------------------------------------


def test_json_has_the_schedule_dict_and_a_row_per_default_epoch(capsys):
    data = run_json(capsys, "schedule")
    assert data["schedule"] == {
        "type": "three_stage",
        "e_initial": 1e10,
        "e_final": 1e5,
        "hold_epochs": 50,
        "warmup_epochs": 300,
    }
    assert [row["epoch"] for row in data["table"]] == [0, 50, 112.5, 175, 237.5, 300]
    assert [row["stage"] for row in data["table"]] == ["hold", "warm-up", "warm-up", "warm-up", "warm-up", "final"]
    for row in data["table"]:
        assert row["e_max_kjmol"] == pytest.approx(three_stage_formula(row["epoch"]), rel=1e-9)
        assert "e_max_kt" not in row


def test_json_quarter_points_are_the_formula_values(capsys):
    data = run_json(capsys, "schedule", "--at", "112.5,175,237.5")
    values = [row["e_max_kjmol"] for row in data["table"]]
    assert values == pytest.approx([5.6234132519e8, 3.16227766e7, 1.77827941e6], rel=1e-9)


def test_json_with_temperature_adds_e_max_in_kt(capsys):
    data = run_json(capsys, "schedule", "--temperature", "300", "--at", "0,300")
    kt = kt_in_kjmol(300)
    for row in data["table"]:
        assert row["e_max_kt"] == pytest.approx(row["e_max_kjmol"] / kt, rel=1e-9)
    assert data["table"][-1]["e_max_kt"] == pytest.approx(4.0091e4, rel=1e-4)


# -- errors: exit status 2 and a message on stderr --------------------------------------------


def assert_fails(capsys, argv, *fragments):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    for fragment in fragments:
        assert fragment in err


def test_option_that_does_not_apply_to_the_type_is_an_error(capsys):
    assert_fails(
        capsys,
        ["schedule", "--type", "linear", "--hold-epochs", "5"],
        "bgflow-gate schedule: error:",
        "--hold-epochs does not apply to a linear schedule",
    )


def test_value_option_does_not_apply_to_the_default_schedule(capsys):
    assert_fails(capsys, ["schedule", "--value", "5"], "--value does not apply to a three_stage schedule")


def test_e_final_above_e_initial_is_an_error(capsys):
    assert_fails(
        capsys, ["schedule", "--e-initial", "1e4", "--e-final", "1e5"], "e_final", "must not exceed e_initial"
    )


def test_hold_epochs_not_below_warmup_epochs_is_an_error(capsys):
    assert_fails(capsys, ["schedule", "--hold-epochs", "300"], "hold_epochs", "warmup_epochs")


def test_unknown_experiment_is_an_error_listing_available_ones(capsys):
    assert_fails(
        capsys,
        ["schedule", "--experiment", "nope", "--config", REPO_CONFIG],
        "no experiment named 'nope'",
        "available: aa_300_450_cpu, aa_300_450_gpu, aa_vacuum_is, aa_vacuum_kl, default, legacy_linear, lenient",
    )


def test_missing_config_file_is_an_error(capsys, tmp_path):
    missing = str(tmp_path / "missing.yaml")
    assert_fails(capsys, ["schedule", "--experiment", "default", "--config", missing], "does not exist")


def test_schedule_of_an_experiment_without_config_reads_the_packaged_file_from_any_directory(capsys, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = run_json(capsys, "schedule", "--experiment", "lenient")
    assert data["schedule"]["e_final"] == 1e6 and data["schedule"]["warmup_epochs"] == 500


def test_a_directory_as_config_says_it_is_a_directory(capsys, tmp_path):
    assert_fails(capsys, ["schedule", "--experiment", "default", "--config", str(tmp_path)],
                 f"experiments file {tmp_path} is a directory; pass the YAML file itself to --config")


def test_a_binary_config_says_it_is_not_a_text_file(capsys, tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(bytes(range(256)))
    assert_fails(capsys, ["schedule", "--experiment", "default", "--config", str(path)],
                 "is not a text file (YAML expected)")


@pytest.mark.parametrize("preset", ["default", "legacy_linear", "lenient"])
def test_train_refuses_a_schedule_preset_saying_what_it_is_for(capsys, preset, tmp_path):
    assert_fails(capsys, ["train", "--experiment", preset, "--out", str(tmp_path / "run")],
                 f"'{preset}' is a schedule preset, not an experiment to train",
                 f"bgflow-gate schedule --experiment {preset}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_threads_must_be_a_whole_number_of_at_least_one(capsys, bad):
    status, _, err = run(capsys, "train", "--experiment", "smoke", "--threads", bad)
    assert status == 2 and "expected a whole number of threads >= 1" in err


def test_threads_sets_torch_and_openmm_threads(monkeypatch):
    import os

    import torch

    from bgflow_gate.cli import _configure_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OPENMM_CPU_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        assert _configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENMM_CPU_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_third_party_banners_stay_out_of_the_output(tmp_path):
    """pymbar (through openmmtools) logs a timeseries warning and a JAX banner on import."""
    import sys

    code = "import sys; from bgflow_gate.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "check-data", str(tmp_path / "none.npz")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"bgflow-gate check-data: error: no dataset at {tmp_path / 'none.npz'}\n"


@pytest.mark.parametrize("bad", ["0,abc", "ten"])
def test_bad_at_list_is_an_error(capsys, bad):
    assert_fails(capsys, ["schedule", "--at", bad], "--at", "comma-separated epochs")


def test_negative_epoch_in_at_list_is_an_error(capsys):
    assert_fails(capsys, ["schedule", "--at=-5"], "epoch must be a non-negative")


def test_bad_temperature_is_an_error(capsys):
    assert_fails(capsys, ["schedule", "--temperature", "0"], "temperature")


def test_unknown_type_is_an_error(capsys):
    assert_fails(capsys, ["schedule", "--type", "cosine"], "invalid choice: 'cosine'")


def test_missing_command_is_an_error(capsys):
    status, _, err = run(capsys)
    assert status == 2
    assert "COMMAND" in err


def test_constant_type_without_value_is_an_error_not_a_crash(capsys):
    assert_fails(capsys, ["schedule", "--type", "constant"], "bgflow-gate schedule: error:", "value")


def test_version_option_prints_the_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0
    assert out.startswith("bgflow-gate ")


def test_parser_program_name_is_bgflow_gate():
    assert build_parser().prog == "bgflow-gate"


# -- the installed console script --------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bgflow-gate") is None, reason="console script not installed")
def test_the_installed_command_finds_its_experiments_from_any_directory(tmp_path):
    result = subprocess.run([shutil.which("bgflow-gate"), "schedule", "--experiment", "legacy_linear", "--at", "50"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == ["50", "descent", "5.0050e+06"]


@pytest.mark.skipif(shutil.which("bgflow-gate") is None, reason="console script not installed")
def test_installed_console_script_prints_the_schedule():
    result = subprocess.run(
        [shutil.which("bgflow-gate"), "schedule", "--at", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ThreeStageSchedule(" in result.stdout
    assert result.stdout.splitlines()[-1].split() == ["0", "hold", "1.0000e+10"]
