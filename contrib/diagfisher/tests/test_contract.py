"""``diagfisher`` passes the core estimator contract, against the dense diagonal inverse."""

from curvprune.testing.contracts import CurvatureEstimatorContract
from curvprune.testing.dense import dense_inverse
from curvprune_diagfisher import plugin


class TestDiagFisherContract(CurvatureEstimatorContract):
    name = "diagfisher"
    plugins = [("diagfisher", plugin)]  # in-process: the suite runs installed or not
    exact_block_fisher = False

    def reference_inverse(self, grads, sizes, estimator):
        # Blocks of one weight: the damped Fisher restricted to its diagonal.
        return dense_inverse(grads, sizes, 1, estimator.config.damping)
