"""Conformance suite for saliency scorers: shapes, finite values, the quadratic prediction."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import curvprune
from curvprune import (
    GradientSource,
    PruneContext,
    SaliencyScorer,
)
from curvprune.testing.contracts._base import (
    ComponentContract,
    contract_settings,
    structure_to_weights,
)


# ------------------------------------------------------------------------------------------------
# Saliency scorers
# ------------------------------------------------------------------------------------------------
class _TinyNet(nn.Module):
    """Conv (1→3 channels, 3×3) → ReLU → Linear (48→3) on 4×4 single-channel images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(48, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


class SaliencyScorerContract(ComponentContract):
    """Conformance suite for a :class:`curvprune.SaliencyScorer`.

    Builds a tiny model and a :class:`curvprune.PruneContext` holding only what the scorer
    declares it needs (``needs_curvature``: a fitted ``estimator``, by default ``dense``;
    ``needs_gradient``: ``mean_grad``; ``needs_data``: ``batches`` and ``loss_fn``), so an
    undeclared need fails here rather than in a pipeline. For channel scorers the layout carries
    traced structures (:attr:`curvprune.ParamLayout.structures`), as the pipeline gives them with
    the ``channel`` mask. Checks the score shape (``[d]`` or ``[S]``, one per structure) and
    finiteness, that :meth:`~curvprune.SaliencyScorer.compensate` returns
    None or a finite ``[d]`` tensor and ``predicted_loss_change`` None or a finite 0-dim tensor,
    and that scoring leaves the model unchanged.

    Attributes:
        name: registered scorer name.
        options: its config options.
        estimator: the estimator fitted for scorers that need curvature.
        estimator_options: that estimator's options.
        data_size: samples in the tiny data set (and gradients fed to the estimator).
    """

    kind = "scorer"
    estimator: ClassVar[str] = "dense"
    estimator_options: ClassVar[Mapping[str, Any]] = {"damping": 1e-2, "dtype": "float64"}
    data_size: ClassVar[int] = 8

    def make(self, **overrides: Any) -> SaliencyScorer:
        """Build the scorer from ``options`` and ``overrides``."""
        return self._create(**{**self.options, **overrides})

    def make_model(self, generator: torch.Generator) -> nn.Module:
        """The model to score (default: a conv + linear net on 4×4 images), weights drawn."""
        model = _TinyNet().to(torch.float64)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(0.5 * torch.randn(param.shape, generator=generator,
                                              dtype=param.dtype))
        return model

    def make_batches(self, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """The data: ``data_size`` inputs and labels, in two batches."""
        x = torch.randn(self.data_size, 1, 4, 4, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (self.data_size,), generator=generator)
        half = self.data_size // 2
        return [(x[:half], y[:half]), (x[half:], y[half:])]

    def make_context(self, scorer: SaliencyScorer, seed: int, sparsity: float) -> PruneContext:
        """A context on the tiny model, with a drawn existing mask of about ``sparsity``."""
        generator = torch.Generator().manual_seed(seed)
        model = self.make_model(generator)
        batches = self.make_batches(generator)
        layout = curvprune.select_parameters(model)
        if scorer.granularity == "channel":
            # as the pipeline does for a channel mask: traced structures (the classifier's
            # rows are not prunable); one score per structure
            graph = curvprune.StructureGraph.trace(model)
            layout = layout.with_structures(graph.structures(layout))
            keep = torch.rand(layout.n_structures, generator=generator) >= sparsity
            mask = structure_to_weights(keep, layout)
        else:
            mask = torch.rand(layout.d, generator=generator) >= sparsity
        layout.scatter_(model, layout.gather(model) * mask)
        ctx = PruneContext(
            model=model, layout=layout, weights=layout.gather(model), mask=mask,
            target_sparsity=min(0.95, sparsity + 0.25),
        )
        if scorer.needs_curvature or scorer.needs_gradient:
            source = GradientSource(model, layout, F.cross_entropy, mask=mask)
            grads = torch.cat(list(source.iter_grads(batches, self.data_size)))
            if scorer.needs_gradient:
                ctx.mean_grad = grads.mean(0)
            if scorer.needs_curvature:
                est = curvprune.create("estimator", self.estimator, host=self.host(),
                                       **{**self.estimator_options, "num_grads": len(grads)})
                est.setup(layout.sizes)
                est.update(grads)
                ctx.estimator = est
        if scorer.needs_data:
            ctx.batches = lambda num_samples=None: _first_samples(batches, num_samples)
            ctx.loss_fn = F.cross_entropy
        return ctx

    def _scored(self, data: st.DataObject) -> tuple[SaliencyScorer, PruneContext, Tensor]:
        scorer = self.make()
        seed = data.draw(st.integers(0, 2**16), label="seed")
        sparsity = data.draw(st.sampled_from([0.0, 0.3, 0.6]), label="existing sparsity")
        ctx = self.make_context(scorer, seed, sparsity)
        return scorer, ctx, scorer.score(ctx)

    def _pruned(self, scorer: SaliencyScorer, ctx: PruneContext, scores: Tensor,
                fraction: float) -> Tensor:
        """The lowest-scored kept units, about ``fraction`` of them, as a bool ``[d]`` mask."""
        if scorer.granularity == "channel":
            kept = ctx.layout.alive_structures(ctx.mask)
        else:
            kept = ctx.mask.clone()
        count = int(fraction * int(kept.sum()))
        order = torch.where(kept, scores.to(torch.float64), torch.inf).argsort()
        chosen = torch.zeros_like(kept)
        chosen[order[:count]] = True
        if scorer.granularity == "channel":
            return ~structure_to_weights(~chosen, ctx.layout) & ctx.mask
        return chosen

    @settings(contract_settings, max_examples=10)
    @given(data=st.data())
    def test_score_shape_and_finite(self, data: st.DataObject) -> None:
        """Scores are finite floats, one per weight or per channel structure."""
        scorer, ctx, scores = self._scored(data)
        units = ctx.layout.d if scorer.granularity == "weight" else ctx.layout.n_structures
        assert scores.shape == (units,), (
            f"{scorer.granularity} scores must have shape [{units}], got {tuple(scores.shape)}"
        )
        assert scores.is_floating_point(), f"scores must be floating, got {scores.dtype}"
        assert bool(torch.isfinite(scores).all()), "scores hold NaN or infinity"

    @settings(contract_settings, max_examples=10)
    @given(data=st.data())
    def test_compensate_is_none_or_finite(self, data: st.DataObject) -> None:
        """Compensate returns None or a finite [d] update."""
        scorer, ctx, scores = self._scored(data)
        fraction = data.draw(st.sampled_from([0.0, 0.2, 0.5]), label="fraction")
        delta = scorer.compensate(ctx, self._pruned(scorer, ctx, scores, fraction))
        if delta is not None:
            assert delta.shape == (ctx.layout.d,), f"δw must be [d], got {tuple(delta.shape)}"
            assert bool(torch.isfinite(delta).all()), "δw holds NaN or infinity"

    @settings(contract_settings, max_examples=10)
    @given(data=st.data())
    def test_predicted_loss_change_is_none_or_finite_scalar(self, data: st.DataObject) -> None:
        """predicted_loss_change returns None or a finite 0-dim tensor."""
        scorer, ctx, scores = self._scored(data)
        pruned = self._pruned(scorer, ctx, scores, 0.3)
        scorer.compensate(ctx, pruned)
        change = scorer.predicted_loss_change(ctx, pruned)
        if change is not None:
            assert change.dim() == 0, f"predicted loss change must be 0-dim, got {change.shape}"
            assert bool(torch.isfinite(change)), f"predicted loss change is {change.item()}"

    @settings(contract_settings, max_examples=5)
    @given(data=st.data())
    def test_quadratic_prediction_is_the_quadratic_form(self, data: st.DataObject) -> None:
        """With ``quadratic_prediction``: predicted change of {q} = ½δwᵀFδw, δw its update.

        F is formed densely from the estimator's IHVPs of the unit vectors (float64 by default;
        d is small here); the identity then holds to ~κ(F)·d·ε, far below the 1e-6 checked.
        """
        import pytest  # only collected under pytest; curvprune does not depend on it

        scorer = self.make()
        if not scorer.quadratic_prediction:
            pytest.skip(f"{self.name} does not declare quadratic_prediction")
        ctx = self.make_context(scorer, data.draw(st.integers(0, 2**16), label="seed"), 0.3)
        scorer.score(ctx)
        assert ctx.estimator is not None, "quadratic_prediction needs a curvature estimator"
        eye = torch.eye(ctx.layout.d, dtype=torch.float64)
        fisher = torch.linalg.inv(ctx.estimator.ihvp(eye).double())
        kept = ctx.mask.nonzero().squeeze(1)
        for q in kept[torch.randperm(kept.numel())[:3]].tolist():
            one = torch.zeros_like(ctx.mask)
            one[q] = True
            delta = scorer.compensate(ctx, one)
            predicted = scorer.predicted_loss_change(ctx, one)
            assert delta is not None and predicted is not None, (
                "a scorer with quadratic_prediction must compensate and predict"
            )
            delta = delta.double()
            delta[q] = -float(ctx.weights[q])  # the pipeline zeroes w_q exactly
            expected = 0.5 * delta @ fisher @ delta
            assert abs(float(predicted) - float(expected)) <= 1e-6 * abs(float(expected)) + 1e-12, (
                f"predicted {float(predicted):.6g} but ½δwᵀFδw = {float(expected):.6g} for weight {q}"
            )

    @settings(contract_settings, max_examples=5)
    @given(data=st.data())
    def test_scoring_leaves_the_model_unchanged(self, data: st.DataObject) -> None:
        """Score and compensate modify neither the model nor ctx.weights."""
        scorer = self.make()
        ctx = self.make_context(scorer, data.draw(st.integers(0, 2**16), label="seed"), 0.3)
        before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        weights = ctx.weights.clone()
        scores = scorer.score(ctx)
        scorer.compensate(ctx, self._pruned(scorer, ctx, scores, 0.3))
        for key, value in ctx.model.state_dict().items():
            assert torch.equal(value, before[key]), f"scoring modified the model's {key!r}"
        assert torch.equal(ctx.weights, weights), "scoring modified ctx.weights in place"


def _first_samples(
    batches: list[tuple[Tensor, Tensor]], num_samples: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``PruneContext.batches`` as the pipeline defines it: stop after ``num_samples`` samples
    (the last batch cut), all of them when None."""
    left = num_samples
    for x, y in batches:
        if left is not None and left <= 0:
            return
        take = x.shape[0] if left is None else min(left, x.shape[0])
        yield x[:take], y[:take]
        if left is not None:
            left -= take

