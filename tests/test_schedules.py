"""Specification of the E_max schedules (DESIGN.md, "The schedule (authoritative)")."""

import math

import pytest

from bgflow_gate.schedules import (
    SCHEDULE_TYPES,
    ConstantSchedule,
    LinearSchedule,
    Schedule,
    ThreeStageSchedule,
    as_schedule,
    schedule_from_dict,
)
from formulas import three_stage_formula


# -- ThreeStageSchedule: values ------------------------------------------------------------


def test_three_stage_defaults_are_1e10_1e5_hold_50_warmup_300():
    s = ThreeStageSchedule()
    assert (s.e_initial, s.e_final, s.hold_epochs, s.warmup_epochs) == (1e10, 1e5, 50, 300)


@pytest.mark.parametrize("epoch", [0, 10, 49, 49.999])
def test_three_stage_holds_e_initial_during_stage_one(epoch):
    assert ThreeStageSchedule()(epoch) == 1e10


def test_three_stage_starts_stage_two_at_e_initial():
    assert ThreeStageSchedule()(50) == pytest.approx(1e10, rel=1e-9)


@pytest.mark.parametrize("epoch", [300, 300.5, 1000, 1e6])
def test_three_stage_is_e_final_from_warmup_epochs_on(epoch):
    assert ThreeStageSchedule()(epoch) == 1e5


@pytest.mark.parametrize(
    "epoch, expected",
    [(112.5, 5.6234132519e8), (175, 3.16227766e7), (237.5, 1.77827941e6)],
)
def test_three_stage_is_log_linear_at_quarter_points_of_stage_two(epoch, expected):
    s = ThreeStageSchedule()
    assert s(epoch) == pytest.approx(three_stage_formula(epoch), rel=1e-9)
    assert s(epoch) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "epoch, wrong_old_note_value", [(112.5, 1.78e9), (175, 3.16e8), (237.5, 5.62e7)]
)
def test_three_stage_does_not_give_the_inconsistent_values_of_the_old_note(epoch, wrong_old_note_value):
    assert ThreeStageSchedule()(epoch) != pytest.approx(wrong_old_note_value, rel=0.1)


def test_three_stage_midpoint_is_geometric_mean_of_e_initial_and_e_final():
    assert ThreeStageSchedule()(175) == pytest.approx(math.sqrt(1e10 * 1e5), rel=1e-9)


@pytest.mark.parametrize("epoch", [50.25, 60.5, 99.999, 123.456, 250.75, 299.5])
def test_three_stage_follows_the_formula_at_fractional_epochs(epoch):
    assert ThreeStageSchedule()(epoch) == pytest.approx(three_stage_formula(epoch), rel=1e-9)


@pytest.mark.parametrize("boundary", [50, 300])
def test_three_stage_is_continuous_at_stage_boundaries(boundary):
    s = ThreeStageSchedule()
    assert abs(s(boundary - 1e-9) - s(boundary)) / s(boundary) < 1e-6


def test_three_stage_is_monotone_non_increasing_over_a_fine_grid():
    s = ThreeStageSchedule()
    grid = [i * 0.25 for i in range(4001)]  # 0 .. 1000 epochs
    values = [s(e) for e in grid]
    increases = [(a, b) for a, b, va, vb in zip(grid, grid[1:], values, values[1:]) if vb > va]
    assert increases == []
    assert max(values) <= s.e_initial
    assert min(values) >= s.e_final


def test_three_stage_accepts_integer_and_float_epochs_alike():
    s = ThreeStageSchedule()
    assert s(175) == s(175.0)


def test_three_stage_with_custom_arguments_follows_the_formula():
    s = ThreeStageSchedule(e_initial=1e8, e_final=1e3, hold_epochs=10, warmup_epochs=20)
    assert s(5) == 1e8
    assert s(15) == pytest.approx(three_stage_formula(15, 1e8, 1e3, 10, 20), rel=1e-9)
    assert s(15) == pytest.approx(math.sqrt(1e8 * 1e3), rel=1e-9)
    assert s(20) == 1e3


def test_three_stage_with_hold_zero_descends_from_epoch_zero():
    s = ThreeStageSchedule(hold_epochs=0, warmup_epochs=100)
    assert s(0) == pytest.approx(1e10, rel=1e-9)
    assert s(50) == pytest.approx(math.sqrt(1e10 * 1e5), rel=1e-9)
    assert s(100) == 1e5
    assert s.stage_of(0) == "warm-up"


def test_three_stage_with_equal_energies_is_constant():
    s = ThreeStageSchedule(e_initial=5e6, e_final=5e6)
    for epoch in (0, 100, 200, 400):
        assert s(epoch) == pytest.approx(5e6, rel=1e-9)


# -- LinearSchedule and ConstantSchedule -------------------------------------------------------


