"""The core's conformance suites, run on ``woodfisher`` (both algorithms) and ``woodtaylor``."""



from curvprune.testing.contracts import CurvatureEstimatorContract, SaliencyScorerContract
from curvprune_woodfisher import plugin

# Register in-process (entry-point autoload off): other installed plugins cannot interfere.
PLUGINS = (("woodfisher", plugin),)


class TestWoodFisherGram(CurvatureEstimatorContract):
    name = "woodfisher"
    plugins = PLUGINS
    # Block 4 against parameters of 1-12 weights: full blocks, short blocks and blocks wider
    # than a parameter all occur.
    options = {"algorithm": "gram", "block_size": 4}


class TestWoodFisherWoodbury(CurvatureEstimatorContract):
    name = "woodfisher"
    plugins = PLUGINS
    options = {"algorithm": "woodbury", "block_size": 4}



class TestWoodTaylor(SaliencyScorerContract):
    name = "woodtaylor"
    plugins = PLUGINS
    estimator = "woodfisher"
    estimator_options = {"damping": 1e-2, "dtype": "float64", "block_size": 8}


class TestWoodTaylorJoint(SaliencyScorerContract):
    name = "woodtaylor"
    plugins = PLUGINS
    options = {"joint": True}
    estimator = "woodfisher"
    estimator_options = {"damping": 1e-2, "dtype": "float64", "block_size": 8}
