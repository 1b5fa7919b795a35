"""K-FAC through the core pipeline on the digits MLP (scikit-learn's bundled digits, no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvprune import ConfigError, Pipeline
from curvprune.testing import DigitsMLP, digits_loaders


@pytest.fixture(scope="module")
def digits():
    """A digits MLP trained for a few epochs, and the gradient loader."""
    train_loader, grad_loader, _ = digits_loaders(64, seed=0)
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in train_loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), grad_loader


def _pruned(digits, config):
    dense, loader = digits
    model = DigitsMLP()
    model.load_state_dict(dense.state_dict())
    return model, Pipeline.from_config(config).prune(model, loader)


def _config(scorer: str, steps: int = 2) -> dict:
    return {
        "prune": {"sparsity": 0.8, "loss_samples": 256},
        "estimator": {"name": "kfac", "damping": 1e-3, "num_grads": 256},
        "scorer": {"name": scorer},
        "schedule": {"name": "oneshot", "steps": steps},
        "mask": {"name": "global"},
    }


def test_obs_with_kfac_prunes_and_predicts(digits):
    model, result = _pruned(digits, _config("obs"))
    assert abs(result.sparsity - 0.8) < 1e-3
    assert [s.num_grads for s in result.steps] == [256, 256]
    for step in result.steps:
        assert step.predicted_loss_change is not None and step.predicted_loss_change >= 0
    _, magnitude = _pruned(digits, {"prune": {"sparsity": 0.8, "loss_samples": 256}})
    # K-FAC's OBS with compensation loses less than magnitude pruning at 80 % (same audit set).
    kfac_loss = result.steps[-1].loss_after
    assert kfac_loss < magnitude.steps[-1].loss_after


def test_woodtaylor_with_kfac_gets_the_mean_gradient(digits):
    _, result = _pruned(digits, _config("woodtaylor", steps=1))
    assert abs(result.sparsity - 0.8) < 1e-3
    assert result.steps[0].predicted_loss_change is not None


def test_joint_updates_are_refused_before_compute():
    config = _config("obs")
    config["scorer"]["joint"] = True
    with pytest.raises(ConfigError, match="kfac's blocks are whole layers.*@ scorer.joint"):
        Pipeline.from_config(config)


def test_plan_uses_the_layer_shapes(digits):
    from curvprune_kfac import KFACEstimator

    pipeline = Pipeline.from_config(_config("obs"))
    plan = pipeline.plan(digits[0])
    assert plan.memory["estimator"] == KFACEstimator.plan_memory_bytes(plan.layout, pipeline.estimator.config)
