"""The core's conformance suite for scorers, run on ``sosp-h`` and ``sosp-i``."""

from __future__ import annotations

from curvprune.testing.contracts import SaliencyScorerContract
from curvprune_sosp import plugin

# Register in-process (entry-point autoload off): other installed plugins cannot interfere.
PLUGINS = (("sosp", plugin),)
# The suite's data set has 8 samples: far too few for a stable ranking, which is not tested here.
QUIET = {"min_rank_correlation": 0.0}


class TestSospH(SaliencyScorerContract):
    name = "sosp-h"
    plugins = PLUGINS
    options = QUIET


class TestSospHSigned(SaliencyScorerContract):
    name = "sosp-h"
    plugins = PLUGINS
    options = {**QUIET, "absolute": False}


class TestSospIReverse(SaliencyScorerContract):
    name = "sosp-i"
    plugins = PLUGINS
    options = {**QUIET, "jacobian": "reverse", "dtype": "float64"}


class TestSospIForward(SaliencyScorerContract):
    name = "sosp-i"
    plugins = PLUGINS
    options = {**QUIET, "jacobian": "forward"}
