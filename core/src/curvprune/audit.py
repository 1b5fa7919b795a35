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

The model is never modified: the perturbed weights go through ``torch.func.functional_call``,
vectorised over the sampled weights with ``torch.func.vmap`` in memory-bounded chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.interfaces import PruneContext, SaliencyScorer

__all__ = ["SingleWeightAudit", "audit_single_weights", "losses_at", "pearson", "spearman"]

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
    """

    step: int
    index: Tensor
    predicted: Tensor
    measured: Tensor

    @property
    def spearman(self) -> float | None:
        """Spearman's ρ between predicted and measured."""
        return spearman(self.predicted, self.measured)

    @property
    def pearson(self) -> float | None:
        """Pearson's r between predicted and measured."""
        return pearson(self.predicted, self.measured)

    def summary(self) -> dict[str, Any]:
        """Step, sample count and the two correlations (for ``loss_change.single``)."""
        return {"step": self.step, "samples": int(self.index.numel()),
                "spearman": self.spearman, "pearson": self.pearson}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary plus the three lists."""
        return {
            **self.summary(),
            "index": self.index.tolist(),
            "predicted": self.predicted.double().tolist(),
            "measured": self.measured.double().tolist(),
        }


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
    from torch.func import functional_call, vmap

    def cast(t: Tensor) -> Tensor:
        return t.detach().to(dtype) if t.is_floating_point() else t.detach()

    frozen = {k: cast(v) for k, v in model.named_parameters() if k not in set(names)}
    frozen.update({k: cast(v) for k, v in model.named_buffers()})
    rows = rows.to(dtype)

    def loss_of(row: Tensor, x: Any, y: Tensor) -> Tensor:
        params = dict(zip(names, unflatten(row), strict=True))
        return loss_fn(functional_call(model, {**frozen, **params}, (x,)), y)

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
    L(w + δw with w_q = 0 and pruned weights at 0) − L(w) on ``batches``.

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
    return SingleWeightAudit(
        step=ctx.step, index=index.cpu(), predicted=predicted,
        measured=(losses[1:] - losses[0]).cpu(),
    )
