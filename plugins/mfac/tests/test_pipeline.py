"""End to end: OBS with mfac (unblocked) prunes a trained digits MLP and beats magnitude."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import curvprune
from curvprune.data import build_data
from curvprune.config import DataConfig
from curvprune.models import DigitsMLP


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    bundle = build_data(DataConfig(name="digits"))
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(bundle.train, batch_size=64, shuffle=True)
    for _ in range(25):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), bundle


def accuracy(model, dataset):
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def prune(model, bundle, estimator, sparsity=0.95):
    cfg = {"prune": {"sparsity": sparsity}, "scorer": {"name": "obs"},
           "schedule": {"name": "oneshot", "steps": 4}}
    if estimator is None:
        cfg["scorer"] = {"name": "magnitude"}
    else:
        cfg["estimator"] = estimator
    pruned = copy.deepcopy(model)
    loader = DataLoader(bundle.train, batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    result = curvprune.Pipeline.from_config(cfg).prune(pruned, loader)
    return pruned, result


def test_obs_with_mfac_beats_magnitude_at_95_percent(trained):
    model, bundle = trained
    dense = accuracy(model, bundle.test)
    assert dense > 0.9
    mfac, result = prune(model, bundle, {"name": "mfac", "num_grads": 64,
                                         "fisher_mini_batch": 16})
    assert abs(result.sparsity - 0.95) < 1e-3
    weights = torch.cat([p.detach().reshape(-1) for n, p in mfac.named_parameters()
                         if n.endswith("weight")])
    assert abs(float((weights == 0).float().mean()) - 0.95) < 1e-3
    magnitude, _ = prune(model, bundle, None)
    acc_mfac, acc_mag = accuracy(mfac, bundle.test), accuracy(magnitude, bundle.test)
    assert acc_mfac > acc_mag + 0.05, (acc_mfac, acc_mag)
