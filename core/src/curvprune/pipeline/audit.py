"""The single-weight loss-change audit: does the scorer's quadratic model predict what happens?

OBS-type scorers rest on the local quadratic model (Hassibi & Stork, 1993; WoodFisher, Singh &
Alistarh 2020, Eq. 3-5)::

    L(w + δw) − L(w) ≈ ∇Lᵀδw + ½ δwᵀ F δw,

and predict, for removing weight q alone with the optimal compensation δw = −F⁻¹e_q w_q/[F⁻¹]_qq,
the increase ρ_q = w_q² / (2[F⁻¹]_qq). The audit checks that prediction weight by weight: for a
random sample of the weights still present before a pruning step it asks the scorer for its
predicted change and its compensating update for the one-weight set {q}
(:meth:`SaliencyScorer.predicted_loss_change` and :meth:`SaliencyScorer.compensate`, the same
calls the pipeline makes for a whole step), and measures the loss on the audit samples at
``w + δw`` with ``w_q = 0``, minus the loss at ``w``. The rank agreement (Spearman's ρ) of the
two says whether the scorer orders weights as their true removal cost does; the pipeline runs it
when ``[prune] audit_single`` > 0.

Two things keep ρ_q from ranking the measured change on a trained network, and the audit
takes both apart for scorers whose prediction is the quadratic form ½δwᵀFδw at their own update
(``quadratic_prediction``, OBS):

* **The first-order term.** ρ_q is the model at a stationary point (∇L = 0). A network trained
  with mini-batch SGD or Adam is not at one: on the digits MLP the full-batch gradient has norm
  ~0.1 and ∇Lᵀδw is several times ρ_q, so it decides the measured order. The audit computes
  the exact gradient of the audit loss at w (float64, one pass over the audit batches) and
  splits the measurement into ∇Lᵀδw and the rest, ½δwᵀHδw + O(‖δw‖³).
* **The damping.** F = F₀ + λI, and ρ_q = ½δwᵀF₀δw + ½λ‖δw‖². The λ term regularises the
  update (it keeps δw out of the directions the m gradients do not see) but is no curvature of
  the loss: the audit reports the model's curvature part ½δwᵀF₀δw = ρ_q − ½λ‖δw‖², as
  Levenberg-Marquardt and trust-region methods (Moré 1978) measure a damped step's predicted
  decrease with the undamped model.

``spearman`` is the plain agreement of ρ_q with the measured change; ``spearman_curvature``
ranks the curvature part against the measured change less ∇Lᵀδw (is the curvature model
right?); ``spearman_first_order`` ranks ∇Lᵀδw alone against the measured change (how far the
gradient decides). Other scorers (``woodtaylor`` models the gradient itself) get ``spearman``.

The model is never modified: the perturbed weights go through ``torch.func.functional_call``,
vectorised over the sampled weights with ``torch.func.vmap`` in memory-bounded chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.roles.context import PruneContext
from curvprune.roles.scorer import SaliencyScorer

__all__ = [
    "SingleWeightAudit", "audit_single_weights", "gradient_at", "losses_at", "pearson", "spearman",
]

#: Bytes of stacked weight vectors evaluated in one vectorised call.
_CHUNK_BYTES = 1 << 26


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of ``x`` (float64), ties sharing their average rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64, device=x.device)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(values.numel(), dtype=torch.float64, device=x.device)
    sums.index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=values.numel()).to(torch.float64)
    return (sums / counts)[inverse]


def pearson(x: Tensor, y: Tensor) -> float | None:
    """Pearson's correlation of two ``[n]`` tensors (None if either is constant or n < 2)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    denom = xc.norm() * yc.norm()
    if float(denom) == 0.0:
        return None
    return float((xc @ yc) / denom)


