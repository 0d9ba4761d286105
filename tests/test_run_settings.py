"""Specification of an experiment's settings for ``bgflow-gate train``: top-level keys, the
seed's shorthands, the model / training / energy / evaluation sections, the device."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bgflow_gate.config import (
    MODEL_DEFAULTS,
    TRAINING_DEFAULTS,
    ConfigError,
    experiment_schedule,
    load_experiments,
    run_settings,
)

REPO_CONFIG = Path(__file__).parents[1] / "bgflow_gate" / "experiments.yaml"


def settings(tmp_path, body: str, **kwargs):
    path = tmp_path / "experiments.yaml"
    path.write_text("exp:\n" + textwrap.indent(textwrap.dedent(body), "  "))
    return run_settings(load_experiments(path), "exp", source=str(path), cuda_available=False, **kwargs)


@pytest.mark.parametrize("name", ["smoke", "aa_300_450_cpu", "aa_300_450_gpu", "aa_vacuum_kl", "aa_vacuum_is"])
def test_every_repository_experiment_validates(name):
    s = run_settings(load_experiments(REPO_CONFIG), name, cuda_available=True)
    assert s["name"] == name
    assert s["gate"]["e_cut"] < s["gate"]["schedule"].to_dict().get("e_final", float("inf"))


def test_the_seed_keys_of_the_gpu_experiment_map_onto_the_gate_and_the_lr_warmup():
    experiments = load_experiments(REPO_CONFIG)
    s = run_settings(experiments, "aa_300_450_gpu", cuda_available=True)
    assert s["use_energy_gating"] is True
    assert s["gate"]["e_cut"] == 500.0
    assert s["gate"]["schedule"].e_final == 1e5  # E_max
    assert s["training"]["warmup_epochs"] == 1  # learning-rate warm-up
    assert s["gate"]["schedule"].warmup_epochs == 6  # the gate's own, configurable
    assert s["device"] == "cuda" and s["data"].solvent == "implicit"
    assert experiment_schedule(REPO_CONFIG, "aa_300_450_gpu").e_final == 1e5


def test_an_empty_experiment_takes_every_default(tmp_path):
    s = settings(tmp_path, "description: defaults\n")
    assert s["model"] == MODEL_DEFAULTS
    assert s["training"] == {**TRAINING_DEFAULTS, "warmup_epochs": 2.0}
    assert s["device"] == "cpu" and s["use_energy_gating"] is True


@pytest.mark.parametrize(
    "body, message",
    [
        ("E_cutt: 500.0\n", r"unknown key\(s\) exp.E_cutt \(did you mean 'E_cut'\?\)"),
        ("training: {warmup_epoch: 5}\n", r"exp.training.warmup_epoch \(did you mean 'warmup_epochs'\?\)"),
        ("model: {hiden: 64}\n", r"exp.model.hiden \(did you mean 'hidden'\?\)"),
        ("training: {lr: fast}\n", r"exp.training.lr must be a positive, finite learning rate, got 'fast'"),
        ("training: {batch_size: 12.5}\n", r"exp.training.batch_size must be a whole number >= 1, got 12.5"),
        ("training: {skip_policy: dorp}\n", r"exp.training.skip_policy must be one of .* \(did you mean 'drop'\?\)"),
        ("training: {w_likelihood: 0.0, w_energy: 0.0}\n", r"w_likelihood \+ w_energy must be positive"),
        ("training: {test_fraction: 1.0}\n", r"exp.training.test_fraction must lie in \(0, 1\)"),
        ("model: {dtype: float16}\n", r"exp.model.dtype must be one of float32, float64"),
        ("energy: {platform: GPU}\n", r"exp.energy.platform must be one of"),
        ("evaluation: {n_samples: 5}\n", r"exp.evaluation.n_samples must be a whole number >= 10"),
        ("use_energy_gating: yes please\n", r"exp.use_energy_gating must be true or false"),
        ("device: tpu\n", r"exp.device must be one of cpu, cuda, auto"),
        ("E_cut: 1.0e+5\nE_max: 1.0e+5\n", r"E_cut \(100000 kJ/mol\) must lie below the final E_max \(100000 kJ/mol\)"),
        ("E_cut: 600.0\ngate: {e_cut: 500.0}\n", r"E_cut \(600\) and gate.e_cut \(500\) disagree"),
        ("E_max: 1.0e+6\ngate: {schedule: {type: three_stage, e_final: 1.0e+5}}\n",
         r"E_max \(1e\+06\) and gate.schedule.e_final \(100000\) disagree"),
        ("E_max: lots\n", r"exp.E_max must be an energy in kJ/mol, got 'lots'"),
    ],
)
def test_bad_settings_are_errors_that_name_the_key(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, body)


def test_e_max_sets_the_value_of_a_constant_schedule(tmp_path):
    s = settings(tmp_path, "E_max: 2.0e+4\ngate: {schedule: {type: constant}}\n")
    assert s["gate"]["schedule"].value == 2e4


def test_null_means_one_pass_per_epoch_and_no_clipping(tmp_path):
    s = settings(tmp_path, "training: {iters_per_epoch: null, max_grad_norm: null, clip_forces: null}\n")
    assert s["training"]["iters_per_epoch"] is None and s["training"]["max_grad_norm"] is None


def test_a_cuda_experiment_without_cuda_is_an_error_unless_the_device_is_overridden(tmp_path):
    with pytest.raises(ConfigError, match="CUDA is not available on this machine; pass --device cpu"):
        settings(tmp_path, "device: cuda\n")
    assert settings(tmp_path, "device: cuda\n", device="cpu")["device"] == "cpu"
    assert settings(tmp_path, "device: auto\n")["device"] == "cpu"


@pytest.mark.parametrize("name", ["default", "legacy_linear", "lenient"])
def test_train_and_data_refuse_a_schedule_preset_saying_what_it_is_for(name):
    from bgflow_gate.config import data_settings

    experiments = load_experiments(REPO_CONFIG)
    message = rf"'{name}' is a schedule preset, not an experiment to train: .*bgflow-gate schedule --experiment {name}"
    with pytest.raises(ConfigError, match=message + ".*experiments: aa_300_450_cpu, aa_300_450_gpu, aa_vacuum_is, aa_vacuum_kl, smoke$"):
        run_settings(experiments, name, cuda_available=True)
    with pytest.raises(ConfigError, match="is a schedule preset, not an experiment to generate data for"):
        data_settings(experiments, name)
    assert experiment_schedule(REPO_CONFIG, name)(0) == 1e10 if name != "legacy_linear" else 1e7


def test_an_unknown_kind_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.kind must be 'experiment' or 'schedule_preset', got 'preset'"):
        settings(tmp_path, "kind: preset\n")


def test_aa_vacuum_is_trains_the_physical_flow_with_early_stopping_then_the_gated_mixed_stage():
    s = run_settings(load_experiments(REPO_CONFIG), "aa_vacuum_is", cuda_available=False)
    assert s["training"]["route"] == "nll_then_mixed" and s["model"]["kind"] == "physical"
    t = s["training"]
    assert (t["nll_patience"], t["batch_size"], t["w_energy"], t["mixed_lr_floor"], t["rollback_tolerance"]) == (
        4, 512, 0.5, 0.1, 0.5)
    assert s["evaluation"]["n_samples"] >= 100_000 and s["energy"]["backend"] == "torch"
    assert s["data"].n_iterations == 40_000  # frames kept at 300 K


def test_aa_vacuum_kl_trains_the_physical_flow_by_reverse_kl_alone_on_the_torch_energy():
    s = run_settings(load_experiments(REPO_CONFIG), "aa_vacuum_kl", cuda_available=False)
    assert s["training"]["route"] == "kl_only" and s["model"]["kind"] == "physical" and s["model"]["rotors"] == "all"
    assert s["energy"]["backend"] == "torch" and s["device"] == "cpu"
    t = s["training"]
    assert (t["kl_epochs"] * t["iters_per_epoch"], t["batch_size"], t["lr"], t["kl_lr_floor"]) == (6000, 256, 1e-4, 0.1)
    # the gate's schedule spans the run as in examples/data_free_kl.py: held 750 iterations, E_final at 4,500
    schedule = s["gate"]["schedule"]
    assert schedule.hold_epochs * t["iters_per_epoch"] == 750 and schedule.warmup_epochs * t["iters_per_epoch"] == 4500


def test_aa_300_450_gpu_is_sized_for_one_gpu_with_the_torch_energy():
    s = run_settings(load_experiments(REPO_CONFIG), "aa_300_450_gpu", cuda_available=True)
    assert s["device"] == "cuda" and s["energy"]["backend"] == "torch"
    assert s["training"]["batch_size"] >= 1024 and s["model"]["hidden"] >= 256
    assert s["model"]["n_torsion_layers"] + s["model"]["n_rest_layers"] > 8  # bigger than aa_300_450_cpu's 4 + 4
    # the recipe of aa_vacuum_is: physical flow, early-stopped NLL, KL-weighted mixed stage with rollback
    assert s["model"]["kind"] == "physical" and s["training"]["nll_patience"] is not None
    assert s["training"]["w_energy"] == 0.5 and s["training"]["rollback_tolerance"] == 0.5
