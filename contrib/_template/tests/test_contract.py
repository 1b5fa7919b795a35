"""The core conformance suite for curvature estimators, against the isotropic dense inverse."""

import torch

from curvprune.testing.contracts import CurvatureEstimatorContract
from curvprune.testing.dense import damped_fisher
from curvprune_example import plugin


class TestIsotropicContract(CurvatureEstimatorContract):
    name = "isotropic"                   # the name plugin.py registers
    plugins = [("example", plugin)]      # registered in-process: runs whether installed or not
    exact_block_fisher = False           # an approximation: reference_inverse says of what
    memory_scales_with_d = False         # its state is one scalar, whatever d

    def reference_inverse(self, grads, sizes, estimator):
        fisher = damped_fisher(grads, sizes, None, estimator.config.damping)
        d = fisher.shape[0]
        return torch.eye(d, dtype=torch.float64) * (d / fisher.trace())
