"""K-FAC against the dense K-FAC product built by hand in float64 (tests/_handmade.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune import (
    ConfigError,
    EstimatorStateError,
    UnsupportedQuery,
    create,
    get_plugin_manager,
    select_parameters,
)
from curvprune.testing.dense import assert_allclose
from curvprune_kfac import KFACConfig, KFACEstimator, plugin
from curvprune_kfac.factors import kronecker_factors

TARGETS = {True: ("Conv2d", "Linear", "re:.*bias"), False: ("Conv2d", "Linear")}


def _fit(ref, kind, seed, damping, *, bias=True, with_bias_params=True, **options):
    model, batches = ref.make_problem(kind, seed, bias=bias)
    layout = select_parameters(model, TARGETS[with_bias_params and bias])
    est = KFACEstimator(KFACConfig(damping=damping, dtype="float64", num_grads=6, **options))
    est.setup(layout.sizes)
    est.fit(model, batches, torch.nn.functional.cross_entropy, layout)
    return model, batches, layout, est


def _reference(ref, model, batches, layout, damping, approx="expand"):
    factors = ref.handmade_factors(model, batches, approx)
    return ref.dense_kfac(model, factors, list(layout.names), damping)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_are_the_handmade_ones(ref, kind, approx):
    model, batches = ref.make_problem(kind, 0)
    layout = select_parameters(model, TARGETS[True])
    got = kronecker_factors(model, layout, batches, nn.CrossEntropyLoss(), kfac_approx=approx)
    want = ref.handmade_factors(model, batches, approx)
    modules = dict(model.named_modules())
    for name, (g, a) in zip(layout.names, got, strict=True):
        module_name, _, pname = name.rpartition(".")
        g_ref, a_ref = want[modules[module_name]]
        # Same sums of ≤ 6·16 float64 products in another order: relative round-off ~1e-15.
        assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14 * float(g_ref.abs().max()), what=f"G {name}")
        if pname == "weight":
            assert_allclose(a, a_ref, rtol=1e-12, atol=1e-14 * float(a_ref.abs().max()), what=f"A {name}")
        else:
            assert a.tolist() == [[1.0]]


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["mlp", "cnn"]), seed=st.integers(0, 2**16),
       damping=st.floats(1e-3, 10.0), bias=st.booleans())
def test_queries_invert_the_dense_kfac(ref, kind, seed, damping, bias):
    model, batches, layout, est = _fit(ref, kind, seed, damping, bias=bias)
    fisher = _reference(ref, model, batches, layout, damping)
    inverse = torch.linalg.inv(fisher)
    d = fisher.shape[0]
    # Eigendecompositions are backward stable: errors ≲ c·d·eps·cond(F) relative to ‖F⁻¹‖.
    cond = float(torch.linalg.cond(fisher))
    rtol = 64 * d * torch.finfo(torch.float64).eps * cond
    scale = float(torch.linalg.matrix_norm(inverse, ord=2))
    v = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    # ihvp(F v) = v, measured relative to ‖v‖.
    assert_allclose(est.ihvp(v @ fisher), v, rtol=rtol, atol=rtol * float(v.abs().max()), what="ihvp(Fv)")
    assert_allclose(est.ihvp(v[0]), inverse @ v[0], rtol=rtol, atol=rtol * scale, what="ihvp")
    diag = est.inverse_diagonal()
    assert bool((diag > 0).all())
    assert_allclose(diag, inverse.diagonal(), rtol=rtol, atol=rtol * scale, what="inverse_diagonal")
    # Entries within a parameter (one row per parameter, with -1 padding).
    offsets = layout.offsets
    rows = [[offsets[p], offsets[p + 1] - 1, -1] for p in range(len(layout))]
    idx = torch.tensor(rows)
    cols = est.inverse_columns(idx)
    safe = idx.clamp_min(0)
    expected = inverse[safe[:, :, None], safe[:, None, :]]
    valid = (idx >= 0)[:, :, None] & (idx >= 0)[:, None, :]
    assert_allclose(cols[valid], expected[valid], rtol=rtol, atol=rtol * scale, what="inverse_columns")
    assert torch.equal(cols[:, 2, 2], torch.ones(len(layout), dtype=torch.float64))


def test_block_layout_is_one_block_per_parameter(ref):
    _, _, layout, est = _fit(ref, "cnn", 1, 0.1)
    blocks = est.block_layout
    assert blocks.starts.tolist() == list(layout.offsets[:-1])
    assert blocks.lengths.tolist() == list(layout.sizes)


def test_type2_fisher_is_the_generalized_gauss_newton(ref):
    model, batches, layout, est = _fit(ref, "mlp", 3, 0.5, with_bias_params=False, fisher="type-2")
    fisher = ref.dense_kfac(model, ref.type2_factors(model, batches), list(layout.names), 0.5)
    v = torch.randn(2, fisher.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_allclose(est.ihvp(v @ fisher), v, rtol=1e-10, atol=1e-10, what="type-2 ihvp(Fv)")


def test_true_fisher_samples_labels_from_the_model(ref):
    """With many sampled labels per input, G approaches the type-2 G (its expectation)."""
    model, batches = ref.make_problem("mlp", 4)
    layout = select_parameters(model, ("Linear",))
    sampled = kronecker_factors(model, layout, batches, nn.CrossEntropyLoss(), fisher="true",
                                mc_samples=400, seed=1)
    exact = kronecker_factors(model, layout, batches, nn.CrossEntropyLoss(), fisher="type-2")
    empirical = kronecker_factors(model, layout, batches, nn.CrossEntropyLoss())
    for (g_mc, _), (g_t2, _), (g_emp, _) in zip(sampled, exact, empirical, strict=True):
        error = float(torch.linalg.matrix_norm(g_mc - g_t2) / torch.linalg.matrix_norm(g_t2))
        # 2400 draws: Monte-Carlo error ~ 1/√400 per input, ≈ 5 %; the empirical G is far off.
        assert error < 0.15, error
        assert float(torch.linalg.matrix_norm(g_emp - g_t2) / torch.linalg.matrix_norm(g_t2)) > error


def test_fit_leaves_the_model_untouched(ref):
    model, batches = ref.make_problem("cnn", 5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = select_parameters(model)
    est = KFACEstimator(KFACConfig(dtype="float64"))
    est.setup(layout.sizes)
    est.fit(model, batches, torch.nn.functional.cross_entropy, layout)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert est.num_samples == 6


def test_num_grads_limits_the_samples(ref):
    model, batches = ref.make_problem("mlp", 6)
    layout = select_parameters(model)
    est = KFACEstimator(KFACConfig(dtype="float64", num_grads=4))
    est.setup(layout.sizes)
    est.fit(model, batches, torch.nn.functional.cross_entropy, layout)
    assert est.num_samples == 4
    first4 = [batches[0], (batches[1][0][:1], batches[1][1][:1])]
    fisher = ref.dense_kfac(model, ref.handmade_factors(model, first4), list(layout.names), est.config.damping)
    assert_allclose(est.inverse_diagonal(), torch.linalg.inv(fisher).diagonal(), rtol=1e-9, what="diag")


def test_update_is_unsupported_and_queries_need_fit():
    est = KFACEstimator()
    est.setup([6, 3])
    with pytest.raises(UnsupportedQuery, match="KFACEstimator cannot answer update.*call fit"):
        est.update(torch.zeros(2, 9))
    with pytest.raises(EstimatorStateError, match="call fit"):
        est.ihvp(torch.zeros(9))


def test_bad_layers_and_losses_are_one_line_config_errors():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    batches = [(torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))]
    layout = select_parameters(model, ("Linear", "BatchNorm1d"))
    est = KFACEstimator()
    est.setup(layout.sizes)
    with pytest.raises(ConfigError, match=r"'1.weight' belongs to a BatchNorm1d; exclude it with prune.ignore @ prune.targets"):
        est.fit(model, batches, torch.nn.functional.cross_entropy, layout)
    layout = select_parameters(model, ("Linear",))
    est.setup(layout.sizes)
    with pytest.raises(ConfigError, match="kfac needs a loss curvlinops supports.*@ estimator"):
        est.fit(model, batches, lambda out, y: (out - 1).square().mean(), layout)
    with pytest.raises(ConfigError, match="no samples"):
        est.fit(model, [], torch.nn.functional.cross_entropy, layout)


def test_config_rejects_block_size_and_mini_batches():
    host = get_plugin_manager(autoload=False, plugins=[("kfac", plugin)])
    for options, message in (
        ({"block_size": 8}, "block_size must be unset for kfac.*@ estimator.block_size"),
        ({"fisher_mini_batch": 4}, "fisher_mini_batch must be 1 for kfac.*@ estimator.fisher_mini_batch"),
        ({"mc_samples": 3}, "mc_samples = 3 needs fisher = 'true'"),
        ({"fisher": "ggn"}, "fisher"),
    ):
        with pytest.raises(ConfigError, match=message):
            create("estimator", "kfac", host=host, **options)


def test_memory_plan_counts_the_factor_shapes():
    model = nn.Sequential(nn.Linear(100, 2), nn.Linear(2, 100))
    layout = select_parameters(model)
    config = KFACConfig()
    # Two layers of 200 weights: factors 2×2 and 100×100 each way round.
    planned = KFACEstimator.plan_memory_bytes(layout, config)
    per_layer = 4 * (4 + 10_000) + 4 * (2 * (4 + 10_000) + 102 + 200) + 8 * 200
    assert planned == 2 * per_layer
    assert KFACEstimator.memory_bytes([200, 200], config) < planned  # the square guess


def test_held_plan_is_the_factor_sums_a_fit_holds(ref):
    """While a later batch is fitted the factor sums are held: G and A of each layer once (a
    layer's weight and bias share G)."""
    model, batches = ref.make_problem("cnn", 3)
    layout = select_parameters(model, TARGETS[True])
    factors = kronecker_factors(model, layout, batches, torch.nn.functional.cross_entropy)
    distinct = {}
    for name, (g, a) in zip(layout.names, factors, strict=True):
        module = name.rpartition(".")[0]
        numbers = g.numel() + (a.numel() if name.endswith("weight") else 0)
        distinct[module] = max(distinct.get(module, 0), 4 * numbers)  # counted as float32
    assert KFACEstimator.plan_held_bytes(layout, KFACConfig()) == sum(distinct.values())


def test_fit_passes_keep_nothing_and_leave_the_model_untouched(ref):
    model, batches = ref.make_problem("cnn", 4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = select_parameters(model)
    est = KFACEstimator(KFACConfig(dtype="float64"))
    est.setup(layout.sizes)
    est.fit_passes(model, batches[0], torch.nn.functional.cross_entropy, layout)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(EstimatorStateError, match="call fit"):
        est.ihvp(torch.zeros(layout.d, dtype=torch.float64))


@pytest.mark.gpu
def test_cuda_fit_matches_cpu(ref):
    model, batches = ref.make_problem("cnn", 7)
    layout = select_parameters(model, TARGETS[True])
    out = {}
    for device in ("cpu", "cuda"):
        est = KFACEstimator(KFACConfig(damping=0.1, dtype="float64", num_grads=6))
        est.setup(layout.sizes, device=device)
        moved = [(x.to(device), y.to(device)) for x, y in batches]
        est.fit(model.to(device), moved, torch.nn.functional.cross_entropy, layout)
        v = torch.ones(layout.d, dtype=torch.float64)
        out[device] = (est.ihvp(v).cpu(), est.inverse_diagonal().cpu())
    for cpu, cuda in zip(out["cpu"], out["cuda"], strict=True):
        assert_allclose(cuda, cpu, rtol=1e-9, atol=1e-12, what="cuda vs cpu")
