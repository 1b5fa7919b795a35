"""The builtin schedules: closed forms, the reference numbers of the research memo, events."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import curvprune
from curvprune.builtin.schedules import GradualSchedule, OneShotSchedule, spaced_levels
from curvprune.config import PruneConfig

# Builtins only: the tests must not depend on which other plugins happen to be installed.
HOST = curvprune.get_plugin_manager(autoload=False)


def create(kind: str, name: str, **options):
    return curvprune.create(kind, name, host=HOST, **options)


# Levels are a handful of float64 operations on numbers in [0, 1]: a few ulps of round-off.
ULPS = 1e-12

fractions = st.integers(0, 99).map(lambda k: k / 100)


# --------------------------------------------------------------------------------------------
# Registration and options
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "cls", "during_training"),
    [
        ("oneshot", {"steps": 4, "spacing": "poly", "power": 3.0}, OneShotSchedule, False),
        (
            "gradual",
            {"start": 2, "end": 50, "frequency": 4, "initial_sparsity": 0.1},
            GradualSchedule,
            True,
        ),
    ],
)
def test_registered_by_name(name, options, cls, during_training):
    schedule = create("schedule", name, **options)
    assert type(schedule) is cls
    assert schedule.during_training is during_training
    for key, value in options.items():
        assert getattr(schedule.config, key) == value


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("oneshot", {"steps": 0}, "steps"),
        ("oneshot", {"spacing": "cubic"}, "spacing"),
        ("oneshot", {"power": 0}, "power"),
        ("oneshot", {"steps": 1.5}, "steps"),
        ("gradual", {"start": -1}, "start"),
        ("gradual", {"start": 10, "end": 5}, "end"),
        ("gradual", {"frequency": 0}, "frequency"),
        ("gradual", {"power": -3}, "power"),
        ("gradual", {"initial_sparsity": 1.0}, "initial_sparsity"),
        ("gradual", {"freqency": 10}, "freqency"),
        ("gradual", {"substeps": 0}, "substeps"),
    ],
)
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(curvprune.ConfigError, match=field):
        create("schedule", name, **options)


# --------------------------------------------------------------------------------------------
# oneshot
# --------------------------------------------------------------------------------------------
def test_oneshot_default_is_one_step_to_the_target():
    schedule = create("schedule", "oneshot")
    assert schedule.levels(0.9) == [0.9]
    assert schedule.level_at(0, 0.9) is None
    assert schedule.finished(0)


def test_oneshot_geometric_memo_numbers():
    # M-FAC recomputations, 0 -> 0.9 in 16 sub-steps: densities 0.1^(j/16).
    levels = create("schedule", "oneshot", steps=16).levels(0.9)
    assert len(levels) == 16
    assert levels[0] == pytest.approx(0.134, abs=5e-4)
    for j, level in enumerate(levels, start=1):
        assert level == pytest.approx(1 - 0.1 ** (j / 16), abs=ULPS)
    assert levels[-1] == 0.9


def test_oneshot_geometric_keeps_a_constant_fraction_per_step():
    levels = create("schedule", "oneshot", steps=5).levels(0.95, 0.2)
    densities = [0.8] + [1 - s for s in levels]
    ratios = [b / a for a, b in zip(densities, densities[1:], strict=False)]
    assert ratios == pytest.approx([(0.05 / 0.8) ** (1 / 5)] * 5, abs=ULPS)


def test_oneshot_poly_memo_numbers():
    # WoodFisher --recompute-num 2 --recompute-schedule poly --recompute-degree 2, 0 -> 0.9.
    levels = create("schedule", "oneshot", steps=3, spacing="poly", power=2).levels(0.9)
    assert levels == pytest.approx([0.5, 0.8, 0.9], abs=ULPS)
    assert levels[-1] == 0.9


def test_oneshot_linear_is_equal_increments():
    levels = create("schedule", "oneshot", steps=4, spacing="linear").levels(0.8, 0.4)
    assert levels == pytest.approx([0.5, 0.6, 0.7, 0.8], abs=ULPS)


def test_oneshot_nothing_to_do():
    schedule = create("schedule", "oneshot", steps=4)
    assert schedule.levels(0.5, 0.5) == []
    assert schedule.levels(0.3, 0.6) == []


def test_oneshot_rejects_levels_outside_the_unit_interval():
    schedule = create("schedule", "oneshot")
    with pytest.raises(ValueError, match="target must be a sparsity in"):
        schedule.levels(1.0)
    with pytest.raises(ValueError, match="current must be a sparsity in"):
        schedule.levels(0.5, -0.1)


@given(
    steps=st.integers(1, 40),
    spacing=st.sampled_from(["geometric", "poly", "linear"]),
    power=st.floats(0.25, 6.0),
    current=fractions,
    target=fractions,
)
def test_oneshot_levels_are_monotone_and_end_at_the_target(steps, spacing, power, current, target):
    schedule = create("schedule", "oneshot", steps=steps, spacing=spacing, power=power)
    levels = schedule.levels(target, current)
    if target <= current:
        assert levels == []
        return
    assert len(levels) == steps
    assert levels[-1] == target
    assert all(current <= a <= b <= target for a, b in zip(levels, levels[1:], strict=False))
    assert levels[0] > current or math.isclose(levels[0], current, abs_tol=ULPS)


# --------------------------------------------------------------------------------------------
# gradual
# --------------------------------------------------------------------------------------------
def memo_schedule() -> GradualSchedule:
    # WoodFisher's ResNet-50 config: epochs [start, freq, end] = [1, 5, 40], s_i = 0.05.
    return create("schedule", "gradual", start=1, end=40, frequency=5, initial_sparsity=0.05)


def test_gradual_memo_numbers():
    schedule = memo_schedule()
    assert schedule.level_at(1, 0.9) == 0.05
    assert schedule.level_at(6, 0.9) == pytest.approx(0.337, abs=5e-4)
    assert schedule.level_at(11, 0.9) == pytest.approx(0.551, abs=5e-4)
    assert schedule.level_at(36, 0.9) == pytest.approx(0.899, abs=5e-4)
    assert schedule.level_at(40, 0.9) == 0.9  # the added event at `end` hits the target exactly


def test_gradual_closed_form():
    schedule = memo_schedule()
    for step in schedule.event_steps():
        expected = 0.9 - (0.9 - 0.05) * (1 - (step - 1) / 39) ** 3  # Zhu & Gupta (2017), Eq. 1
        assert schedule.level_at(step, 0.9) == pytest.approx(expected, abs=ULPS)


def test_gradual_events_exactly_on_the_grid_and_at_the_end():
    schedule = memo_schedule()
    events = [t for t in range(60) if schedule.level_at(t, 0.9) is not None]
    assert events == [1, 6, 11, 16, 21, 26, 31, 36, 40]
    assert events == schedule.event_steps()
    assert [t for t in range(60) if schedule.is_event(t)] == events


def test_gradual_end_on_the_grid_is_not_doubled():
    schedule = create("schedule", "gradual", start=0, end=30, frequency=10)
    assert schedule.event_steps() == [0, 10, 20, 30]


def test_gradual_start_equals_end():
    schedule = create("schedule", "gradual", start=7, end=7, frequency=3, initial_sparsity=0.2)
    assert [t for t in range(20) if schedule.level_at(t, 0.6) is not None] == [7]
    assert schedule.level_at(7, 0.6) == 0.6


def test_gradual_finished():
    schedule = memo_schedule()
    assert [schedule.finished(t) for t in (0, 1, 39, 40, 41)] == [False, False, False, True, True]


def test_gradual_is_stateless():
    schedule = memo_schedule()
    assert schedule.state_dict() == {}
    schedule.load_state_dict({})
    assert schedule.level_at(6, 0.9) == memo_schedule().level_at(6, 0.9)


def test_gradual_check_pipeline():
    schedule = create("schedule", "gradual", initial_sparsity=0.6)
    reason = schedule.check_pipeline({"prune": PruneConfig(sparsity=0.5)})
    assert reason is not None and "initial_sparsity = 0.6" in reason and "0.5" in reason
    assert schedule.check_pipeline({"prune": PruneConfig(sparsity=0.6)}) is None


@given(
    start=st.integers(0, 30),
    length=st.integers(0, 60),
    frequency=st.integers(1, 20),
    power=st.floats(0.5, 5.0),
    initial=fractions,
    target=fractions,
)
def test_gradual_levels_are_monotone_and_hit_the_target(
    start, length, frequency, power, initial, target
):
    initial = min(initial, target)
    schedule = create(
        "schedule",
        "gradual",
        start=start,
        end=start + length,
        frequency=frequency,
        power=power,
        initial_sparsity=initial,
    )
    steps = range(start + length + 5)
    levels = [(t, schedule.level_at(t, target)) for t in steps]
    events = [(t, s) for t, s in levels if s is not None]
    assert [t for t, _ in events] == schedule.event_steps()
    assert events[-1] == (start + length, target)
    if length:
        assert events[0] == (start, initial)
    values = [s for _, s in events]
    assert all(initial <= a <= b <= target for a, b in zip(values, values[1:], strict=False))
    gaps = [b - a for a, b in zip(schedule.event_steps(), schedule.event_steps()[1:], strict=False)]
    assert all(0 < g <= frequency for g in gaps)


# --------------------------------------------------------------------------------------------
# gradual sub-steps (M-FAC's --nrecomps)
# --------------------------------------------------------------------------------------------
def test_gradual_substeps_split_each_event_geometrically():
    schedule = create("schedule", "gradual", start=0, end=20, frequency=10, substeps=4)
    assert schedule.levels_at(3, 0.9, 0.0) == []  # no event
    s10 = schedule.level_at(10, 0.9)
    levels = schedule.levels_at(10, 0.9, 0.2)
    assert len(levels) == 4 and levels[-1] == s10
    # density after sub-step j: 0.8·((1 − s10)/0.8)^(j/4), the oneshot geometric rule
    for j, level in enumerate(levels, start=1):
        assert level == pytest.approx(1 - 0.8 * ((1 - s10) / 0.8) ** (j / 4), abs=ULPS)
    oneshot = create("schedule", "oneshot", steps=4, spacing="geometric")
    assert levels == oneshot.levels(s10, 0.2)
    assert schedule.levels_at(10, 0.9, s10) == []  # already there: nothing to do


def test_gradual_one_substep_is_the_plain_event_and_mfac_reference_numbers():
    plain = create("schedule", "gradual", start=0, end=20, frequency=10)
    assert plain.config.substeps == 1
    assert plain.levels_at(10, 0.9, 0.1) == [plain.level_at(10, 0.9)]
    # The M-FAC reference, 0 → 0.9 in --nrecomps 16: densities 0.1^(j/16).
    levels = spaced_levels(0.0, 0.9, 16)
    assert levels[0] == pytest.approx(1 - 0.1 ** (1 / 16), abs=ULPS)  # ≈ 13.4 %
    assert levels[-1] == 0.9


def test_default_levels_at_wraps_level_at():
    class OneLevel(curvprune.Scheduler):
        during_training = True

        def level_at(self, step, target):
            return 0.5 if step == 2 else None

    schedule = OneLevel()
    assert schedule.levels_at(1, 0.9, 0.0) == []
    assert schedule.levels_at(2, 0.9, 0.0) == [0.5]
    assert schedule.levels_at(2, 0.9, 0.5) == []


def test_oneshot_default_spacing_and_the_documented_cubic_levels():
    # docs/methods/woodfisher.md: geometric stays the default; cubic is the documented option.
    assert create("schedule", "oneshot").config.spacing == "geometric"
    cubic = create("schedule", "oneshot", steps=4, spacing="poly", power=3).levels(0.95)
    expected = [0.95 * (1 - (1 - j / 4) ** 3) for j in range(1, 5)]
    assert cubic == pytest.approx(expected, abs=ULPS)
    assert [round(x, 3) for x in cubic] == [0.549, 0.831, 0.935, 0.95]
    geometric = create("schedule", "oneshot", steps=4).levels(0.95)
    assert geometric[-1] - geometric[-2] > 3 * (cubic[-1] - cubic[-2])  # cubic's small last step