def test_linear_defaults_are_1e7_to_1e4_over_100_epochs():
    s = LinearSchedule()
    assert (s.e_initial, s.e_final, s.epochs) == (1e7, 1e4, 100)


@pytest.mark.parametrize(
    "epoch, expected", [(0, 1e7), (25, 7.5025e6), (50, 5.005e6), (100, 1e4), (150, 1e4), (1e6, 1e4)]
)
def test_linear_descends_linearly_then_stays_at_e_final(epoch, expected):
    assert LinearSchedule()(epoch) == pytest.approx(expected, rel=1e-9)


def test_linear_with_custom_arguments():
    s = LinearSchedule(e_initial=100, e_final=10, epochs=9)
    assert s(3) == pytest.approx(70, rel=1e-9)
    assert s(9) == 10


@pytest.mark.parametrize("epoch", [0, 1.5, 300, 1e6])
def test_constant_schedule_returns_its_value_at_every_epoch(epoch):
    assert ConstantSchedule(3e4)(epoch) == 3e4


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "abc", None])
@pytest.mark.parametrize("arg", ["e_initial", "e_final"])
def test_three_stage_rejects_invalid_energies_naming_the_argument(arg, bad):
    with pytest.raises(ValueError, match=arg):
        ThreeStageSchedule(**{arg: bad})


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "abc"])
@pytest.mark.parametrize("arg", ["e_initial", "e_final"])
def test_linear_rejects_invalid_energies_naming_the_argument(arg, bad):
    with pytest.raises(ValueError, match=arg):
        LinearSchedule(**{arg: bad})


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "abc"])
def test_constant_rejects_invalid_values_naming_the_argument(bad):
    with pytest.raises(ValueError, match="value"):
        ConstantSchedule(bad)


def test_numbers_given_as_strings_are_rejected():
    with pytest.raises(ValueError, match="e_initial must be a positive, finite energy in kJ/mol, got '1e9' .a string"):
        ThreeStageSchedule(e_initial="1e9")
    with pytest.raises(ValueError, match="epoch must be a non-negative, finite number of epochs, got '3' .a string"):
        ThreeStageSchedule()("3")


def test_three_stage_rejects_e_final_above_e_initial():
    with pytest.raises(ValueError, match="e_final .* must not exceed e_initial"):
        ThreeStageSchedule(e_initial=1e5, e_final=1e6)


def test_linear_rejects_e_final_above_e_initial():
    with pytest.raises(ValueError, match="e_final .* must not exceed e_initial"):
        LinearSchedule(e_initial=1e3, e_final=1e4)


@pytest.mark.parametrize("hold, warmup", [(300, 300), (400, 300)])
def test_three_stage_rejects_hold_epochs_not_below_warmup_epochs(hold, warmup):
    with pytest.raises(ValueError, match="hold_epochs .* must be smaller than warmup_epochs"):
        ThreeStageSchedule(hold_epochs=hold, warmup_epochs=warmup)


@pytest.mark.parametrize("arg", ["hold_epochs", "warmup_epochs"])
@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "ten"])
def test_three_stage_rejects_invalid_epoch_arguments_naming_them(arg, bad):
    with pytest.raises(ValueError, match=arg):
        ThreeStageSchedule(**{arg: bad})


@pytest.mark.parametrize("bad", [0, -5, float("nan"), "ten"])
def test_linear_rejects_non_positive_or_invalid_epochs(bad):
    with pytest.raises(ValueError, match="epochs"):
        LinearSchedule(epochs=bad)


@pytest.mark.parametrize("schedule", [ThreeStageSchedule(), LinearSchedule(), ConstantSchedule(1e4)])
@pytest.mark.parametrize("bad_epoch", [-1, -1e-9, float("nan"), float("inf"), "x"])
def test_calling_a_schedule_with_an_invalid_epoch_raises_naming_epoch(schedule, bad_epoch):
    with pytest.raises(ValueError, match="epoch"):
        schedule(bad_epoch)


# -- state_dict / load_state_dict ---------------------------------------------------------------


def test_state_dict_holds_the_constructor_arguments():
    s = ThreeStageSchedule(e_initial=1e9, e_final=1e4, hold_epochs=5, warmup_epochs=40)
    assert s.state_dict() == {"e_initial": 1e9, "e_final": 1e4, "hold_epochs": 5, "warmup_epochs": 40}


@pytest.mark.parametrize(
    "original, other",
    [
        (ThreeStageSchedule(e_initial=1e9, e_final=1e4, hold_epochs=5, warmup_epochs=40), ThreeStageSchedule()),
        (LinearSchedule(e_initial=5e6, e_final=5e3, epochs=20), LinearSchedule()),
        (ConstantSchedule(123.0), ConstantSchedule(7.0)),
    ],
)
def test_load_state_dict_restores_a_schedule_exactly(original, other):
    assert other != original
    other.load_state_dict(original.state_dict())
    assert other == original
    for epoch in (0, 4.5, 5, 22.5, 39.9, 40, 100):
        assert other(epoch) == original(epoch)