def spearman(x: Tensor, y: Tensor) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the (average, for ties) ranks."""
    if x.numel() < 2:
        return None
    return pearson(_ranks(x.double().flatten()), _ranks(y.double().flatten()))


@attrs.frozen(kw_only=True)
class SingleWeightAudit:
    """Predicted against measured loss change of removing single weights.

    Attributes:
        step: the pruning step the audit ran before.
        index: flat indices of the sampled weights, long ``[n]``.
        predicted: the scorer's predicted loss change for each one-weight removal, ``[n]``.
        measured: the measured change on the audit samples (with the compensation), ``[n]``.
        first_order: ∇Lᵀδw, the exact first-order term of each removal's move on the audit
            samples, ``[n]``; None unless the scorer's prediction is a quadratic form
            (``quadratic_prediction``).
        damping_part: ½λ‖δw‖², the part of the prediction due to the damping λ, ``[n]``; None
            as for ``first_order``.
    """

    step: int
    index: Tensor
    predicted: Tensor
    measured: Tensor
    first_order: Tensor | None = None
    damping_part: Tensor | None = None

    @property
    def spearman(self) -> float | None:
        """Spearman's ρ between predicted and measured."""
        return spearman(self.predicted, self.measured)

    @property
    def pearson(self) -> float | None:
        """Pearson's r between predicted and measured."""
        return pearson(self.predicted, self.measured)

    @property
    def curvature(self) -> Tensor | None:
        """The prediction's curvature part ½δwᵀF₀δw = predicted − ½λ‖δw‖² (or None)."""
        return None if self.damping_part is None else self.predicted - self.damping_part

    @property
    def second_order(self) -> Tensor | None:
        """The measured change less its exact first-order part, measured − ∇Lᵀδw (or None)."""
        return None if self.first_order is None else self.measured - self.first_order

    @property
    def spearman_curvature(self) -> float | None:
        """Spearman's ρ between ½δwᵀF₀δw and measured − ∇Lᵀδw: the curvature model's test."""
        curvature, rest = self.curvature, self.second_order
        return None if curvature is None or rest is None else spearman(curvature, rest)

    @property
    def spearman_first_order(self) -> float | None:
        """Spearman's ρ between ∇Lᵀδw alone and measured: how much the gradient term decides."""
        return None if self.first_order is None else spearman(self.first_order, self.measured)

    def summary(self) -> dict[str, Any]:
        """Step, sample count and the correlations (for ``loss_change.single``)."""
        return {"step": self.step, "samples": int(self.index.numel()),
                "spearman": self.spearman, "pearson": self.pearson,
                "spearman_curvature": self.spearman_curvature,
                "spearman_first_order": self.spearman_first_order}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary plus the per-weight lists."""
        return {
            **self.summary(),
            "index": self.index.tolist(),
            "predicted": self.predicted.double().tolist(),
            "measured": self.measured.double().tolist(),
            "first_order": _as_list(self.first_order),
            "damping_part": _as_list(self.damping_part),
        }


def _functional_loss(
    model: nn.Module,
    names: Sequence[str],
    unflatten: Callable[[Tensor], list[Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    dtype: torch.dtype,
) -> tuple[Callable[[Tensor, Any, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``loss_of(row, x, y)``, the loss with the selected parameters set to ``row`` and every
    other parameter and buffer frozen, all in ``dtype``; and ``cast``, for the inputs."""
    from torch.func import functional_call

    def cast(t: Tensor) -> Tensor:
        return t.detach().to(dtype) if t.is_floating_point() else t.detach()

    selected = set(names)
    frozen = {k: cast(v) for k, v in model.named_parameters() if k not in selected}
    frozen.update({k: cast(v) for k, v in model.named_buffers()})

    def loss_of(row: Tensor, x: Any, y: Tensor) -> Tensor:
        params = dict(zip(names, unflatten(row), strict=True))
        return loss_fn(functional_call(model, {**frozen, **params}, (x,)), y)

    return loss_of, cast


