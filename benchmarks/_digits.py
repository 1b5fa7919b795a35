"""Shared by the digits benchmarks: the dense model's training recipe and whole-set accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def train_adam(model: nn.Module, dataset: TensorDataset, epochs: int) -> nn.Module:
    """Adam (lr 3e-3, batch 64, seed 0) for ``epochs`` passes; returns the model in eval mode."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    """Top-1 accuracy on a whole tensor data set, in eval mode (the model's mode is restored)."""
    x, y = dataset.tensors
    was = model.training
    model.eval()
    with torch.no_grad():
        out = float((model(x).argmax(1) == y).double().mean())
    model.train(was)
    return out
