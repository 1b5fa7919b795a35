"""The ``sosp-h`` and ``sosp-i`` scorers on a traced CNN, against dense float64 ground truths.

The ground truth differentiates the model through the core's gates
(:meth:`curvprune.Structures.gates`) with ``torch.autograd.functional``: the full Jacobian of
the logits in the gates and the loss Hessian in the logits per sample. Tolerances as in
test_curvature.py (float64, a few dozen O(1) terms).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvprune import ConfigError, PruneContext, StructureGraph, create, select_parameters
from curvprune_sosp import SospHScorer, SospIScorer
from curvprune_sosp.stability import RankingStabilityWarning

TOL = {"rtol": 1e-9, "atol": 1e-11}
# 12 samples are few on purpose (dense truths); the stability warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore::curvprune_sosp.RankingStabilityWarning")


def tiny_cnn(seed: int) -> nn.Module:
    """conv(1→3)-BN-ReLU-conv(3→4)-BN-ReLU-flatten-linear(64→3), float64, random BN stats."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 3),
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for bn in (model[1], model[4]):
            n = bn.num_features
            bn.running_mean.copy_(0.2 * torch.randn(n, generator=gen, dtype=torch.float64))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=gen, dtype=torch.float64))
    return model


def context(seed: int, *, removed=(), n: int = 12, sparsity: float = 0.5):
    gen = torch.Generator().manual_seed(seed + 100)
    model = tiny_cnn(seed)
    layout = select_parameters(model)
    structures = StructureGraph.trace(model).structures(layout)
    layout = layout.with_structures(structures)
    keep = torch.ones(structures.n_structures, dtype=torch.bool)
    keep[list(removed)] = False
    sid = layout.structure_index()
    mask = torch.where(sid >= 0, keep[sid.clamp_min(0)], True)[layout.channel_index()]
    layout.scatter_(model, layout.gather(model) * mask)
    with torch.no_grad():  # zero the gate's bias and BN affine too, as the pipeline does
        for name, piece in structures.gate_masks(keep).items():
            dict(model.named_parameters())[name].mul_(piece.to(torch.float64))
    x = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    ctx = PruneContext(model=model, layout=layout, weights=layout.gather(model), mask=mask,
                       target_sparsity=sparsity, batches=lambda: iter(batches),
                       loss_fn=F.cross_entropy)
    return ctx, structures, x, y


def dense_truth(ctx, structures, x, y):
    """g and G in gate space by brute force through the core's gates."""
    model, size = ctx.model, structures.n_structures
    model.eval()

    def logits(m):
        with structures.gates(model, m):
            return model(x)

    ones = torch.ones(size, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(logits, ones)  # [N, C, S]
    out = logits(ones).detach()
    lam = torch.stack([torch.autograd.functional.hessian(
        lambda f, i=i: F.cross_entropy(f[None], y[i : i + 1]), out[i]) for i in range(len(y))])
    ggn = torch.einsum("ncs,ncd,ndt->st", jac, lam, jac) / len(y)
    m = ones.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(logits(m), y), m)[0]
    return grad, ggn


def dense_hessian(ctx, structures, x, y):
    """The exact gate-space Hessian ∂²L/∂m² at m = 𝟙, by brute force."""
    model = ctx.model
    model.eval()

    def loss(m):
        with structures.gates(model, m):
            return F.cross_entropy(model(x), y)

    return torch.autograd.functional.hessian(
        loss, torch.ones(structures.n_structures, dtype=torch.float64))


@pytest.mark.parametrize(("seed", "removed"), [(0, ()), (1, (0, 4)), (2, (2,))])
@pytest.mark.parametrize("hessian", ["exact", "ggn"])
def test_sosp_h_scores_and_prediction_equal_dense(seed, removed, hessian) -> None:
    """λ = −g + ½·H·a (a: alive), |λ| and ΔL(M) = −gᵀe_M + ½e_MᵀHe_M, H exact (default) or G."""
    ctx, structures, x, y = context(seed, removed=removed)
    options = {} if hessian == "exact" else {"hessian": "ggn"}
    scorer = SospHScorer(create("scorer", "sosp-h", num_samples=100, **options).config)
    scores = scorer.score(ctx)
    grad, ggn = dense_truth(ctx, structures, x, y)
    if hessian == "exact":
        exact = dense_hessian(ctx, structures, x, y)
        assert not torch.allclose(exact, ggn)  # cross-layer gate products: residual term ≠ 0
        ggn = exact
    alive = torch.ones(structures.n_structures, dtype=torch.bool)
    alive[list(removed)] = False
    expected = torch.where(alive, -grad + 0.5 * ggn @ alive.double(), 0.0)
    assert scores.shape == (structures.n_structures,)
    torch.testing.assert_close(scorer.saliency, expected, **TOL)
    torch.testing.assert_close(scores, expected.abs(), **TOL)
    # predicted ΔL for a removed set M = the model −gᵀe_M + ½ e_MᵀGe_M
    e = torch.zeros(structures.n_structures, dtype=torch.float64)
    e[[i for i in (1, 3, 5) if alive[i]]] = 1
    keep = ~e.bool()
    sid = ctx.layout.structure_index()
    kept_weights = torch.where(sid >= 0, keep[sid.clamp_min(0)], True)[ctx.layout.channel_index()]
    pruned = ctx.mask & ~kept_weights
    predicted = scorer.predicted_loss_change(ctx, pruned)
    torch.testing.assert_close(predicted, -grad @ e + 0.5 * e @ ggn @ e, **TOL)


