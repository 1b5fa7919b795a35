"""Small models and helpers shared by the greg tests (made-up tensors; nothing downloaded)."""

from __future__ import annotations

import math

import torch
from torch import nn

import curvprune
from curvprune_greg import GRegConfig, GRegSchedule


def tiny_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """conv(2→6) - ReLU - conv(6→5) - ReLU - flatten - linear(5·4·4 → 3): no coupling, no BN."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 16, 3))
    return model.to(dtype)


def bound_schedule(model: nn.Module, sparsity: float = 0.5, **options) -> tuple[GRegSchedule, curvprune.ParamLayout]:
    """A greg schedule bound to ``model``'s Conv/Linear weights."""
    schedule = GRegSchedule(GRegConfig(**options))
    layout = curvprune.select_parameters(model)
    schedule.bind(model, layout, sparsity)
    return schedule, layout


def reference_pick(weight: torch.Tensor, granularity: str, ratio: float) -> torch.Tensor:
    """The n_p = min(ceil(r·n), n − 1) groups of lowest mean |w|, from the definition (memo §1.2)."""
    w = weight.detach().abs().double()
    if granularity == "filter":
        scores = w.reshape(w.shape[0], -1).mean(1)
    elif granularity == "channel":
        scores = w.transpose(0, 1).reshape(w.shape[1], -1).mean(1)
    else:
        scores = w.reshape(-1)
    n = scores.numel()
    n_p = min(math.ceil(round(ratio * n, 9)), n - 1)
    picked = torch.zeros(n, dtype=torch.bool)
    picked[torch.argsort(scores, stable=True)[:n_p]] = True
    return picked


def expand(groups: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """Per-group values as a full tensor of ``shape``."""
    if granularity == "filter":
        return groups.reshape(-1, *[1] * (len(shape) - 1)).expand(shape)
    if granularity == "channel":
        return groups.reshape(1, -1, *[1] * (len(shape) - 2)).expand(shape)
    return groups.reshape(shape)
