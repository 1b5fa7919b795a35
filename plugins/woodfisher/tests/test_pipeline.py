"""WoodFisher through the core pipeline: global OBS one-shot in steps, and gradual during training."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune.testing import DigitsMLP


def _loader(n: int = 128, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    teacher = torch.nn.Linear(64, 10)
    with torch.no_grad():
        y = teacher(x.flatten(1)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def _trained(loader: DataLoader) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def _config(schedule: dict, sparsity: float) -> dict:
    return {
        "prune": {"sparsity": sparsity, "loss_samples": 128},
        "estimator": {"name": "woodfisher", "block_size": 64, "damping": 1e-3, "num_grads": 64},
        "scorer": {"name": "obs"},
        "schedule": schedule,
        "mask": {"name": "global"},
    }


def _loss(model: nn.Module, loader: DataLoader) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in loader) / len(loader)


def test_multistep_oneshot_obs_beats_magnitude():
    loader = _loader()
    dense = _trained(loader)
    results = {}
    for name, cfg in {
        "woodfisher": _config({"name": "oneshot", "steps": 4}, 0.9),
        "magnitude": {"prune": {"sparsity": 0.9, "loss_samples": 0}},
    }.items():
        model = DigitsMLP()
        model.load_state_dict(dense.state_dict())
        result = curvprune.Pipeline.from_config(cfg).prune(model, loader)
        assert abs(result.sparsity - 0.9) < 1e-3
        results[name] = _loss(model, loader)
        if name == "woodfisher":
            assert len(result.steps) == 4
            assert all(s.predicted_loss_change is not None and s.num_grads == 64 for s in result.steps)
    # same data, same trained model: the second-order update must do better than magnitude at 90 %
    assert results["woodfisher"] < results["magnitude"]


def test_gradual_pruning_with_periodic_recomputation():
    loader = _loader()
    model = _trained(loader)
    pipe = curvprune.Pipeline.from_config(
        _config({"name": "gradual", "start": 0, "end": 12, "frequency": 4, "initial_sparsity": 0.2},
                0.8)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    session = pipe.attach(model, opt, data=loader)
    for _ in range(4):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            session.before_optimizer_step()
            opt.step()
            session.step()
    result = session.close()
    assert [s.train_step for s in result.steps] == [0, 4, 8, 12]
    assert [round(s.target_sparsity, 4) for s in result.steps][-1] == 0.8
    assert all(s.num_grads == 64 for s in result.steps), "curvature recomputed at every event"
    layout = pipe.select(model)
    assert bool((layout.gather(model)[~result.masks.flat] == 0).all())
