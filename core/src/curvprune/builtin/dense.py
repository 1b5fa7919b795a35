"""Builtin plugin ``builtin.dense``: the exact blockwise damped-Fisher estimator ``dense``.

The estimator itself lives in :mod:`curvprune.testing.dense`, next to the float64 ground truths it
is checked against; it is meant for small d (tests, tiny models, references).
"""

from __future__ import annotations

from curvprune.plugins import hookimpl
from curvprune.registry import Register
from curvprune.testing.dense import DenseConfig, DenseEstimator


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register ``dense``."""
    register("dense", DenseEstimator, config=DenseConfig)
