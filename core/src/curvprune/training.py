"""A plain training loop (dense training and fine-tuning) and evaluation.

No training framework is needed: SGD with momentum (or Adam), cosine-annealed learning rate,
and, when a :class:`~curvprune.pipeline.PruningSession` is given, its two calls around every
optimizer step so masks hold (and gradual schedules prune) during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from curvprune.config import TrainConfig
from curvprune.errors import NumericalError
from curvprune.gradients import LossFn, default_loss
from curvprune.pipeline import PruningSession

__all__ = ["evaluate", "make_optimizer", "train"]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam, as ``cfg`` says."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def train(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    *,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    session: PruningSession | None = None,
    loss_fn: LossFn | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[float]:
    """Train for ``cfg.epochs`` epochs; return the mean training loss of each epoch.

    Args:
        model: trained in place (already on ``device``).
        loader: training batches.
        cfg: epochs, optimizer and learning rate.
        device: where batches go.
        optimizer: an existing optimizer (the session's); default: :func:`make_optimizer`.
        session: a pruning session whose masks hold (and whose schedule prunes) while training.
        loss_fn: the loss (default cross entropy).
        on_step: called after every optimizer step (progress bars).

    Raises:
        NumericalError: the training loss became non-finite (checked once per epoch).
    """
    loss_fn = loss_fn or default_loss
    optimizer = optimizer or make_optimizer(model, cfg)
    total_steps = max(1, cfg.epochs * len(loader))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    history: list[float] = []
    step = 0
    model.train()
    for epoch in range(cfg.epochs):
        running = torch.zeros((), device=device, dtype=torch.float64)
        batches = 0
        for x, y in loader:
            scale = 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * scale
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if session is not None:
                session.before_optimizer_step()
            optimizer.step()
            if session is not None:
                session.step()
                model.train()
            running += loss.detach()
            batches += 1
            step += 1
            if on_step is not None:
                on_step()
        mean = float(running / max(batches, 1))
        if not math.isfinite(mean):
            raise NumericalError(
                f"the training loss became non-finite in epoch {epoch + 1}; lower [train]/"
                "[finetune] lr"
            )
        history.append(mean)
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base
    model.eval()
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, *, device: torch.device, loss_fn: LossFn | None = None
) -> tuple[float, float]:
    """``(accuracy, mean loss)`` of ``model`` on ``loader`` in eval mode."""
    loss_fn = loss_fn or default_loss
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            total_loss += loss_fn(out, y).double() * y.shape[0]
            correct += (out.argmax(-1) == y).sum()
            count += y.shape[0]
    finally:
        model.train(was_training)
    return float(correct) / max(count, 1), float(total_loss) / max(count, 1)
