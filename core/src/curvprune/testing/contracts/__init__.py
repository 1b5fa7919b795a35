"""Conformance suites for the four roles: a plugin's test module subclasses them.

Every component, first- or third-party, is held to the same checks::

    from curvprune.testing.contracts import CurvatureEstimatorContract

    class TestWoodFisher(CurvatureEstimatorContract):
        name = "woodfisher"
        options = {"block_size": 4}

pytest collects the inherited ``test_*`` methods in each subclass named ``Test*`` (the contract
classes themselves are not collected). Components are built by name through the plugin registry
(:func:`curvprune.create`), so the suite also checks registration and config structuring. A
component whose distribution is not installed (a freshly copied plugin) can be registered
in-process with the ``plugins`` class attribute.

The suites use Hypothesis with the bounded strategies of :mod:`curvprune.testing.strategies`;
values are drawn inside the tests (``st.data()``), so a subclass can change what is drawn by
overriding the small strategy methods (``sizes_strategy``, ``layouts``, ...).

Tolerances: exactness checks run in float64 against :mod:`curvprune.testing.dense` and allow
errors of ``rtol·‖F⁻¹‖₂·‖v‖`` with ``rtol = c·(d + m)·eps·κ``, ``c = rtol_factor`` (4) and
``κ = max(cond(F), ‖F‖₂/λ)``. A backward-stable factorization or solve has error
≲ d·eps·cond(F) relative to ‖F⁻¹‖₂‖v‖; a recursion that starts at F₀⁻¹ = I/λ and applies m
rank-1 corrections (Woodbury) cancels terms of size 1/λ, so its error is ≲ eps/λ per update in
absolute terms, which is eps·‖F‖₂/λ·λ_min(F)/‖F‖₂ ≤ eps·‖F‖₂/λ relative to ‖F⁻¹‖₂ = 1/λ_min(F).
For the exact damped Fisher λ_min(F) ≥ λ, so κ = ‖F‖₂/λ, the conditioning of the worst
intermediate F_k of such a recursion.
"""

from __future__ import annotations

from curvprune.testing.contracts.estimator import CurvatureEstimatorContract
from curvprune.testing.contracts.mask_applier import MaskApplierContract
from curvprune.testing.contracts.scheduler import SchedulerContract
from curvprune.testing.contracts.scorer import SaliencyScorerContract

__all__ = [
    "CurvatureEstimatorContract",
    "MaskApplierContract",
    "SaliencyScorerContract",
    "SchedulerContract",
]
