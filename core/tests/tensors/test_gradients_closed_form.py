"""Issue 19: per-sample gradients of nn.Linear layers in closed form, straight into the rows.

The closed form (one batched forward and backward, then Σ g ⊗ x per row written into the
``[k, d]`` buffer) must give the rows ``vmap(grad)`` gives, in float64, and must be used only
where its assumption (samples computed independently, parameters used only by their Linear)
holds. A model wrapped in a custom module always takes the ``vmap`` path, which is the ground
truth here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvprune import GradientSource, NumericalError, select_parameters


class Wrapped(nn.Module):
    """A custom module around a model: GradientSource then uses vmap(grad)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def seq_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of a sequence output ``[b, T, C]``."""
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def rows(model, targets, x, y, **kw):
    layout = select_parameters(model, targets=targets)
    source = GradientSource(model, layout, kw.pop("loss_fn", None), chunk_size=4, **kw)
    n = x.shape[0] // kw.get("fisher_mini_batch", 1)
    out = torch.cat(list(source.iter_grads([(x, y)], n)))
    return out, source


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(),
                         nn.Linear(4, 3)).double()


CASES = {
    "weights": ({}, ("Linear",)),
    "weights and biases": ({}, ("re:.*",)),
    "mini-batch rows": ({"fisher_mini_batch": 3}, ("Linear",)),
    "true Fisher": ({"fisher": "true"}, ("re:.*",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_rows_equal_vmap_in_float64(case):
    kw, targets = CASES[case]
    net = mlp()
    x = torch.randn(12, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    fast, source = rows(net, targets, x, y, generator=torch.Generator().manual_seed(1), **kw)
    slow, reference = rows(Wrapped(net), targets, x, y,
                           generator=torch.Generator().manual_seed(1), **kw)
    assert source._closed_form is not None and reference._closed_form is None
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(source.mean(), reference.mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(source._loss_sum, reference._loss_sum, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in net.parameters())
    assert not net._forward_hooks and not any(m._forward_hooks for m in net.modules())


def test_sequence_positions_and_a_layer_called_twice_are_summed():
    torch.manual_seed(2)
    shared = nn.Linear(5, 5)
    net = nn.Sequential(nn.Linear(6, 5), nn.GELU(), shared, nn.Tanh(), shared,
                        nn.LayerNorm(5, elementwise_affine=False), nn.Linear(5, 3)).double()
    x = torch.randn(8, 7, 6, dtype=torch.float64)  # 7 positions per sample
    y = torch.randint(0, 3, (8, 7))
    fast, source = rows(net, ("re:.*",), x, y, loss_fn=seq_loss)
    slow, _ = rows(Wrapped(net), ("re:.*",), x, y, loss_fn=seq_loss)
    assert source._closed_form is not None
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)


def test_pruned_weights_stay_zero():
    net = mlp()
    layout = select_parameters(net)
    mask = torch.rand(layout.d, generator=torch.Generator().manual_seed(3)) > 0.5
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    fast, source = rows(net, ("Linear",), x, y, mask=mask)
    slow, reference = rows(Wrapped(net), ("Linear",), x, y, mask=mask)
    assert source._closed_form is not None
    assert bool((fast[:, ~mask] == 0).all()) and bool((source.mean()[~mask] == 0).all())
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    # the running sum comes from its own GEMM in closed form: it must still be the rows' sum
    torch.testing.assert_close(source.mean(), fast.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(source.mean(), reference.mean(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("model", ["conv", "custom", "inplace", "tied", "batchnorm-only"])
def test_closed_form_only_where_it_holds(model):
    torch.manual_seed(4)
    if model == "conv":
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        x = torch.randn(4, 1, 4, 4)
    elif model == "custom":
        net, x = Wrapped(nn.Sequential(nn.Linear(6, 3))), torch.randn(4, 6)
    elif model == "inplace":
        net, x = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)), \
            torch.randn(4, 6)
    elif model == "tied":
        first, second = nn.Linear(5, 5), nn.Linear(5, 5)
        second.weight = first.weight
        net = nn.Sequential(nn.Linear(6, 5), first, nn.Tanh(), second, nn.Linear(5, 3))
        x = torch.randn(4, 6)
    else:  # a Linear net whose selection includes a BatchNorm weight: not a Linear parameter
        net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
        x = torch.randn(4, 6)
    targets = ("re:.*weight",) if model == "batchnorm-only" else ("Conv2d", "Linear")
    net = net.double()
    got, source = rows(net, targets, x.double(), torch.randint(0, 3, (4,)))
    assert source._closed_form is None
    assert got.shape == (4, select_parameters(net, targets=targets).d)


def test_non_finite_input_still_names_the_parameter():
    net = mlp()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    x[3, 2] = math.nan
    _, source = rows(net, ("Linear",), x, y)
    assert source._closed_form is not None
    with pytest.raises(NumericalError, match=r"non-finite gradients in '0\.weight'"):
        source.check_finite()


def test_transformer_layer_rows_equal_vmap():
    """nn.TransformerEncoderLayer's feed-forward Linears (positions mixed by attention within a
    sample, never across samples): the rows equal vmap(grad)'s. In eval mode the layer may also
    run a fused kernel that reads linear1 and linear2's weights without calling them; the
    closed form then sees no call and steps aside, with the same rows."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                        nn.Flatten(), nn.Linear(8 * 3, 4)).double()
    x = torch.randn(6, 3, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    targets = ("re:.*linear[12]\\.weight", "re:(net\\.)?2\\.weight")
    fast, source = rows(net, targets, x, y)
    slow, reference = rows(Wrapped(net), targets, x, y)
    assert reference._closed_form is None
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