def test_load_state_dict_accepts_a_partial_state():
    s = ThreeStageSchedule()
    s.load_state_dict({"warmup_epochs": 500})
    assert s == ThreeStageSchedule(warmup_epochs=500)


def test_load_state_dict_rejects_unknown_keys_naming_them():
    s = ThreeStageSchedule()
    with pytest.raises(ValueError, match="epochs_total"):
        s.load_state_dict({"epochs_total": 3})
    assert s == ThreeStageSchedule()


@pytest.mark.parametrize(
    "bad_state",
    [
        {"e_initial": -1},
        {"e_final": 1e12},
        {"hold_epochs": 400},
        {"warmup_epochs": float("nan")},
    ],
)
def test_load_state_dict_with_invalid_values_raises_and_leaves_the_schedule_unchanged(bad_state):
    s = ThreeStageSchedule(e_initial=1e9, e_final=1e4, hold_epochs=5, warmup_epochs=40)
    before = s.state_dict()
    with pytest.raises(ValueError):
        s.load_state_dict(bad_state)
    assert s.state_dict() == before
    assert s(22.5) == pytest.approx(three_stage_formula(22.5, 1e9, 1e4, 5, 40), rel=1e-9)


# -- to_dict / schedule_from_dict / as_schedule ------------------------------------------------


def test_to_dict_names_the_type_and_all_arguments():
    assert ThreeStageSchedule().to_dict() == {
        "type": "three_stage",
        "e_initial": 1e10,
        "e_final": 1e5,
        "hold_epochs": 50,
        "warmup_epochs": 300,
    }
    assert LinearSchedule().to_dict() == {"type": "linear", "e_initial": 1e7, "e_final": 1e4, "epochs": 100}
    assert ConstantSchedule(3e4).to_dict() == {"type": "constant", "value": 3e4}


@pytest.mark.parametrize(
    "schedule",
    [
        ThreeStageSchedule(),
        ThreeStageSchedule(e_initial=2e9, e_final=3e3, hold_epochs=0, warmup_epochs=12.5),
        LinearSchedule(),
        LinearSchedule(e_initial=1e6, e_final=1e2, epochs=7),
        ConstantSchedule(42.0),
    ],
)
def test_to_dict_and_schedule_from_dict_round_trip(schedule):
    rebuilt = schedule_from_dict(schedule.to_dict())
    assert type(rebuilt) is type(schedule)
    assert rebuilt == schedule
    assert rebuilt(6.25) == schedule(6.25)


def test_schedule_types_are_three_stage_linear_constant():
    assert SCHEDULE_TYPES == {
        "three_stage": ThreeStageSchedule,
        "linear": LinearSchedule,
        "constant": ConstantSchedule,
    }


def test_schedule_from_dict_fills_omitted_arguments_with_defaults():
    assert schedule_from_dict({"type": "three_stage"}) == ThreeStageSchedule()
    assert schedule_from_dict({"type": "linear", "epochs": 10}) == LinearSchedule(epochs=10)


def test_schedule_from_dict_accepts_a_hyphenated_type_name():
    assert schedule_from_dict({"type": "three-stage"}) == ThreeStageSchedule()


def test_schedule_from_dict_without_type_raises_listing_types():
    with pytest.raises(ValueError, match="no 'type' key.*three_stage, linear, constant"):
        schedule_from_dict({"e_initial": 1e9})


def test_schedule_from_dict_with_unknown_type_raises_naming_it():
    with pytest.raises(ValueError, match="'cosine' is unknown"):
        schedule_from_dict({"type": "cosine"})


def test_schedule_from_dict_with_unknown_key_raises_naming_the_key():
    with pytest.raises(ValueError, match="unknown key.*warmup.*accepted: e_initial, e_final, epochs"):
        schedule_from_dict({"type": "linear", "warmup": 10})


@pytest.mark.parametrize("not_a_mapping", [["three_stage"], "three_stage", 1e5, None])
def test_schedule_from_dict_rejects_a_non_mapping(not_a_mapping):
    with pytest.raises(ValueError, match="mapping"):
        schedule_from_dict(not_a_mapping)


def test_schedule_from_dict_passes_on_argument_validation_errors():
    with pytest.raises(ValueError, match="hold_epochs"):
        schedule_from_dict({"type": "three_stage", "hold_epochs": -3})


def test_schedule_from_dict_of_a_constant_without_value_raises_value_error_naming_value():
    # A constant schedule has no default value: the error must be a ValueError (as for every
    # other invalid schedule dict), not a TypeError from the constructor call.
    with pytest.raises(ValueError, match="value"):
        schedule_from_dict({"type": "constant"})


