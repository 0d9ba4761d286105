"""``training.route: kl_only``: the physically initialised generator trained by gated reverse
KL alone (no MD frame in training), evaluated like the other routes; ``energy.backend``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("openmmtools")

from bgflow_gate.config import ConfigError, load_experiments, run_settings  # noqa: E402
from bgflow_gate.pipeline import CosineLR, RunError, make_target, train_experiment  # noqa: E402
from bgflow_gate.report import read_history  # noqa: E402
from tiny_runs import tiny_experiment  # noqa: E402

TINY_KL = tiny_experiment(
    "tiny_kl", model="{kind: physical, n_torsion_layers: 1, n_rest_layers: 1, hidden: 8, n_bins: 4}",
    training="{route: kl_only, batch_size: 16, iters_per_epoch: 2, kl_epochs: 3, warmup_epochs: 0, kl_lr_floor: 0.1}",
    energy="{backend: torch}",
)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "experiments.yaml"
    path.write_text(TINY_KL)
    return path


@pytest.fixture(scope="module")
def finished(config, tmp_path_factory):
    out, lines = tmp_path_factory.mktemp("runs") / "tiny_kl", []
    data_dir = tmp_path_factory.mktemp("data")
    settings = run_settings(load_experiments(config), "tiny_kl")
    summary = train_experiment(settings, out, data_dir=data_dir, progress=False, log=lines.append)
    return out, summary, lines, settings, data_dir


@pytest.mark.slow
def test_the_kl_route_writes_the_files_of_the_other_routes_for_its_one_stage(finished):
    out, summary, _, _, _ = finished
    assert (out / "models" / "kl.pt").is_file() and (out / "checkpoints" / "kl.pt").is_file()
    assert read_history(out / "history_kl.csv")["epoch"].tolist() == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["energies.png", "ramachandran.png", "training.png"]
    with np.load(out / "evaluation.npz") as ev:
        assert {"kl_phi", "kl_psi", "kl_energy", "kl_logw", "md_phi", "md_psi", "md_energy"} <= set(ev.files)
        assert ev["kl_logw"].shape == (64,) and np.isfinite(ev["kl_energy"]).all()


@pytest.mark.slow
def test_the_kl_route_trains_on_no_md_frame_and_evaluates_against_the_test_frames(finished):
    _, summary, lines, _, _ = finished
    assert summary["route"] == "kl_only" and list(summary["stages"]) == ["data", "kl", "evaluation"]
    assert summary["data"]["train_frames"] == 0 and summary["data"]["test_frames"] == 12
    assert set(summary["metrics"]) == {"md", "kl"} and summary["mixed_vs_control"] is None
    m = summary["metrics"]["kl"]
    assert m["samples"] == 64 and math.isfinite(m["phi_psi_kl"]) and 0 < m["ess_percent"] <= 100
    assert summary["stages"]["kl"]["iterations"] == 6 and summary["stages"]["kl"]["batches"] == 6
    assert any("none used for training (kl_only)" in line for line in lines)


@pytest.mark.slow
def test_the_run_log_names_the_energy_backend_and_why(finished):
    _, summary, lines, _, _ = finished
    note = "energy: torch (TorchEnergy on the run's device; energy.backend torch)"
    assert note in lines and summary["energy"]["target"] == note


@pytest.mark.slow
def test_a_kl_stage_killed_after_its_second_epoch_resumes_to_the_weights_of_an_uninterrupted_one(finished, tmp_path):
    out, summary, _, settings, data_dir = finished

    def kill(line: str) -> None:
        if line.startswith("[kl] epoch    1 "):  # the second epoch's line, after its checkpoint
            raise KeyboardInterrupt

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_experiment(settings, killed, data_dir=data_dir, progress=False, log=kill)
    assert "kl" not in json.loads((killed / "progress.json").read_text())
    lines = []
    again = train_experiment(settings, killed, data_dir=data_dir, resume=True, progress=False, log=lines.append)
    assert any("[kl] resumed" in line and "at epoch 2" in line for line in lines)
    whole, resumed = torch.load(out / "models" / "kl.pt"), torch.load(killed / "models" / "kl.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert again["metrics"]["kl"]["ess_percent"] == pytest.approx(summary["metrics"]["kl"]["ess_percent"])


def test_the_cosine_rate_falls_from_lr_to_its_floor_and_resumes_exactly():
    optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = CosineLR(optim, 1e-4, 0.1, total=10)
    rates = [optim.param_groups[0]["lr"]]
    for _ in range(12):
        schedule.step()
        rates.append(optim.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(1e-4) and rates[5] == pytest.approx(5.5e-5) and rates[10:] == [pytest.approx(1e-5)] * 3
    CosineLR(optim, 1e-4, 0.1, total=10, start=4)
    assert optim.param_groups[0]["lr"] == pytest.approx(rates[4])


def test_backend_auto_takes_torch_for_alanine_and_openmm_is_forced_by_openmm():
    from bgflow_gate import TorchEnergy
    from bgflow_gate.systems.alanine import alanine_dipeptide

    system = alanine_dipeptide("vacuum")
    energy = {"backend": "auto", "platform": "Reference", "n_workers": 1}
    target, note = make_target(system, 300.0, energy)
    assert isinstance(target, TorchEnergy) and "supports every force of this system" in note
    target, note = make_target(system, 300.0, {**energy, "backend": "openmm"})
    try:
        assert not isinstance(target, TorchEnergy) and note.startswith("energy: openmm (platform Reference")
        x = torch.as_tensor(system.positions, dtype=torch.float64).reshape(1, -1)
        assert TorchEnergy.from_openmm(system.system, 300.0).energy(x).item() == pytest.approx(
            target.energy(x).item(), rel=1e-6)
    finally:
        target.close()


def test_backend_torch_on_an_unsupported_system_is_an_error_naming_the_force():
    import openmm

    from bgflow_gate.systems.alanine import alanine_dipeptide

    system = alanine_dipeptide("vacuum")
    system.system.addForce(openmm.CustomExternalForce("x^2"))
    with pytest.raises(RunError, match=r"energy.backend torch: .*CustomExternalForce.*use energy.backend openmm"):
        make_target(system, 300.0, {"backend": "torch", "platform": "Reference", "n_workers": 1})
    target, note = make_target(system, 300.0, {"backend": "auto", "platform": "Reference", "n_workers": 1})
    target.close()
    assert note.startswith("energy: openmm") and "TorchEnergy does not support this system" in note


@pytest.mark.parametrize("body, message", [
    ("training: {route: kl_only, iters_per_epoch: 5}\n", r"exp.model.kind must be 'physical' with training.route 'kl_only'"),
    ("model: {kind: physical}\ntraining: {route: kl_only}\n", r"exp.training.iters_per_epoch must be a number with"),
    ("training: {route: kl}\n", r"exp.training.route must be one of nll_then_mixed, kl_only, got 'kl'"),
    ("model: {kind: realnvp}\n", r"exp.model.kind must be one of spline, physical"),
    ("energy: {backend: cuda}\n", r"exp.energy.backend must be one of auto, torch, openmm"),
    ("training: {kl_lr_floor: 0.0}\n", r"exp.training.kl_lr_floor must be null \(a constant learning rate\) or lie in"),
])
def test_bad_route_model_and_backend_settings_are_errors_that_name_the_key(tmp_path, body, message):
    import textwrap

    path = tmp_path / "experiments.yaml"
    path.write_text("exp:\n" + textwrap.indent(body, "  "))
    with pytest.raises(ConfigError, match=message):
        run_settings(load_experiments(path), "exp", source=str(path), cuda_available=False)


def test_a_run_begun_before_routes_and_backends_resumes_once_it_asks_for_openmm(tmp_path):
    from bgflow_gate.pipeline import _changed_settings

    wanted = {"model": {"kind": "spline", "rotors": "all", "hidden": 8, "rest_spline_bins": 0},
              "energy": {"backend": "auto"},
              "training": {"route": "nll_then_mixed", "kl_epochs": 400, "kl_lr_floor": None, "mixed_lr_floor": None,
                           "nll_patience": None, "rollback_tolerance": None}}
    stored = {"model": {"hidden": 8}, "energy": {}, "training": {}}
    assert _changed_settings(stored, wanted) == ["energy.backend: 'openmm' in the run, 'auto' now"]
    assert _changed_settings(stored, {**wanted, "energy": {"backend": "openmm"}}) == []


@pytest.mark.slow
def test_the_nll_route_runs_on_the_openmm_backend_when_asked(tmp_path):
    body = tiny_experiment(
        "tiny_openmm", model="{kind: spline, n_torsion_layers: 1, n_rest_layers: 1, hidden: 8, n_bins: 4}",
        training="{batch_size: 16, iters_per_epoch: 2, nll_epochs: 1, mixed_epochs: 1}",
        energy="{backend: openmm, platform: Reference}",
    )
    (tmp_path / "experiments.yaml").write_text(body)
    settings = run_settings(load_experiments(tmp_path / "experiments.yaml"), "tiny_openmm")
    summary = train_experiment(settings, tmp_path / "run", data_dir=tmp_path / "data", progress=False,
                               log=lambda _: None)
    assert summary["route"] == "nll_then_mixed" and set(summary["metrics"]) == {"md", "nll", "control", "mixed"}
    assert summary["energy"]["target"] == ("energy: openmm (platform Reference, 1 worker(s); energy.backend openmm)")
