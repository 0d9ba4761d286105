"""Specification of the YAML experiments file: loading, validation, defaults."""

import textwrap
from pathlib import Path

import pytest

from bgflow_gate.config import (
    DEFAULT_CONFIG,
    GATE_DEFAULTS,
    ConfigError,
    experiment_schedule,
    gate_settings,
    load_experiments,
)
from bgflow_gate.schedules import ConstantSchedule, LinearSchedule, ThreeStageSchedule

REPO_CONFIG = Path(__file__).parents[1] / "bgflow_gate" / "experiments.yaml"
REPO_EXPERIMENTS = {"default", "legacy_linear", "lenient", "smoke", "aa_300_450_cpu", "aa_300_450_gpu", "aa_vacuum_kl",
                    "aa_vacuum_is"}


def write(tmp_path, text, name="experiments.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def gate_of(tmp_path, gate_yaml, name="exp"):
    """gate_settings of one experiment whose ``gate`` section is ``gate_yaml``."""
    body = textwrap.indent(textwrap.dedent(gate_yaml), "    ")
    path = write(tmp_path, f"{name}:\n  gate:\n{body}")
    return gate_settings(load_experiments(path), name, source=str(path))


# -- the repository's experiments file ----------------------------------------------------------


def test_the_default_experiments_file_ships_inside_the_package():
    import bgflow_gate

    assert DEFAULT_CONFIG == Path(bgflow_gate.__file__).parent / "experiments.yaml"
    assert DEFAULT_CONFIG.is_file()


def test_repo_config_defines_default_legacy_linear_and_lenient():
    experiments = load_experiments(REPO_CONFIG)
    assert set(experiments) == REPO_EXPERIMENTS


def test_repo_default_experiment_uses_the_default_three_stage_schedule():
    settings = gate_settings(load_experiments(REPO_CONFIG), "default")
    assert settings["schedule"] == ThreeStageSchedule()
    assert settings["e_cut"] == 500.0


def test_repo_legacy_linear_experiment_uses_the_default_linear_schedule():
    settings = gate_settings(load_experiments(REPO_CONFIG), "legacy_linear")
    assert settings["schedule"] == LinearSchedule()
    assert settings["schedule"](50) == pytest.approx(5.005e6, rel=1e-9)


def test_repo_lenient_experiment_has_longer_warmup_and_higher_final_e_max():
    schedule = experiment_schedule(REPO_CONFIG, "lenient")
    assert schedule == ThreeStageSchedule(e_initial=1e10, e_final=1e6, hold_epochs=50, warmup_epochs=500)
    assert schedule(500) == 1e6


def test_accepts_a_path_given_as_string():
    assert set(load_experiments(str(REPO_CONFIG))) == REPO_EXPERIMENTS


# -- defaults --------------------------------------------------------------------------------


def test_gate_defaults():
    assert GATE_DEFAULTS == {
        "e_cut": 500.0,
        "target_unit": "kJ/mol",
        "temperature": None,
        "adaptive_quantile": None,
        "above_cut": "energy",
        "schedule": {"type": "three_stage"},
    }


def test_experiment_without_gate_section_gets_all_defaults(tmp_path):
    path = write(tmp_path, "bare:\n  notes: nothing about the gate\n")
    assert gate_settings(load_experiments(path), "bare") == {
        "e_cut": 500.0,
        "target_unit": "kJ/mol",
        "temperature": None,
        "adaptive_quantile": None,
        "above_cut": "energy",
        "schedule": ThreeStageSchedule(),
    }


def test_omitted_schedule_arguments_take_the_schedule_defaults(tmp_path):
    settings = gate_of(tmp_path, "schedule: {type: three_stage, warmup_epochs: 500}\n")
    assert settings["schedule"] == ThreeStageSchedule(warmup_epochs=500)


def test_scientific_notation_without_a_dot_is_a_float_everywhere(tmp_path):
    path = write(tmp_path, "exp:\n  E_max: 1e5\n  E_cut: 5E2\n  gate: {schedule: {type: three_stage, e_initial: 1e+10}}\n")
    experiments = load_experiments(path)
    assert experiments["exp"]["E_max"] == 100000.0 and isinstance(experiments["exp"]["E_max"], float)
    settings = gate_settings(experiments, "exp")
    assert settings["schedule"] == ThreeStageSchedule(e_initial=1e10, e_final=1e5)
    assert settings["e_cut"] == 500.0


def test_plain_integers_and_quoted_numbers_keep_their_yaml_types():
    from bgflow_gate.config import parse_yaml

    assert parse_yaml("a: 50\nb: '1e5'\nc: 1_000\nd: -.5\n") == {"a": 50, "b": "1e5", "c": 1000, "d": -0.5}


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = write(tmp_path, "exp:\n  E_max: 1.0e+5\n  E_cut: 500.0\n  E_max: 1.0e+6\n")
    with pytest.raises(ConfigError, match=r"experiments.yaml: line 4: key 'E_max' given twice \(also on line 2\)"):
        load_experiments(path)


def test_a_directory_as_experiments_file_is_an_error_saying_so(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory; pass the YAML file itself to --config"):
        load_experiments(tmp_path)


def test_a_binary_experiments_file_is_an_error_saying_it_is_not_text(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"model.pt is not a text file \(YAML expected\)"):
        load_experiments(path)


def test_exponent_without_dot_is_still_read_as_a_number(tmp_path):
    # PyYAML reads 1e5 (no dot) as a string; the settings still become numbers.
    settings = gate_of(tmp_path, "e_cut: 5e2\nschedule: {type: linear, e_final: 1e3}\n")
    assert settings["e_cut"] == 500.0
    assert settings["schedule"] == LinearSchedule(e_final=1e3)


def test_kt_target_with_temperature_is_accepted(tmp_path):
    settings = gate_of(tmp_path, "target_unit: KT\ntemperature: 300\nadaptive_quantile: 0.9\n")
    assert settings["target_unit"] == "kT"
    assert settings["temperature"] == 300.0
    assert settings["adaptive_quantile"] == 0.9


def test_constant_schedule_from_yaml(tmp_path):
    settings = gate_of(tmp_path, "schedule: {type: constant, value: 3.0e+4}\n")
    assert settings["schedule"] == ConstantSchedule(3e4)


# -- errors reading the file -------------------------------------------------------------------


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_file_raises_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_experiments(tmp_path / "nope.yaml")


def test_invalid_yaml_raises_config_error(tmp_path):
    path = write(tmp_path, "default:\n  gate: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_experiments(path)


@pytest.mark.parametrize("text", ["- default\n- lenient\n", "just a string\n", "", "42\n"])
def test_top_level_not_a_mapping_raises_config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="must map experiment names to their settings"):
        load_experiments(path)


def test_experiment_that_is_not_a_mapping_raises_config_error_naming_it(tmp_path):
    path = write(tmp_path, "default: 3\n")
    with pytest.raises(ConfigError, match="experiment 'default' must be a mapping"):
        load_experiments(path)


# -- errors in an experiment's gate section ---------------------------------------------------


def test_unknown_experiment_raises_listing_available_ones():
    experiments = load_experiments(REPO_CONFIG)
    with pytest.raises(ConfigError, match="no experiment named 'nope'; available: aa_300_450_cpu, aa_300_450_gpu, aa_vacuum_is, aa_vacuum_kl, default, legacy_linear"):
        gate_settings(experiments, "nope")


def test_errors_name_the_source_file(tmp_path):
    path = write(tmp_path, "exp:\n  gate: {e_cut: abc}\n")
    with pytest.raises(ConfigError, match=f"^{path}: exp.gate.e_cut"):
        experiment_schedule(path, "exp")


def test_gate_section_that_is_not_a_mapping_raises(tmp_path):
    with pytest.raises(ConfigError, match="exp.gate must be a mapping"):
        gate_of(tmp_path, "- 1\n")


def test_unknown_gate_key_raises_naming_experiment_gate_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) exp\.gate\.e_max.*accepted: e_cut"):
        gate_of(tmp_path, "e_max: 1.0e+5\n")


@pytest.mark.parametrize("bad", ["abc", ".nan", ".inf", "null", "[1]", "0", "-5"])
def test_bad_e_cut_raises_naming_the_key(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"exp\.gate\.e_cut: e_cut must be a positive, finite energy"):
        gate_of(tmp_path, f"e_cut: {bad}\n")


def test_a_bad_above_cut_raises_naming_the_key_and_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.gate\.above_cut must be one of energy, energy\+entropy, none, "
                                          r"got 'entropy'"):
        gate_of(tmp_path, "above_cut: entropy\n")
    assert gate_of(tmp_path, "above_cut: energy+entropy\n")["above_cut"] == "energy+entropy"


