"""Conformance suite for schedules: monotone levels ending at the target, state round trips."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from curvprune import (
    Scheduler,
)
from curvprune.testing.contracts._base import ComponentContract, contract_settings


# ------------------------------------------------------------------------------------------------
# Schedulers
# ------------------------------------------------------------------------------------------------
def _equal_state(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class SchedulerContract(ComponentContract):
    """Conformance suite for a :class:`curvprune.Scheduler`.

    Checks that one-shot ``levels`` are non-decreasing, within [current, target] and end at the
    target; that ``level_at`` over ``horizon`` steps gives levels in [0, target] (and < 1) that
    never decrease; and that ``state_dict``/``load_state_dict`` round-trips mid-schedule.

    Attributes:
        name: registered schedule name.
        options: its config options.
        horizon: optimizer steps walked by the training-loop checks.
    """

    kind = "schedule"
    horizon: ClassVar[int] = 64

    def make(self, **overrides: Any) -> Scheduler:
        """Build the schedule from ``options`` and ``overrides``."""
        return self._create(**{**self.options, **overrides})

    @contract_settings
    @given(target=st.floats(0, 0.99), current_fraction=st.floats(0, 1))
    def test_levels_end_at_target_and_never_decrease(
        self, target: float, current_fraction: float
    ) -> None:
        """levels() is non-decreasing, starts at or above current and ends at target."""
        current = target * current_fraction
        levels = list(self.make().levels(target, current))
        assert levels, "levels() returned no level"
        assert levels[-1] == target, f"levels {levels} do not end at the target {target}"
        rising = all(a <= b for a, b in zip(levels, levels[1:], strict=False))
        assert rising, f"levels {levels} decrease"
        assert current <= levels[0], f"levels {levels} go below the current sparsity {current}"

    @contract_settings
    @given(target=st.floats(0, 0.99))
    def test_level_at_is_in_range_and_never_decreases(self, target: float) -> None:
        """level_at gives levels in [0, target] that never decrease over steps."""
        schedule = self.make()
        previous = 0.0
        for step in range(self.horizon):
            level = schedule.level_at(step, target)
            if level is None:
                continue
            assert 0.0 <= level < 1.0, f"level_at({step}) = {level} is outside [0, 1)"
            assert level <= target, f"level_at({step}) = {level} exceeds the target {target}"
            assert level >= previous, f"level_at({step}) = {level} < an earlier level {previous}"
            previous = level

    @contract_settings
    @given(target=st.floats(0.1, 0.99), data=st.data())
    def test_state_dict_round_trip(self, target: float, data: st.DataObject) -> None:
        """A schedule restored from state_dict continues exactly like the original."""
        original = self.make()
        pause = data.draw(st.integers(0, self.horizon - 1), label="pause")
        for step in range(pause):
            original.level_at(step, target)
        state = original.state_dict()
        restored = self.make()
        restored.load_state_dict(copy.deepcopy(state))
        assert _equal_state(restored.state_dict(), state), (
            f"state_dict after load_state_dict differs: {restored.state_dict()} != {state}"
        )
        for step in range(pause, self.horizon):
            a, b = original.level_at(step, target), restored.level_at(step, target)
            assert a == b, f"after restoring at step {pause}, level_at({step}) gives {b}, not {a}"
            assert original.finished(step) == restored.finished(step), f"finished({step}) differs"