def losses_at(
    model: nn.Module,
    names: Sequence[str],
    unflatten: Callable[[Tensor], list[Tensor]],
    rows: Tensor,
    batches: Sequence[tuple[Any, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Mean loss over ``batches`` with the selected parameters set to each row of ``rows``.

    The model is evaluated in ``dtype`` (parameters, buffers, rows and floating inputs cast):
    removing one weight changes a trained model's loss by 1e-8 to 1e-5, at or below the
    round-off of a float32 forward pass (a relative 1e-7 of every logit), so a float32
    measurement would be mostly noise.

    Args:
        model: the model (left untouched; eval mode is used for the evaluation).
        names: names of the selected parameters, in layout order.
        unflatten: splits ``[..., d]`` into parameter-shaped tensors (``ParamLayout.unflatten``).
        rows: ``[n, d]`` weight vectors of the selected parameters.
        batches: ``(inputs, targets)`` on the model's device.
        loss_fn: mean loss over a batch.
        dtype: evaluation dtype (float64 by default).

    Returns:
        ``[n]`` float64 losses, the sample-weighted mean over all batches.
    """
    from torch.func import vmap

    loss_of, cast = _functional_loss(model, names, unflatten, loss_fn, dtype)
    rows = rows.to(dtype)

    was_training = model.training
    model.eval()
    try:
        total = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
        count = 0
        step = max(1, _CHUNK_BYTES // max(rows.shape[1] * rows.element_size(), 1))
        with torch.no_grad():
            for x, y in batches:
                x = cast(x) if isinstance(x, Tensor) else x
                batch_losses = []
                for start in range(0, rows.shape[0], step):
                    chunk = rows[start : start + step]
                    try:
                        batch_losses.append(vmap(loss_of, in_dims=(0, None, None))(chunk, x, y))
                    except RuntimeError:  # an op vmap cannot batch: one row at a time
                        batch_losses.append(torch.stack([loss_of(r, x, y) for r in chunk]))
                total += torch.cat(batch_losses).double() * y.shape[0]
                count += y.shape[0]
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _as_list(values: Tensor | None) -> list[float] | None:
    return None if values is None else values.double().tolist()


def gradient_at(
    model: nn.Module,
    names: Sequence[str],
    unflatten: Callable[[Tensor], list[Tensor]],
    weights: Tensor,
    batches: Sequence[tuple[Any, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """∇L at ``weights`` of the sample-weighted mean loss over ``batches``, evaluated in ``dtype``.

    The same loss :func:`losses_at` measures (eval mode, the other parameters and buffers
    frozen), so that ∇Lᵀδw is the exact first-order term of its measured differences.

    Returns:
        ``[d]`` float64 gradient of the selected parameters.
    """
    from torch.func import grad

    loss_of, cast = _functional_loss(model, names, unflatten, loss_fn, dtype)

    row = weights.detach().to(dtype)
    total = torch.zeros_like(row, dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x = cast(x) if isinstance(x, Tensor) else x
            total += grad(loss_of)(row, x, y).double() * y.shape[0]
            count += y.shape[0]
    finally:
        model.train(was_training)
    return total / max(count, 1)


def audit_single_weights(
    ctx: PruneContext,
    scorer: SaliencyScorer,
    batches: Sequence[tuple[Any, Tensor]],
    samples: int,
    generator: torch.Generator | None = None,
) -> SingleWeightAudit | None:
    """Predicted against measured loss change for ``samples`` random single-weight removals.

    The sample is drawn uniformly from the weights still present (``ctx.mask``). For each
    sampled q the scorer is asked, exactly as for a pruning step but with the set {q}, for its
    compensating update δw (then its prediction, which may depend on it); the measured change is
    L(w + δw with w_q = 0 and pruned weights at 0) − L(w) on ``batches``. When the scorer's
    prediction is a quadratic form (``quadratic_prediction``) the exact first-order term ∇Lᵀδw
    of each move on ``batches`` and the damping part ½λ‖δw‖² are recorded too.

    Returns:
        The audit, or None when the scorer predicts no loss change (e.g. ``magnitude``), scores
        channels rather than weights (SOSP: its per-step prediction is the audit there), or no
        weight is left.
    """
    if scorer.granularity != "weight":  # structured scorers price channels, not weights
        return None
    mask = ctx.mask
    candidates = mask.nonzero().squeeze(1)
    if candidates.numel() == 0 or samples <= 0 or not batches or ctx.loss_fn is None:
        return None
    perm = torch.randperm(candidates.numel(), generator=generator, device="cpu")
    index = candidates[perm[: min(samples, candidates.numel())].to(candidates.device)]
    weights = ctx.weights
    rows = weights.unsqueeze(0).repeat(index.numel() + 1, 1)  # row 0: w itself
    predicted = torch.empty(index.numel(), dtype=torch.float64)
    one = torch.zeros_like(mask)
    for i, q in enumerate(index.tolist()):  # one scorer call per sampled weight: its API
        one[q] = True
        delta = scorer.compensate(ctx, one)
        value = scorer.predicted_loss_change(ctx, one)
        one[q] = False
        if value is None:
            return None
        predicted[i] = float(value)
        if delta is not None:
            rows[i + 1] += delta.to(rows.dtype)
    rows[1:, :].scatter_(1, index.unsqueeze(1), 0.0)
    rows *= mask
    layout = ctx.layout
    losses = losses_at(ctx.model, layout.names, layout.unflatten, rows, batches, ctx.loss_fn)
    first_order = damping_part = None
    if scorer.quadratic_prediction and ctx.estimator is not None:
        moves = rows[1:].double() - rows[0].double()
        gradient = gradient_at(ctx.model, layout.names, layout.unflatten, rows[0], batches,
                               ctx.loss_fn)
        first_order = (moves @ gradient).cpu()
        damping_part = (0.5 * ctx.estimator.config.damping * moves.square().sum(1)).cpu()
    return SingleWeightAudit(
        step=ctx.step, index=index.cpu(), predicted=predicted,
        measured=(losses[1:] - losses[0]).cpu(), first_order=first_order,
        damping_part=damping_part,
    )
