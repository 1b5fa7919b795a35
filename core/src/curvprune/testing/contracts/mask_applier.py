"""Conformance suite for mask appliers: subsets at exact sparsity, idempotent, monotone in the level."""

from __future__ import annotations

from typing import Any, ClassVar

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from curvprune import (
    MaskApplier,
    ParamLayout,
)
from curvprune.testing.contracts._base import (
    ComponentContract,
    contract_settings,
    structure_to_weights,
)


# ------------------------------------------------------------------------------------------------
# Mask appliers
# ------------------------------------------------------------------------------------------------
@st.composite
def _layouts(draw: st.DrawFn) -> ParamLayout:
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6)), min_size=1,
                           max_size=3))
    return ParamLayout(
        names=tuple(f"layer{i}.weight" for i in range(len(shapes))),
        shapes=tuple(torch.Size(s) for s in shapes),
        module_types=("Linear",) * len(shapes),
    )


class MaskApplierContract(ComponentContract):
    """Conformance suite for a :class:`curvprune.MaskApplier`.

    Checks that a new mask is a bool ``[d]`` subset of the current one, reaches the target
    sparsity exactly (within :meth:`rounding_units` units, in the applier's units), is a fixed
    point when applied again at the same level, and that masks for increasing levels are nested
    (distinct scores). Scores with ties are drawn too: ties must not break exactness.

    Attributes:
        name: registered mask applier name.
        options: its config options.
        max_sparsity: levels are drawn in [0, max_sparsity].
    """

    kind = "mask"
    max_sparsity: ClassVar[float] = 0.9

    def make(self, **overrides: Any) -> MaskApplier:
        """Build the applier from ``options`` and ``overrides``."""
        return self._create(**{**self.options, **overrides})

    def layouts(self) -> st.SearchStrategy[ParamLayout]:
        """Layouts to draw (default: 1–3 ``[out, in]`` weights, 1–5 × 1–6)."""
        return _layouts()

    def rounding_units(self, applier: MaskApplier, layout: ParamLayout) -> int:
        """Units by which the achieved count may miss target·units (default: 1, one rounding)."""
        return 1

    def _units(self, applier: MaskApplier, layout: ParamLayout) -> int:
        return layout.d if applier.granularity == "weight" else layout.n_structures

    def _expand(self, applier: MaskApplier, layout: ParamLayout, unit_mask: Tensor) -> Tensor:
        if applier.granularity == "weight":
            return unit_mask
        return structure_to_weights(unit_mask, layout)

    def _problem(
        self, data: st.DataObject, *, distinct: bool = False
    ) -> tuple[MaskApplier, ParamLayout, Tensor, Tensor]:
        applier = self.make()
        layout = data.draw(self.layouts(), label="layout")
        n = self._units(applier, layout)
        if distinct:
            values = data.draw(st.permutations(range(n)), label="score ranks")
            scores = torch.tensor(values, dtype=torch.float64)
        else:
            elements = st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 10, allow_subnormal=False)
            scores = torch.from_numpy(data.draw(hnp.arrays(np.float64, (n,), elements=elements),
                                                label="scores"))
        keep = torch.from_numpy(data.draw(hnp.arrays(np.bool_, (n,)), label="current mask"))
        return applier, layout, scores, self._expand(applier, layout, keep)

    def _check_step(self, applier: MaskApplier, layout: ParamLayout, before: Tensor,
                    after: Tensor, level: float) -> None:
        assert after.dtype == torch.bool and after.shape == (layout.d,), (
            f"select must return bool [{layout.d}], got {after.dtype} {tuple(after.shape)}"
        )
        assert not bool((after & ~before).any()), "select revived pruned weights"
        if applier.granularity == "channel":
            channel = layout.channel_index()
            per_channel = torch.zeros(sum(layout.channels), dtype=torch.long).index_add_(
                0, channel, after.long()
            )
            size = torch.zeros_like(per_channel).index_add_(0, channel, torch.ones_like(channel))
            assert bool(((per_channel == 0) | (per_channel == size)).all()), (
                "a channel mask must keep or remove whole channels"
            )
        units = self._units(applier, layout)
        achieved = applier.achieved_sparsity(after, layout)
        floor = applier.achieved_sparsity(before, layout)
        wanted = max(level, floor)
        slack = self.rounding_units(applier, layout)
        assert abs(achieved - wanted) * units <= slack + 1e-9, (
            f"target sparsity {level} (current {floor:.4f}) over {units} units gave "
            f"{achieved:.4f}: off by {abs(achieved - wanted) * units:.2f} units (allowed {slack})"
        )

    @settings(contract_settings, max_examples=25)
    @given(data=st.data())
    def test_subset_and_exact_sparsity(self, data: st.DataObject) -> None:
        """Each new mask is a subset of the current one at exactly the target sparsity."""
        applier, layout, scores, mask = self._problem(data)
        levels = data.draw(st.lists(st.floats(0, self.max_sparsity), min_size=1, max_size=3),
                           label="levels")
        for level in sorted(levels):
            new = applier.select(scores, mask, level, layout)
            self._check_step(applier, layout, mask, new, level)
            mask = new

    @settings(contract_settings, max_examples=25)
    @given(data=st.data())
    def test_idempotent_at_the_same_level(self, data: st.DataObject) -> None:
        """Selecting again at the same level leaves the mask unchanged."""
        applier, layout, scores, mask = self._problem(data)
        level = data.draw(st.floats(0, self.max_sparsity), label="level")
        once = applier.select(scores, mask, level, layout)
        twice = applier.select(scores, once, level, layout)
        assert torch.equal(once, twice), (
            f"selecting again at sparsity {level} changed the mask: "
            f"{int((once != twice).sum())} weights differ"
        )

    @settings(contract_settings, max_examples=25)
    @given(data=st.data())
    def test_monotone_over_increasing_levels(self, data: st.DataObject) -> None:
        """Masks for increasing levels are nested (distinct scores)."""
        applier, layout, scores, mask = self._problem(data, distinct=True)
        levels = sorted(data.draw(st.lists(st.floats(0, self.max_sparsity), min_size=2,
                                           max_size=3), label="levels"))
        masks = [applier.select(scores, mask, level, layout) for level in levels]
        for i in range(len(levels) - 1):
            assert not bool((masks[i + 1] & ~masks[i]).any()), (
                f"the mask at sparsity {levels[i + 1]} keeps weights the mask at {levels[i]} "
                "removes"
            )
