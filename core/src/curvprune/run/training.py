"""A plain training loop (dense training and fine-tuning) and evaluation.

No training framework is needed: SGD with momentum (or Adam), cosine-annealed learning rate,
and, when a :class:`~curvprune.pipeline.session.PruningSession` is given, its two calls around every
optimizer step so masks hold (and gradual schedules prune) during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from curvprune.config import TrainConfig
from curvprune.errors import NumericalError
from curvprune.pipeline.session import PruningSession
from curvprune.tensors import distributed
from curvprune.tensors.gradients import LossFn, default_loss

__all__ = ["METRICS", "LoopState", "evaluate", "make_optimizer", "train"]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam, as ``cfg`` says."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


@attrs.define(kw_only=True)
class LoopState:
    """Where :func:`train` is: enough to continue the loop exactly after an interruption.

    Attributes:
        step: optimizer steps completed (drives the cosine learning rate).
        epoch: the current epoch (0-based).
        batch: batches of the current epoch completed.
        running: sum of the current epoch's batch losses (float64, 0-dim).
        history: mean loss of each completed epoch.
        base_lrs: the learning rate of each parameter group before annealing.
        epoch_rng: the training loader's generator state when the current epoch began (the
            shuffling of the whole epoch derives from it), None if the loader has none.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    running: Tensor = attrs.field(factory=lambda: torch.zeros((), dtype=torch.float64))
    history: list[float] = attrs.field(factory=list)
    base_lrs: list[float] | None = None
    epoch_rng: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loads with ``weights_only=True``)."""
        out = attrs.asdict(self, recurse=False)
        out["running"] = self.running.detach().cpu().clone()
        out["history"] = list(self.history)
        out["base_lrs"] = None if self.base_lrs is None else list(self.base_lrs)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LoopState:
        """The inverse of :meth:`state_dict`."""
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


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
    state: LoopState | None = None,
    after_step: Callable[[LoopState], None] | None = None,
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
        state: where to continue from (a checkpoint's :class:`LoopState`, with the model,
            optimizer and session already restored); updated in place. Continuing mid-epoch
            replays the epoch's shuffling from ``state.epoch_rng`` and skips the batches already
            done (they are loaded, not trained on), so the loop goes on exactly as if never
            interrupted.
        after_step: called with the loop state after every optimizer step (checkpoints).

    Raises:
        NumericalError: the training loss became non-finite (checked once per epoch).
        ValueError: continuing mid-epoch with a loader that has no generator.
    """
    loss_fn = loss_fn or default_loss
    optimizer = optimizer or make_optimizer(model, cfg)
    state = state if state is not None else LoopState()
    if state.base_lrs is None:
        state.base_lrs = [g["lr"] for g in optimizer.param_groups]
    base_lrs = state.base_lrs
    generator: torch.Generator | None = getattr(loader, "generator", None)
    total_steps = max(1, cfg.epochs * len(loader))
    net = distributed.data_parallel(model)  # under torchrun: DDP, each rank a slice of a batch
    model.train()
    while state.epoch < cfg.epochs:
        skip = state.batch
        if skip == 0:
            state.running = torch.zeros((), device=device, dtype=torch.float64)
            state.epoch_rng = generator.get_state() if generator is not None else None
        elif generator is None or state.epoch_rng is None:
            raise ValueError("cannot continue mid-epoch: the loader has no seeded generator")
        else:
            generator.set_state(state.epoch_rng)
            state.running = state.running.to(device)
        for index, (x, y) in enumerate(loader):
            if index < skip:
                continue
            scale = 0.5 * (1 + math.cos(math.pi * state.step / total_steps))
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * scale
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = distributed.sharded_loss(net, loss_fn, x, y)
            loss.backward()
            if session is not None:
                session.before_optimizer_step()
            optimizer.step()
            if session is not None:
                session.step()
                model.train()
            state.running += loss.detach()
            state.batch += 1
            state.step += 1
            if on_step is not None:
                on_step()
            if after_step is not None:
                after_step(state)
        # the ranks' scaled slice losses add up to W × the batch means: every rank decides alike
        running = distributed.all_reduce_sum_(state.running.clone()) / distributed.world_size()
        mean = float(running / max(state.batch, 1))
        if not math.isfinite(mean):
            raise NumericalError(
                f"the training loss became non-finite in epoch {state.epoch + 1}; lower [train]/"
                "[finetune] lr"
            )
        state.history.append(mean)
        state.epoch += 1
        state.batch = 0
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base
    model.eval()
    return list(state.history)


#: What :func:`evaluate` can measure, and whether higher is better.
METRICS: dict[str, bool] = {"accuracy": True, "perplexity": False}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    loss_fn: LossFn | None = None,
    metric: str = "accuracy",
) -> tuple[float, float]:
    """``(metric, mean loss)`` of ``model`` on ``loader`` in eval mode.

    The mean loss weighs every batch by its samples. ``metric`` is the task's
    (:attr:`curvprune.run.data.DataBundle.metric`):

    * ``"accuracy"``: the share of samples whose highest output is the target (classifiers);
    * ``"perplexity"``: exp of the mean loss. For a causal LM with the default loss and
      sequences of one length this is exp of the mean next-token cross-entropy over every
      predicted token, the usual held-out perplexity.

    Raises:
        ValueError: an unknown metric.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose {', '.join(METRICS)})")
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
            if metric == "accuracy":
                correct += (out.argmax(-1) == y).sum()
            count += y.shape[0]
    finally:
        model.train(was_training)
    mean_loss = float(total_loss) / max(count, 1)
    if metric == "perplexity":
        # exp overflows a float past ~709.8: such a model's perplexity is infinite
        return (math.exp(mean_loss) if mean_loss < 709 else math.inf), mean_loss
    return float(correct) / max(count, 1), mean_loss
