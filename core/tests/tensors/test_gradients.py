"""GradientSource (curvprune.tensors.gradients) against a plain per-sample autograd loop in float64.

The ground truth runs ``model(x[i:i+1])`` → loss → ``torch.autograd.grad`` for one sample at a
time, in eval mode, and concatenates ``g.reshape(-1)`` per selected parameter: no torch.func, no
layout code. Comparisons are in float64.

Tolerance for vmap vs loop (``_assert_rows``): both compute the same products and sums in a
different order (batched vs single-sample kernels). The deepest chain here is 4 layers with dot
products of at most 512 terms, so the forward-mode error bound is ~ (sum of term counts) · eps ≈
1e3 · 2.2e-16 ≈ 2e-13 relative to the gradient's scale; rtol 1e-10 with atol 1e-12 · max|g| keeps
a factor of ~500 of head room. Any real mistake (train-mode BatchNorm, a wrong sample or label, a
missing mask) changes entries at O(1e-2) relative or more.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from curvprune import (
    ConfigError,
    GradientSource,
    NumericalError,
    SampleReuseWarning,
    select_parameters,
)
from curvprune.run.models import DigitsCNN, DigitsMLP


def _inputs(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y


def _with_running_stats(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=gen))
                module.bias.copy_(0.3 * torch.randn(n, generator=gen))
    return model


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsMLP() if kind == "mlp" else _with_running_stats(DigitsCNN(width=4))
    return model.double().train()


def _loop_grads(model: nn.Module, names: tuple[str, ...], x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients [n, d] by n separate backward passes (the ground truth)."""
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    model.train(was_training)
    return torch.stack(rows)


def _collect(source: GradientSource, batches, num_grads: int) -> Tensor:
    return torch.cat(list(source.iter_grads(batches, num_grads)))


def _assert_rows(actual: Tensor, expected: Tensor) -> None:
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * scale)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- per-sample gradients ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "targets", "ignore"),
    [
        ("mlp", ("Conv2d", "Linear"), ()),
        ("mlp", ("Linear", "re:.*\\.bias"), ("1",)),
        ("cnn", ("Conv2d", "Linear"), ()),
        # BatchNorm's affine parameters and one conv; the first conv and the head unselected.
        ("cnn", ("re:[14]\\.(weight|bias)", "Conv2d", "8"), ("0",)),
    ],
)
def test_per_sample_gradients_match_loop(kind, targets, ignore):
    model = _model(kind)
    layout = select_parameters(model, targets, ignore)
    x, y = _inputs(7)
    before = _state(model)

    rows = _collect(GradientSource(model, layout, chunk_size=4), [(x, y)], 7)

    _assert_rows(rows, _loop_grads(model, layout.names, x, y))
    assert rows.shape == (7, layout.d)  # only the selected parameters have columns
    assert model.training  # mode restored
    after = _state(model)  # parameters and BatchNorm buffers untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_train_mode_batchnorm_would_differ():
    """Guard on the ground truth: with train-mode BatchNorm the rows would not match."""
    model = _model("cnn")
    layout = select_parameters(model)
    x, y = _inputs(3)
    rows = _collect(GradientSource(model, layout), [(x, y)], 3)
    params = dict(model.named_parameters())
    model.train()
    loss = F.cross_entropy(model(x[:1]), y[:1])
    grads = torch.autograd.grad(loss, [params[n] for n in layout.names])
    train_row = torch.cat([g.reshape(-1) for g in grads])
    assert not torch.allclose(rows[0], train_row, rtol=1e-3, atol=0)


def test_closing_early_restores_training_mode():
    model = _model("mlp")
    source = GradientSource(model, select_parameters(model), chunk_size=2)
    chunks = source.iter_grads([_inputs(6)], 6)
    next(chunks)
    assert not model.training  # eval while collecting
    chunks.close()
    assert model.training


