"""The core's estimator conformance suite, run on ``mfac``: both algorithms, unblocked and blocked."""

from curvprune.testing.contracts import CurvatureEstimatorContract
from curvprune_mfac import plugin

# Register in-process (entry-point autoload off): other installed plugins cannot interfere.
PLUGINS = (("mfac", plugin),)


class TestStaticUnblocked(CurvatureEstimatorContract):
    name = "mfac"
    plugins = PLUGINS
    options = {"algorithm": "static", "block_size": None}


class TestStaticBlocked(CurvatureEstimatorContract):
    name = "mfac"
    plugins = PLUGINS
    # Block 4 against parameters of 1-12 weights: full, short and parameter-wide blocks occur.
    options = {"algorithm": "static", "block_size": 4, "blocks": "fixed"}


class TestDynamicUnblocked(CurvatureEstimatorContract):
    name = "mfac"
    plugins = PLUGINS
    # window unset = num_grads, which the suite sets to the drawn m: the window holds them all.
    options = {"algorithm": "dynamic", "block_size": None}


# blocks = "alive" (the static default) straddles parameters, which the core's contract forbids
# (test_block_structure); it is checked against its own dense ground truth in
# test_alive_blocks.py.


class TestDynamicBlocked(CurvatureEstimatorContract):
    name = "mfac"
    plugins = PLUGINS
    options = {"algorithm": "dynamic", "block_size": 4}