def test_as_schedule_of_none_is_the_default_three_stage_schedule():
    assert as_schedule(None) == ThreeStageSchedule()


def test_as_schedule_of_a_number_is_a_constant_schedule():
    s = as_schedule(3e4)
    assert s == ConstantSchedule(3e4)
    assert as_schedule(500) == ConstantSchedule(500)


def test_as_schedule_of_a_dict_builds_that_schedule():
    assert as_schedule({"type": "linear", "epochs": 10}) == LinearSchedule(epochs=10)


def test_as_schedule_returns_a_schedule_itself_unchanged():
    s = LinearSchedule()
    assert as_schedule(s) is s


@pytest.mark.parametrize("bad", [[1e5], "three_stage", True, (1, 2)])
def test_as_schedule_rejects_other_types_with_type_error(bad):
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        as_schedule(bad)


def test_schedules_are_equal_only_for_same_type_and_arguments():
    assert ThreeStageSchedule() == ThreeStageSchedule()
    assert ThreeStageSchedule() != ThreeStageSchedule(warmup_epochs=301)
    assert ConstantSchedule(1e4) != LinearSchedule(e_initial=1e4, e_final=1e4)


def test_all_schedules_are_schedule_subclasses():
    assert all(issubclass(cls, Schedule) for cls in SCHEDULE_TYPES.values())


# -- describe / stage_of ------------------------------------------------------------------------


def test_repr_names_class_and_arguments():
    assert repr(ThreeStageSchedule()) == (
        "ThreeStageSchedule(e_initial=1e+10, e_final=100000, hold_epochs=50, warmup_epochs=300)"
    )


def test_describe_shows_stage_boundaries_of_the_three_stage_schedule():
    text = ThreeStageSchedule().describe()
    assert "ThreeStageSchedule(" in text
    assert "0 <= epoch < 50" in text
    assert "50 <= epoch < 300" in text
    assert "epoch >= 300" in text
    assert "log-linear 1.0000e+10 -> 1.0000e+05 kJ/mol" in text


def test_describe_tabulates_e_max_at_boundaries_and_quarter_points_by_default():
    s = ThreeStageSchedule()
    assert s.default_epochs() == [0.0, 50.0, 112.5, 175.0, 237.5, 300.0]
    rows = s.describe().splitlines()[-6:]
    assert [row.split() for row in rows] == [
        ["0", "hold", "1.0000e+10"],
        ["50", "warm-up", "1.0000e+10"],
        ["112.5", "warm-up", "5.6234e+08"],
        ["175", "warm-up", "3.1623e+07"],
        ["237.5", "warm-up", "1.7783e+06"],
        ["300", "final", "1.0000e+05"],
    ]


def test_describe_with_temperature_adds_e_max_in_kt():
    text = ThreeStageSchedule().describe(temperature=300)
    assert "E_max [kT @ 300 K]" in text
    last = text.splitlines()[-1].split()
    assert last == ["300", "final", "1.0000e+05", "4.0091e+04"]


def test_describe_without_temperature_has_no_kt_column():
    assert "kT" not in ThreeStageSchedule().describe()


def test_describe_shows_requested_epochs_sorted_and_deduplicated():
    text = ThreeStageSchedule().describe([1000, 60.5, 1000])
    rows = text.splitlines()[-2:]
    assert rows[0].split() == ["60.5", "warm-up", f"{three_stage_formula(60.5):.4e}"]
    assert rows[1].split() == ["1000", "final", "1.0000e+05"]
    assert text.count("1000  final") == 1


def test_describe_rejects_negative_epochs():
    with pytest.raises(ValueError, match="epoch"):
        ThreeStageSchedule().describe([-1])


def test_describe_of_linear_and_constant_schedules():
    lin = LinearSchedule().describe()
    assert "0 <= epoch < 100" in lin and "5.0050e+06" in lin and "descent" in lin
    const = ConstantSchedule(3e4).describe([0, 10])
    assert "epoch >= 0" in const
    assert const.splitlines()[-1].split() == ["10", "constant", "3.0000e+04"]


@pytest.mark.parametrize(
    "epoch, stage", [(0, "hold"), (49.999, "hold"), (50, "warm-up"), (299.9, "warm-up"), (300, "final"), (1e6, "final")]
)
def test_stage_of_names_the_three_stage_stages(epoch, stage):
    assert ThreeStageSchedule().stage_of(epoch) == stage


@pytest.mark.parametrize("epoch, stage", [(0, "descent"), (99.5, "descent"), (100, "final")])
def test_stage_of_names_the_linear_stages(epoch, stage):
    assert LinearSchedule().stage_of(epoch) == stage


def test_stage_of_constant_schedule_is_constant():
    assert ConstantSchedule(1.0).stage_of(12) == "constant"
