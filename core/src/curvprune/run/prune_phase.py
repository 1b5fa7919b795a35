"""The prune phase of schedules that bring their own training (``Scheduler.prune_phase``, GReg).

Such a schedule decides while training when its units are ready to go (GReg: a growing penalty has
driven them near zero), so it cannot live inside ``[finetune]``'s fixed epochs. ``curvprune run``
instead trains the model with the schedule's own optimizer (GReg: SGD at a constant ``lr_prune``),
iterating over the training data epoch after epoch, until the schedule has removed its units; the
accuracy right after the removal is then measured, and ``[finetune]`` follows with a fresh
optimizer and the masks held, as after one-shot pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from curvprune.errors import CurvpruneError, NumericalError
from curvprune.pipeline.pipeline import Pipeline
from curvprune.roles.reports import PruneResult
from curvprune.run.checkpoints import RunCheckpoints
from curvprune.run.training import LoopState
from curvprune.tensors.gradients import LossFn, default_loss

__all__ = ["run_prune_phase"]


def run_prune_phase(
    pipeline: Pipeline,
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    on_step: Callable[[], None] | None = None,
    checkpoints: RunCheckpoints | None = None,
) -> PruneResult:
    """Train ``model`` with the schedule's optimizer until the schedule has finished pruning.

    Args:
        pipeline: a pipeline whose schedule has ``prune_phase``.
        model: trained in place (on ``device``), in train mode; left in eval mode.
        loader: training batches, iterated for as many epochs as needed.
        device: where batches go.
        data: batches for the pruning step's gradients and loss audit (the gradient loader).
        loss_fn: the loss (default cross entropy).
        on_step: called after every optimizer step (progress bars).
        checkpoints: the run's checkpoints: the phase (``prune_phase``) continues from a
            checkpoint of it and saves one every ``[run] checkpoint_every`` steps.

    Returns:
        The session's result: the masks and the removal step's report.

    Raises:
        NumericalError: the training loss became non-finite (checked once per epoch).
        CurvpruneError: the schedule did not finish within its own :meth:`max_steps` bound.
    """
    schedule = pipeline.schedule
    loss_fn = loss_fn or default_loss
    optimizer = schedule.prune_phase_optimizer(model)
    session = pipeline.attach(model, optimizer, data=data, loss_fn=loss_fn)
    state, after_step = None, None
    if checkpoints is not None:
        state, after_step = checkpoints.phase(
            "prune_phase", model=model, optimizer=optimizer, session=session,
            loaders={"train": loader, "grad": data},
        )
    state = state if state is not None else LoopState()
    generator: torch.Generator | None = getattr(loader, "generator", None)
    limit = schedule.max_steps()
    model.train()
    while not schedule.finished(session.iteration - 1):
        if session.iteration >= limit:
            raise CurvpruneError(
                f"schedule {pipeline.config.schedule.name!r} did not finish within its bound of "
                f"{limit} steps"
            )
        skip = state.batch  # > 0: continuing mid-epoch from a checkpoint; replay the shuffling
        if skip == 0:
            state.running = torch.zeros((), device=device, dtype=torch.float64)
            state.epoch_rng = generator.get_state() if generator is not None else None
        elif generator is not None and state.epoch_rng is not None:
            generator.set_state(state.epoch_rng)
            state.running = state.running.to(device)
        for index, (x, y) in enumerate(loader):
            if index < skip:
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            session.before_optimizer_step()
            optimizer.step()
            session.step()
            model.train()
            state.running += loss.detach()
            state.batch += 1
            state.step += 1
            if on_step is not None:
                on_step()
            if after_step is not None:
                after_step(state)
            if schedule.finished(session.iteration - 1):
                break
        state.epoch += 1
        state.batch = 0
        if not math.isfinite(float(state.running)):
            raise NumericalError(
                f"the training loss became non-finite in epoch {state.epoch} of the prune phase; "
                "lower the schedule's learning rate"
            )
    model.eval()
    return session.close()
