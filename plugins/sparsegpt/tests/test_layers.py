"""End to end on real modules: hooks → LayerHessian → prune → write back; the loss estimate
against the measured output error ‖WX − ŴX‖²/n."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvprune_sparsegpt import LayerHessian, obc, set_weight_matrix, sparsegpt, weight_matrix

F64 = torch.float64


def calibrate(layer: nn.Module, batches: list[torch.Tensor], dtype: torch.dtype) -> LayerHessian:
    acc = LayerHessian(layer, dtype=dtype)
    handle = layer.register_forward_pre_hook(lambda m, args: acc.add_batch(args[0]))
    with torch.no_grad():
        for b in batches:
            layer(b)
    handle.remove()
    return acc


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(24, 10), (3, 7, 24)),
    (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (4, 3, 9, 8)),
])
@pytest.mark.parametrize("method", ["sparsegpt", "obc"])
def test_loss_estimate_is_measured_output_error(make, shape, method):
    torch.manual_seed(0)
    layer = make().double()
    batches = [torch.randn(*shape, dtype=F64) for _ in range(3)]
    acc = calibrate(layer, batches, F64)
    w = weight_matrix(layer)
    prune = sparsegpt if method == "sparsegpt" else obc
    res = prune(w, acc, sparsity=0.5)
    pruned = copy.deepcopy(layer)
    set_weight_matrix(pruned, res.weight)
    bias = layer.bias.reshape(1, -1, *([1] * (len(shape) - 2))) if len(shape) == 4 else layer.bias
    with torch.no_grad():
        outs = [(layer(b) - bias, pruned(b) - bias) for b in batches]
    sq = sum(float(((a - p) ** 2).sum()) for a, p in outs)
    # ½·Δwᵀ·H̃·Δw = ‖ΔW·X‖²/n + ½·λ·‖ΔW‖², with n the number of input vectors seen
    lam = 0.01 * float(acc.hessian.diagonal().mean())
    measured = sq / acc.num_samples + 0.5 * lam * float(((w - res.weight) ** 2).sum())
    assert float(res.loss.sum()) == pytest.approx(measured, rel=1e-9)
    assert (pruned.weight[~res.mask.reshape(pruned.weight.shape)] == 0).all()


def test_float32_pipeline_beats_zeroing():
    torch.manual_seed(1)
    layer = nn.Linear(64, 32)
    mixing = torch.eye(64) + 0.3 * torch.randn(64, 64) / 8
    batches = [torch.randn(16, 64) @ mixing.T for _ in range(8)]
    acc = calibrate(layer, batches, torch.float32)
    w = weight_matrix(layer)
    res = sparsegpt(w, acc, prune_n=2, prune_m=4)
    x = torch.cat(batches)
    err = ((x @ (w - res.weight).T) ** 2).sum()
    zeroed = ((x @ (w - w * res.mask).T) ** 2).sum()
    assert res.weight.dtype == torch.float32 and torch.isfinite(res.weight).all()
    assert err < zeroed