@pytest.mark.parametrize("b", [2, 3])
def test_fisher_mini_batch_is_the_mean_of_per_sample_gradients(b):
    model = _model("cnn")
    layout = select_parameters(model)
    x, y = _inputs(4 * b)
    rows = _collect(GradientSource(model, layout, fisher_mini_batch=b, chunk_size=3), [(x, y)], 4)
    expected = _loop_grads(model, layout.names, x, y).reshape(4, b, -1).mean(dim=1)
    _assert_rows(rows, expected)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])  # vmap; the closed form for nn.Linear
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_give_the_mini_batch_gradient(kind, micro):
    """b = 5 samples per row in micro-batches of 1, 2 (5 = 2 + 2 + 1: unequal weights) or 4:
    the same rows and losses as the whole mini-batch, and as the per-sample mean."""
    model = _model(kind)
    layout = select_parameters(model)
    x, y = _inputs(15)
    if kind == "mlp":
        x = x.reshape(15, 64)
    whole = GradientSource(model, layout, fisher_mini_batch=5, chunk_size=2)
    parts = GradientSource(model, layout, fisher_mini_batch=5, chunk_size=2, micro_batch=micro)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    rows = _collect(parts, [(x, y)], 3)
    passes = len(calls)
    hook.remove()
    assert passes == 2 * -(-5 // micro)  # two chunks, each in ⌈5 / micro⌉ passes
    _assert_rows(rows, _collect(whole, [(x, y)], 3))
    expected = _loop_grads(model, layout.names, x, y).reshape(3, 5, -1).mean(dim=1)
    _assert_rows(rows, expected)
    torch.testing.assert_close(parts.mean(), whole.mean(), rtol=1e-10, atol=1e-14)


def test_chunk_size_does_not_change_rows():
    model = _model("cnn")
    layout = select_parameters(model)
    x, y = _inputs(7)
    results = {}
    for chunk_size in (1, 3, 1000):
        chunks = list(GradientSource(model, layout, chunk_size=chunk_size).iter_grads([(x, y)], 7))
        expected_sizes = {1: [1] * 7, 3: [3, 3, 1], 1000: [7]}[chunk_size]
        assert [c.shape[0] for c in chunks] == expected_sizes
        results[chunk_size] = torch.cat(chunks)
    # Same float64 arithmetic on different batch sizes: only kernel-order round-off may differ.
    _assert_rows(results[3], results[1])
    _assert_rows(results[1000], results[1])


# -- data handling ------------------------------------------------------------------------------


def test_uneven_batches_are_regrouped_in_order():
    model = _model("mlp")
    layout = select_parameters(model)
    x, y = _inputs(11)
    cuts = [0, 2, 7, 8, 11]  # batch sizes 2, 5, 1, 3
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    source = GradientSource(model, layout, chunk_size=4)
    chunks = list(source.iter_grads(batches, 11))
    assert [c.shape[0] for c in chunks] == [4, 4, 3]
    _assert_rows(torch.cat(chunks), _loop_grads(model, layout.names, x, y))
    assert source.samples_used == 11


def test_num_grads_beyond_the_dataset_reiterates_a_dataloader():
    model = _model("mlp")
    layout = select_parameters(model)
    x, y = _inputs(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)  # batches 4, 4, 2
    source = GradientSource(model, layout, chunk_size=3)
    with pytest.warns(SampleReuseWarning, match="holds 10 samples but the gradients need 25") \
            as got:
        rows = _collect(source, loader, 25)
    assert len(got) == 1 and "reused 3 times over" in str(got[0].message)  # once per call
    order = torch.arange(25) % 10  # three passes, the last one partial
    _assert_rows(rows, _loop_grads(model, layout.names, x[order], y[order]))
    assert source.samples_used == 25


def test_enough_samples_give_no_reuse_warning():
    model = _model("mlp")
    x, y = _inputs(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleReuseWarning)
        _collect(GradientSource(model, select_parameters(model), chunk_size=3), loader, 10)


def test_an_iterator_that_runs_out_raises():
    model = _model("mlp")
    source = GradientSource(model, select_parameters(model), chunk_size=2)
    x, y = _inputs(5)
    with pytest.raises(ConfigError) as excinfo:
        _collect(source, iter([(x[:3], y[:3]), (x[3:], y[3:])]), 6)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "ran out after 5 samples" in message and "6" in message
    assert model.training
    # Exactly enough samples from an iterator is fine.
    assert _collect(source, iter([(x, y)]), 5).shape[0] == 5


def test_empty_data_raises():
    model = _model("mlp")
    source = GradientSource(model, select_parameters(model))
    with pytest.raises(ConfigError, match="no sample"):
        _collect(source, [], 3)


# -- mask, true Fisher ----------------------------------------------------------------------------


def test_mask_zeroes_pruned_coordinates():
    model = _model("cnn")
    layout = select_parameters(model)
    x, y = _inputs(5)
    mask = torch.rand(layout.d, generator=torch.Generator().manual_seed(3)) < 0.6
    before = _state(model)
    rows = _collect(GradientSource(model, layout, mask=mask), [(x, y)], 5)
    expected = _loop_grads(model, layout.names, x, y)
    assert bool((rows[:, ~mask] == 0).all())
    _assert_rows(rows, expected * mask)
    assert bool((expected[:, ~mask] != 0).any())  # the mask really removed something
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())


PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def _known_distribution_model() -> nn.Module:
    """Logits equal log(PROBS) whatever the input: zero weights, bias = log p."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, len(PROBS))).double()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(PROBS.log())
    return model


def _true_fisher_rows(n: int, seed: int) -> Tensor:
    model = _known_distribution_model()
    layout = select_parameters(model, ["1.bias"])
    gen = torch.Generator().manual_seed(seed)
    source = GradientSource(model, layout, fisher="true", generator=gen, chunk_size=512)
    x = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)  # data labels: always class 0
    return _collect(source, [(x, y)], n)


def test_true_fisher_labels_follow_the_softmax_distribution():
    n = 4000
    rows = _true_fisher_rows(n, seed=0)
    # d(CE)/d(bias) = softmax(logits) - onehot(label) = PROBS - onehot(label): exact structure,
    # and the sampled label is the one negative entry.
    labels = rows.argmin(dim=1)
    _assert_rows(rows, PROBS - F.one_hot(labels, len(PROBS)).double())
    counts = torch.bincount(labels, minlength=len(PROBS)).double()
    # Pearson's chi-square against the softmax: under correct sampling it is chi2(3). The
    # generator is seeded, so the test is deterministic; the threshold 30.66 is the chi2(3)
    # upper 1e-6 quantile, i.e. a correct sampler fails for at most one seed in a million.
    # Wrong samplers are far beyond it: the data labels (all 0) give ~36000, uniform labels
    # ~1200, argmax labels (always 3) 6000.
    chi2 = float(((counts - n * PROBS) ** 2 / (n * PROBS)).sum())
    assert chi2 < 30.66, (counts.tolist(), chi2)


def test_true_fisher_is_reproducible_and_differs_from_empirical():
    first, again, other = (_true_fisher_rows(64, seed) for seed in (5, 5, 6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert bool((first.argmin(dim=1) != 0).any())  # not the data labels

    model = _model("mlp")
    layout = select_parameters(model)
    x, y = _inputs(8)
    empirical = _collect(GradientSource(model, layout), [(x, y)], 8)
    true = _collect(
        GradientSource(model, layout, fisher="true", generator=torch.Generator().manual_seed(0)),
        [(x, y)],
        8,
    )
    assert not torch.allclose(empirical, true)


# -- non-finite values -------------------------------------------------------------------------


def test_finite_gradients_pass_check():
    model = _model("mlp")
    source = GradientSource(model, select_parameters(model))
    _collect(source, [_inputs(4)], 4)
    source.check_finite()


def test_nan_input_is_reported_with_the_parameters():
    model = _model("cnn")
    layout = select_parameters(model, ["8", "10"])
    x, y = _inputs(4)
    x[2, 0, 3, 3] = math.nan
    source = GradientSource(model, layout, chunk_size=2)
    _collect(source, [(x, y)], 4)  # no error while collecting: no host sync per chunk
    with pytest.raises(NumericalError) as excinfo:
        source.check_finite()
    message = str(excinfo.value)
    assert "non-finite gradients in '8.weight', '10.weight'" in message
    assert "'0.weight'" not in message  # unselected parameters are never named


def test_nan_weight_is_reported_with_the_parameter():
    model = _model("mlp")
    layout = select_parameters(model, ["5"])  # only the last layer
    with torch.no_grad():
        model[5].weight[3, 7] = math.nan
    source = GradientSource(model, layout)
    _collect(source, [_inputs(4)], 4)
    with pytest.raises(NumericalError, match=r"non-finite gradients in '5\.weight'"):
        source.check_finite()


def test_non_finite_loss_with_finite_gradients_is_reported():
    model = _model("mlp")

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        # A constant -inf term: the loss is non-finite, its gradient (that of CE) is not.
        return F.cross_entropy(outputs, targets) + torch.zeros((), dtype=outputs.dtype).log()

    source = GradientSource(model, select_parameters(model), loss_fn)
    rows = _collect(source, [_inputs(3)], 3)
    assert bool(torch.isfinite(rows).all())
    with pytest.raises(NumericalError, match="non-finite loss"):
        source.check_finite()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fisher_mini_batch": 0}, "fisher_mini_batch must be >= 1, got 0"),
        ({"fisher": "exact"}, "fisher must be 'empirical' or 'true', got 'exact'"),
        ({"micro_batch": 0}, "micro_batch must be >= 1, got 0"),
    ],
)
def test_invalid_options(kwargs, message):
    model = _model("mlp")
    with pytest.raises(ConfigError, match=message):
        GradientSource(model, select_parameters(model), **kwargs)


def test_a_mask_that_prunes_nothing_makes_no_masking_pass():
    model = _model("mlp")
    layout = select_parameters(model)
    dense = GradientSource(model, layout, mask=torch.ones(layout.d, dtype=torch.bool))
    assert dense._pruned is None  # no per-chunk masked_fill over [k, d]
    sparse_mask = torch.ones(layout.d, dtype=torch.bool)
    sparse_mask[::3] = False
    sparse = GradientSource(model, layout, mask=sparse_mask)
    assert torch.equal(sparse._pruned, ~sparse_mask)
