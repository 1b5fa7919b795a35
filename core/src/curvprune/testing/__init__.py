"""Tools for testing curvprune plugins: the kit a plugin's test suite builds on.

* :mod:`curvprune.testing.contracts`: conformance suites (``CurvatureEstimatorContract``,
  ``SaliencyScorerContract``, ``MaskApplierContract``, ``SchedulerContract``) that a plugin's test
  module subclasses.
* :mod:`curvprune.testing.strategies`: bounded, shrinkable Hypothesis strategies for Fisher
  problems.
* :mod:`curvprune.testing.dense`: float64 ground truths and the exact ``dense`` estimator.
* :mod:`curvprune.testing.nets`: small CNNs and ResNets (basic and bottleneck blocks, option-A
  pad and concat shortcuts) for tests of channel structures, gates and removal.
* :mod:`curvprune.testing.digits`: the digits models (``DigitsMLP``, ``DigitsCNN``) and
  ``digits_loaders``, for a plugin's end-to-end tests on scikit-learn's bundled digits.
* :mod:`curvprune.testing.causal_lm`: ``tiny_causal_lm`` saves a tiny GPT-2 and a word-level
  tokenizer into one folder (offline), and ``sample_text`` writes text for it, for tests of
  ``hf:`` models with ``[data] name = "text"``.
* :mod:`curvprune.testing.distributed`: ``run_distributed`` runs a function in N gloo processes
  (torch.distributed tests: N processes against one).
* :mod:`curvprune.testing.pytest_plugin`: fixtures (``plugin_host``, ``fake_dist``,
  ``hook_recorder``) and Hypothesis profiles; load it with ``-p curvprune.testing.pytest_plugin``.

Submodules load on first use, so ``import curvprune.testing`` imports neither pytest nor
Hypothesis until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from curvprune.testing.causal_lm import sample_text, tiny_causal_lm
    from curvprune.testing.contracts import (
        CurvatureEstimatorContract,
        MaskApplierContract,
        SaliencyScorerContract,
        SchedulerContract,
    )
    from curvprune.testing.dense import (
        DenseConfig,
        DenseEstimator,
        allclose_report,
        assert_allclose,
        block_mask,
        condition_number,
        damped_fisher,
        dense_inverse,
        quadratic_loss_change,
    )
    from curvprune.testing.digits import DigitsCNN, DigitsLoaders, DigitsMLP, digits_loaders
    from curvprune.testing.distributed import free_port, run_distributed
    from curvprune.testing.strategies import (
        FisherProblem,
        block_sizes,
        dampings,
        fisher_problems,
        gradients,
        sizes,
        well_conditioned_spd,
    )

__all__ = [
    "CurvatureEstimatorContract",
    "DenseConfig",
    "DenseEstimator",
    "DigitsCNN",
    "DigitsLoaders",
    "DigitsMLP",
    "FisherProblem",
    "MaskApplierContract",
    "SaliencyScorerContract",
    "SchedulerContract",
    "allclose_report",
    "assert_allclose",
    "block_mask",
    "block_sizes",
    "condition_number",
    "dampings",
    "damped_fisher",
    "dense_inverse",
    "digits_loaders",
    "fisher_problems",
    "free_port",
    "gradients",
    "quadratic_loss_change",
    "run_distributed",
    "sample_text",
    "sizes",
    "tiny_causal_lm",
    "well_conditioned_spd",
]

_SUBMODULE = {
    **dict.fromkeys(
        ("CurvatureEstimatorContract", "MaskApplierContract", "SaliencyScorerContract",
         "SchedulerContract"),
        "contracts",
    ),
    **dict.fromkeys(
        ("DenseConfig", "DenseEstimator", "allclose_report", "assert_allclose", "block_mask",
         "condition_number", "damped_fisher", "dense_inverse", "quadratic_loss_change"),
        "dense",
    ),
    **dict.fromkeys(
        ("FisherProblem", "block_sizes", "dampings", "fisher_problems", "gradients", "sizes",
         "well_conditioned_spd"),
        "strategies",
    ),
    **dict.fromkeys(("DigitsCNN", "DigitsLoaders", "DigitsMLP", "digits_loaders"), "digits"),
    **dict.fromkeys(("free_port", "run_distributed"), "distributed"),
    **dict.fromkeys(("sample_text", "tiny_causal_lm"), "causal_lm"),
}


def __getattr__(name: str) -> Any:
    module = _SUBMODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'curvprune.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"curvprune.testing.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