def test_sosp_i_scores_reproduce_the_greedy_set_through_the_channel_mask() -> None:
    ctx, structures, x, y = context(3, removed=(1,), sparsity=0.5)
    scorer = create("scorer", "sosp-i", num_samples=100, dtype="float64")
    scores = scorer.score(ctx)
    grad, ggn = dense_truth(ctx, structures, x, y)
    torch.testing.assert_close(scorer.ggn.matrix, ggn, **TOL)
    mask = create("mask", "channel")
    new = mask.select(scores, ctx.mask, 0.5, ctx.layout)
    removed_now = ctx.layout.alive_structures(ctx.mask) & ~ctx.layout.alive_structures(new)
    assert set(removed_now.nonzero().squeeze(1).tolist()) == set(scorer.greedy.order.tolist())
    assert int(removed_now.sum()) == round(0.5 * structures.n_structures) - 1
    e = removed_now.double()
    predicted = scorer.predicted_loss_change(ctx, ctx.mask & ~new)
    torch.testing.assert_close(predicted, -grad @ e + 0.5 * e @ ggn @ e, **TOL)
    torch.testing.assert_close(predicted, scorer.greedy.predicted[-1], **TOL)


def test_scoring_restores_train_mode_and_leaves_bn_statistics() -> None:
    ctx, *_ = context(4)
    ctx.model.train()
    ctx.model[1].eval()  # a mixed state must come back exactly
    stats = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    for name in ("sosp-h", "sosp-i"):
        create("scorer", name, num_samples=100).score(ctx)
    assert ctx.model.training and not ctx.model[1].training and ctx.model[4].training
    for k, v in ctx.model.state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_only_classifier_selected_is_a_clear_error() -> None:
    ctx, *_ = context(5)
    layout = select_parameters(ctx.model, targets=["Linear"])
    ctx.layout, ctx.mask = layout, torch.ones(layout.d, dtype=torch.bool)
    ctx.weights = layout.gather(ctx.model)
    with pytest.raises(ConfigError, match="no prunable structure.*@ prune.targets"):
        create("scorer", "sosp-h").score(ctx)


def test_unknown_loss_is_a_clear_error_and_autograd_accepts_it() -> None:
    ctx, *_ = context(6)
    ctx.loss_fn = lambda out, y: F.cross_entropy(out, y, label_smoothing=0.2)
    with pytest.raises(ConfigError, match="cannot identify the loss.*@ scorer.loss"):
        create("scorer", "sosp-h").score(ctx)
    assert torch.isfinite(create("scorer", "sosp-h", loss="autograd").score(ctx)).all()


def test_too_few_samples_warn_with_the_measured_correlation() -> None:
    ctx, *_ = context(7)
    with pytest.warns(RankingStabilityWarning, match=r"Spearman rank correlation -?\d\.\d{3} <"):
        create("scorer", "sosp-h", num_samples=100, min_rank_correlation=1.0).score(ctx)
    with pytest.warns(RankingStabilityWarning, match="not measured"):
        create("scorer", "sosp-i", num_samples=3).score(ctx)  # one batch only
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankingStabilityWarning)
        create("scorer", "sosp-h", min_rank_correlation=0.0).score(ctx)


def test_bottleneck_report_from_the_scorer() -> None:
    ctx, structures, *_ = context(8)
    scorer = create("scorer", "sosp-h", bottleneck_threshold=0.75)
    scorer.score(ctx)
    alive = torch.ones(structures.n_structures, dtype=torch.bool)
    alive[[0, 3]] = False  # group 0 (3 wide) keeps 2/3, group 1 (4 wide) keeps 3/4
    report = scorer.bottleneck_report(alive)
    assert [(g.size, g.kept, g.bottleneck, g.suggested_width) for g in report.groups] == [
        (3, 2, False, 3), (4, 3, True, 8)]
    assert isinstance(scorer, SospHScorer) and not isinstance(scorer, SospIScorer)


@pytest.mark.parametrize("selection", ["diagonal", "all", "upper_bound"])
def test_sosp_i_scoring_rules_equal_dense(selection) -> None:
    """SOSP-I's non-greedy rules against the dense GGN (structures 0 and 4 already removed)."""
    ctx, structures, x, y = context(1, removed=(0, 4))
    scorer = SospIScorer(create("scorer", "sosp-i", num_samples=100, dtype="float64",
                                selection=selection).config)
    scores = scorer.score(ctx)
    grad, ggn = dense_truth(ctx, structures, x, y)
    alive = torch.ones(structures.n_structures, dtype=torch.bool)
    alive[[0, 4]] = False
    a, q, diag = alive.double(), -grad, ggn.diagonal()
    expected = {
        "diagonal": (q + 0.5 * diag).abs(),
        "all": (q + 0.5 * ggn @ a).abs(),
        "upper_bound": (q + 0.5 * diag).abs()
        + 0.5 * torch.tensor([sum(abs(float(ggn[s, t])) for t in range(len(a))
                                  if t != s and alive[t]) for s in range(len(a))],
                             dtype=torch.float64),
    }[selection]
    torch.testing.assert_close(scores, torch.where(alive, expected, 0.0), **TOL)
    assert scorer.greedy is None
