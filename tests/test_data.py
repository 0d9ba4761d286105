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
    from bgflow_gate.config import parse_yaml

    assert parse_yaml("exp:\n  data: {timestep: 1e-3}\n")["exp"]["data"]["timestep"] == 0.001
    section = parse_yaml("exp:\n  data: {t_min: 300, timestep: 1e-3}\n")
    assert data_settings(section, "exp") == ReplicaExchangeSettings()
    from_yaml = ReplicaExchangeSettings(t_min=300, timestep=1e-3, n_replicas=np.int64(6))
    assert from_yaml == ReplicaExchangeSettings(t_min=300.0, timestep=0.001, n_replicas=6)
    assert from_yaml.key == ReplicaExchangeSettings().key
    assert from_yaml.simulated_ns == pytest.approx(2050 * 500 * 0.001 / 1000)


# -- bad dataset files: one line naming the file, exit status 2, no traceback ------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    """A small dataset written by generate_dataset."""
    directory = tmp_path_factory.mktemp("good")
    return generate_dataset(ReplicaExchangeSettings(**TINY), directory, progress=False).path


def damaged_copies(good, tmp_path):
    """name -> (a damaged copy of ``good``, what the message says)."""
    import zipfile

    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    files = {"truncated": raw[: len(raw) // 2], "empty": b"", "bit_flipped": bytes(flipped),
             "not_a_zip": b"positions,energies\n1,2\n"}
    out = {}
    for name, data in files.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
        out[name] = (tmp_path / f"{name}.npz", "cannot be read (truncated or corrupt")
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(tmp_path / "missing_key.npz", **{k: v for k, v in arrays.items() if k != "energies"})
    out["missing_key"] = (tmp_path / "missing_key.npz", "is not a dataset of 'bgflow-gate data': no energies")
    np.savez(tmp_path / "wrong_atoms.npz", **{**arrays, "positions": arrays["positions"][:, :60]})
    out["wrong_atoms"] = (tmp_path / "wrong_atoms.npz", "holds 60 coordinates per frame; alanine dipeptide has 22 atoms")
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
        z.writestr("positions.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
                   + b" " * 43 + b"\n" + b"\x80\x04N.")
    out["pickled"] = (tmp_path / "pickled.npz", str(tmp_path / "pickled.npz"))
    return out


@pytest.mark.parametrize("name", ["truncated", "empty", "bit_flipped", "not_a_zip", "missing_key", "wrong_atoms", "pickled"])
def test_check_data_on_a_damaged_file_is_one_line_naming_it_and_exit_status_2(good_file, tmp_path, capsys, name):
    path, message = damaged_copies(good_file, tmp_path)[name]
    with pytest.raises(SystemExit) as exc:
        main(["check-data", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith(f"bgflow-gate check-data: error: {path}") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err and "allow_pickle" not in err


def test_a_damaged_cache_file_is_regenerated_with_a_warning_naming_it(good_file, tmp_path):
    from bgflow_gate.systems.data import DataCacheWarning

    cache = tmp_path / good_file.name
    cache.write_bytes(good_file.read_bytes()[:1000])
    with pytest.warns(DataCacheWarning, match=rf"data cache {cache} is unusable \(cannot be read.*\); regenerating it"):
        dataset = generate_dataset(ReplicaExchangeSettings(**TINY), tmp_path, progress=False)
    assert not dataset.from_cache and np.array_equal(load_dataset(cache).positions, load_dataset(good_file).positions)


def test_a_cache_file_with_nan_coordinates_is_regenerated_not_trained_on(good_file, tmp_path):
    from bgflow_gate.systems.data import DataCacheWarning

    with np.load(good_file) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["positions"][3, 5] = np.nan
    np.savez(tmp_path / good_file.name, **arrays)
    with pytest.warns(DataCacheWarning, match=r"non-finite coordinates in 1 frame \(first: 3\)"):
        dataset = generate_dataset(ReplicaExchangeSettings(**TINY), tmp_path, progress=False)
    assert np.isfinite(dataset.positions).all()


def test_a_data_directory_that_cannot_be_written_is_an_error_before_any_simulation(tmp_path):
    from bgflow_gate.systems.data import DatasetError

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match=rf"cannot write the data cache {blocker / 'data'} .*pass --data-dir DIR"):
        generate_dataset(ReplicaExchangeSettings(**TINY), blocker / "data", progress=False)


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only directories")
def test_data_into_a_read_only_directory_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "experiments.yaml"
    config.write_text("tiny:\n  data:\n" + "".join(f"    {k}: {v}\n" for k, v in TINY.items()))
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as exc:
        main(["data", "--experiment", "tiny", "--config", str(config), "--data-dir", str(read_only), "--quiet"])
    assert exc.value.code == 2 and f"cannot write the data cache {read_only}" in capsys.readouterr().err


# -- check-data verdicts: any PROBLEM is exit status 1 and a summary line -------------------------------


def write_variant(good, tmp_path, change):
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    path = tmp_path / "variant.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "change, verdict, summary",
    [
        (lambda a: a["positions"].__setitem__((2, 0), np.nan), "coordinates finite: PROBLEM", "non-finite coordinates in 1 frames"),
        (lambda a: a["energies"].__setitem__(4, np.nan), "energies finite: PROBLEM", "non-finite energies"),
        (lambda a: a.__setitem__("positions", a["positions"] * 10), "kJ/mol (PROBLEM)", "energies differ from the force field"),
    ],
    ids=["nan_coordinates", "nan_energy", "coordinates_x10"],
)
def test_check_data_exits_1_with_a_summary_line_when_a_check_fails(good_file, tmp_path, capsys, change, verdict, summary):
    status = main(["check-data", write_variant(good_file, tmp_path, change)])
    out = capsys.readouterr().out
    assert status == 1
    assert verdict in out
    assert out.strip().splitlines()[-1].startswith("1 PROBLEM: ") and summary in out.strip().splitlines()[-1]


def test_check_data_on_good_data_ends_with_all_checks_passed(good_file, capsys):
    status = main(["check-data", str(good_file)])
    out = capsys.readouterr().out
    if "PROBLEM" in out:  # a 30-frame run may miss a basin; then the verdict says so
        assert status == 1 and "a phi < 0 basin is not sampled" in out
    else:
        assert status == 0 and out.strip().splitlines()[-1] == "all checks passed"


# -- where the cache is, how progress is shown ------------------------------------------------------------


def test_the_data_cache_is_per_user_and_the_environment_variable_moves_it(monkeypatch, tmp_path):
    from bgflow_gate.systems.data import DATA_DIR_ENV, default_data_dir

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if __import__("sys").platform.startswith("linux"):
        assert default_data_dir() == tmp_path / "xdg" / "bgflow-gate" / "data"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"


def test_progress_into_a_file_is_plain_lines_at_each_tenth(monkeypatch, capsys):
    from bgflow_gate.systems.data import Progress

    bar = Progress(100, "work")
    bar.terminal = False
    for done in range(1, 101):
        bar.update(done)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(":")[1].split()[0] for line in err.splitlines()] == [f"{10 * k}/100" for k in range(1, 11)]
