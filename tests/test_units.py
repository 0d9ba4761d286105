"""Specification of the energy units: kJ/mol and kT."""

import pytest

from bgflow_gate.units import (
    KJ_PER_MOL,
    KT,
    MOLAR_GAS_CONSTANT,
    check_temperature,
    kt_in_kjmol,
    parse_unit,
)


def test_molar_gas_constant_is_codata_2018_in_kj_per_mol_kelvin():
    assert MOLAR_GAS_CONSTANT == 8.314462618e-3


def test_kt_at_300_kelvin_is_2_494_kj_per_mol():
    assert kt_in_kjmol(300) == pytest.approx(2.494338785, rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 298.15, 300, 450.5])
def test_kt_is_r_times_temperature(temperature):
    assert kt_in_kjmol(temperature) == pytest.approx(8.314462618e-3 * temperature, rel=1e-9)


def test_final_e_max_of_1e5_kj_per_mol_is_about_4e4_kt_at_300_kelvin():
    assert 1e5 / kt_in_kjmol(300) == pytest.approx(4.009e4, rel=1e-3)


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "abc", None])
def test_kt_rejects_invalid_temperatures(bad):
    with pytest.raises(ValueError, match="temperature"):
        kt_in_kjmol(bad)


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("kJ/mol", KJ_PER_MOL),
        ("kj/mol", KJ_PER_MOL),
        ("KJ/MOL", KJ_PER_MOL),
        (" kJ/mol ", KJ_PER_MOL),
        ("kJ mol-1", KJ_PER_MOL),
        ("kj_per_mol", KJ_PER_MOL),
        ("kT", KT),
        ("KT", KT),
        ("kt", KT),
    ],
)
def test_parse_unit_accepts_aliases_case_insensitively(text, canonical):
    assert parse_unit(text) == canonical


def test_canonical_unit_names_are_kj_per_mol_and_kt():
    assert (KJ_PER_MOL, KT) == ("kJ/mol", "kT")


@pytest.mark.parametrize("bad", ["eV", "kcal/mol", "", None, 1.0])
def test_parse_unit_rejects_other_units(bad):
    with pytest.raises(ValueError, match="unit must be 'kJ/mol' or 'kT'"):
        parse_unit(bad)


def test_parse_unit_error_names_the_given_argument():
    with pytest.raises(ValueError, match="^target_unit must be"):
        parse_unit("eV", name="target_unit")


@pytest.mark.parametrize("value, expected", [(300, 300.0), (310.5, 310.5), (1e-3, 1e-3)])
def test_check_temperature_returns_a_float(value, expected):
    result = check_temperature(value)
    assert result == expected
    assert isinstance(result, float)


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "abc", None])
def test_check_temperature_rejects_non_positive_non_finite_or_non_numeric(bad):
    with pytest.raises(ValueError, match="temperature must be"):
        check_temperature(bad)


def test_check_temperature_error_names_the_given_argument():
    with pytest.raises(ValueError, match="^T_ref must be"):
        check_temperature(-1, name="T_ref")