@pytest.mark.parametrize("bad", ["eV", "kcal/mol", "1"])
def test_bad_target_unit_raises_naming_the_key(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"exp\.gate\.target_unit must be 'kJ/mol' or 'kT'"):
        gate_of(tmp_path, f"target_unit: {bad}\n")


@pytest.mark.parametrize("bad", ["0", "-5", "abc", ".nan"])
def test_bad_temperature_raises_naming_the_key(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"exp\.gate\.temperature"):
        gate_of(tmp_path, f"temperature: {bad}\n")


def test_kt_target_without_temperature_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.gate: target_unit 'kT' needs gate\.temperature"):
        gate_of(tmp_path, "target_unit: kT\n")


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.1", "half", "true"])
def test_adaptive_quantile_outside_open_unit_interval_raises(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"exp\.gate\.adaptive_quantile must be null or lie in \(0, 1\)"):
        gate_of(tmp_path, f"adaptive_quantile: {bad}\n")


@pytest.mark.parametrize(
    "schedule_yaml, detail",
    [
        ("three_stage", "mapping"),
        ("{e_initial: 1.0e+9}", "no 'type' key"),
        ("{type: cosine}", "'cosine' is unknown"),
        ("{type: linear, warmup_epochs: 10}", "warmup_epochs"),
        ("{type: three_stage, hold_epochs: 400}", "hold_epochs"),
        ("{type: linear, e_initial: 1.0e+3, e_final: 1.0e+4}", "e_final"),
        ("{type: constant, value: -1}", "value"),
    ],
)
def test_bad_schedule_raises_naming_experiment_gate_schedule(tmp_path, schedule_yaml, detail):
    with pytest.raises(ConfigError, match=rf"exp\.gate\.schedule: .*{detail}"):
        gate_of(tmp_path, f"schedule: {schedule_yaml}\n")


def test_constant_schedule_without_value_raises_config_error_naming_the_schedule(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.gate\.schedule: .*value"):
        gate_of(tmp_path, "schedule: {type: constant}\n")
