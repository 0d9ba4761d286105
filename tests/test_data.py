"""Training data by replica exchange: settings, reproducibility, cache, checks, CLI."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openmmtools")

from bgflow_gate.cli import main  # noqa: E402
from bgflow_gate.config import ConfigError, data_settings  # noqa: E402
from bgflow_gate.systems.analysis import (  # noqa: E402
    basin_fractions,
    format_validation,
    statistical_inefficiency,
    validate_dataset,
)
from bgflow_gate.systems.data import ReplicaExchangeSettings, generate_dataset, load_dataset  # noqa: E402

TINY = dict(n_replicas=3, t_max=450.0, n_iterations=30, steps_per_iteration=20, equilibration_iterations=2, platform="Reference")


def test_the_ladder_is_geometric_and_the_cache_key_ignores_the_platform():
    s = ReplicaExchangeSettings(t_min=300.0, t_max=700.0, n_replicas=6)
    ratios = s.temperatures[1:] / s.temperatures[:-1]
    assert s.temperatures[0] == 300.0 and s.temperatures[-1] == pytest.approx(700.0)
    assert np.allclose(ratios, (700 / 300) ** 0.2)
    assert ReplicaExchangeSettings(platform="CPU").key == ReplicaExchangeSettings(platform="Reference").key
    assert ReplicaExchangeSettings(seed=1).key != ReplicaExchangeSettings(seed=2).key
    assert ReplicaExchangeSettings(n_replicas=1).temperatures.tolist() == [300.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solvent": "water"}, "solvent must be one of vacuum, implicit"),
        ({"t_max": 200.0}, r"t_max \(200 K\) must not be below t_min \(300 K\)"),
        ({"n_replicas": 0}, "n_replicas must be a whole number >= 1"),
        ({"n_iterations": 2.5}, "n_iterations must be a whole number"),
        ({"timestep": -1.0}, "timestep must be a positive, finite time step in ps"),
    ],
)
def test_bad_settings_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReplicaExchangeSettings(**kwargs)


def test_the_same_settings_give_the_same_frames_and_a_second_call_loads_the_cache(tmp_path):
    settings = ReplicaExchangeSettings(**TINY)
    first = generate_dataset(settings, tmp_path / "a", progress=False)
    again = generate_dataset(settings, tmp_path / "b", progress=False)
    assert not first.from_cache and first.positions.shape == (30, 66)
    assert np.array_equal(first.positions, again.positions) and np.array_equal(first.energies, again.energies)
    cached = generate_dataset(settings, tmp_path / "a", progress=False)
    assert cached.from_cache and np.array_equal(cached.positions, first.positions)
    assert cached.settings == settings and cached.path == first.path
    assert first.acceptance.shape == (2,) and ((0 <= first.acceptance) & (first.acceptance <= 1)).all()
    train, test = first.split(0.2)
    assert (len(train), len(test)) == (24, 6)
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        load_dataset(tmp_path / "missing.npz")


def test_validation_recomputes_energies_and_reports_basins(tmp_path):
    dataset = generate_dataset(ReplicaExchangeSettings(**TINY), tmp_path, progress=False)
    report = validate_dataset(dataset)
    assert report["finite"] and report["frames"] == 30
    assert report["energy_max_abs_diff_kjmol"] < 1e-2  # float32 storage of the positions
    assert sum(report["basins"].values()) == pytest.approx(1.0)
    text = format_validation(report)
    assert "coordinates finite: ok" in text and "exchange acceptance:" in text


def test_basin_fractions_split_the_phi_psi_plane():
    phi = np.radians([-150.0, -80.0, -60.0, 60.0])
    psi = np.radians([150.0, 70.0, -40.0, 40.0])
    assert basin_fractions(phi, psi) == {"C5/beta": 0.25, "C7eq/alphaR": 0.5, "phi>0 (C7ax/alphaL)": 0.25}


def test_statistical_inefficiency_of_white_noise_is_one_and_of_ar1_is_1_plus_rho_over_1_minus_rho():
    rng = np.random.default_rng(0)
    assert statistical_inefficiency(rng.normal(size=20000)) == pytest.approx(1.0, abs=0.1)
    x = np.zeros(50000)
    for t in range(1, len(x)):
        x[t] = 0.9 * x[t - 1] + rng.normal()
    assert statistical_inefficiency(x) == pytest.approx(19.0, rel=0.25)
    assert statistical_inefficiency(np.ones(10)) == 1.0


def test_the_data_section_is_validated_with_suggestions():
    experiments = {"exp": {"data": {"n_replica": 4}}}
    with pytest.raises(ConfigError, match=r"exp\.data\.n_replica \(did you mean 'n_replicas'\?\)"):
        data_settings(experiments, "exp")
    with pytest.raises(ConfigError, match=r"exp\.data: solvent must be one of"):
        data_settings({"exp": {"data": {"solvent": "water"}}}, "exp")
    assert data_settings({"exp": {}}, "exp") == ReplicaExchangeSettings()


def test_the_data_command_generates_then_loads_and_check_data_reports(tmp_path, capsys):
    config = tmp_path / "experiments.yaml"
    config.write_text("tiny:\n  data:\n" + "".join(f"    {k}: {v}\n" for k, v in TINY.items()))
    assert main(["data", "--experiment", "tiny", "--config", str(config), "--data-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(generated)" in out and "coordinates finite: ok" in out
    main(["data", "--experiment", "tiny", "--config", str(config), "--data-dir", str(tmp_path), "--quiet"])
    assert "(loaded from the cache)" in capsys.readouterr().out
    path = next(tmp_path.glob("alanine_vacuum_*.npz"))
    main(["check-data", str(path)])
    assert "frames: 30" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["check-data", str(tmp_path / "nope.npz")])
    assert exc.value.code == 2


def test_settings_store_plain_numbers_so_yaml_spellings_give_one_cache_key():
    from_yaml = ReplicaExchangeSettings(t_min=300, timestep="1e-3", n_replicas=np.int64(6))
    assert from_yaml == ReplicaExchangeSettings(t_min=300.0, timestep=0.001, n_replicas=6)
    assert from_yaml.key == ReplicaExchangeSettings().key
    assert from_yaml.simulated_ns == pytest.approx(2050 * 500 * 0.001 / 1000)
