"""LayerHessian against 2XXᵀ/n, input extraction per layer type, the damped inverse factor."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune_sparsegpt import (
    DampingWarning,
    HessianError,
    LayerHessian,
    inverse_factor,
    layer_inputs,
    obc,
    set_weight_matrix,
    sparsegpt,
    weight_matrix,
)

try:  # the repo's --import-mode=importlib (root addopts)
    from .conftest import F64, correlated_inputs, damped, dense_hessian
except ImportError:  # the default prepend mode puts tests/ on sys.path
    from conftest import F64, correlated_inputs, damped, dense_hessian


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D's shape convention: y = x @ W + b, W ``[in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=F64))
        self.bias = nn.Parameter(torch.zeros(nf, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_linear_equals_dense_over_uneven_batches():
    layer = nn.Linear(7, 3).double()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, t, 7, generator=g, dtype=F64) for b, t in [(2, 5), (1, 3), (4, 1)]]
    acc = LayerHessian(layer, dtype=F64)
    for b in batches:
        acc.add_batch(b)
    x = torch.cat([b.reshape(-1, 7) for b in batches])
    assert acc.num_samples == x.shape[0] == 17
    torch.testing.assert_close(acc.hessian, dense_hessian(x), rtol=1e-13, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(1, 8),
       st.integers(0, 2**16))
def test_batch_split_invariance(sizes, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), d, generator=g, dtype=F64)
    split = LayerHessian(d, dtype=F64)
    for part in torch.split(x, sizes):
        split.add_batch(part)
    whole = LayerHessian(d, dtype=F64)
    whole.add_batch(x)
    torch.testing.assert_close(split.hessian, whole.hessian, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split.hessian, dense_hessian(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split.column_norms(), x.norm(dim=0), rtol=1e-12, atol=1e-14)


def test_float32_default_close_to_float64():
    x = correlated_inputs(16, 300, seed=3)
    acc = LayerHessian(16)
    assert acc.hessian.dtype == torch.float32
    for part in torch.split(x.float(), [100, 37, 163]):
        acc.add_batch(part)
    ref = dense_hessian(x)
    err = (acc.hessian.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5  # float32 accumulation of 300 terms: ~n·eps32 relative at worst


def explicit_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patches by explicit loops over output positions, channel-major then kernel row/col."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    b, c, hh, ww = xp.shape
    oh = (hh - dh * (kh - 1) - 1) // sh + 1
    ow = (ww - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(b):
        for y in range(oh):
            for z in range(ow):
                patch = [xp[i, ch, y * sh + u * dh, z * sw + v * dw]
                         for ch in range(c) for u in range(kh) for v in range(kw)]
                rows.append(torch.stack(patch))
    return torch.stack(rows)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), ((2, 3), (2, 1), (0, 2), (1, 2)), (1, 2, 0, 1), (3, 2, 2, 2)])
def test_conv2d_unfold_equals_explicit_patches(kernel, stride, padding, dilation):
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 7, 6, generator=g, dtype=F64)
    patches = explicit_patches(x, conv)
    torch.testing.assert_close(layer_inputs(conv, x), patches, rtol=0, atol=0)
    # the column order matches weight.flatten(1): the conv is W·patch at every position
    out = conv(x) - conv.bias[None, :, None, None]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(patches @ weight_matrix(conv).T, flat, rtol=1e-12, atol=1e-12)
    acc = LayerHessian(conv, dtype=F64)
    acc.add_batch(x[:1])
    acc.add_batch(x[1])  # an unbatched [C, H, W] input
    torch.testing.assert_close(acc.hessian, dense_hessian(patches), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")
@pytest.mark.parametrize("padding,mode", [("same", "zeros"), (1, "reflect"), (2, "circular")])
def test_conv2d_padding_modes(padding, mode):
    conv = nn.Conv2d(2, 4, (3, 2), padding=padding, padding_mode=mode).double()
    x = torch.randn(2, 2, 6, 5, dtype=F64)
    cols = layer_inputs(conv, x)
    out = (conv(x) - conv.bias[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(cols @ weight_matrix(conv).T, out, rtol=1e-12, atol=1e-12)


def test_grouped_conv_rejected():
    with pytest.raises(ValueError, match="groups=2"):
        LayerHessian(nn.Conv2d(4, 4, 3, groups=2))


def test_conv1d_transposed_weight():
    layer = Conv1D(nf=5, nx=6)
    x = torch.randn(3, 4, 6, dtype=F64)
    acc = LayerHessian(layer, dtype=F64)
    acc.add_batch(x)
    assert acc.hessian.shape == (6, 6)
    torch.testing.assert_close(acc.hessian, dense_hessian(x.reshape(-1, 6)), rtol=1e-13,
                               atol=1e-13)
    w = weight_matrix(layer)
    assert w.shape == (5, 6)
    torch.testing.assert_close(x @ w.T, layer(x) - layer.bias, rtol=1e-13, atol=1e-13)
    set_weight_matrix(layer, 2 * w)
    torch.testing.assert_close(layer.weight.detach(), 2 * w.T)


def test_unsupported_layer():
    with pytest.raises(TypeError, match="unsupported"):
        LayerHessian(nn.Conv1d(2, 2, 3))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 24), st.integers(0, 2**16))
def test_inverse_factor_is_upper_cholesky_of_inverse(d, seed):
    x = correlated_inputs(d, 3 * d, seed=seed)
    h = dense_hessian(x)
    f = inverse_factor(h, dtype=F64)
    hd = damped(h)
    torch.testing.assert_close(f.hessian, hd, rtol=1e-14, atol=0)
    assert torch.equal(f.upper, f.upper.triu()) and bool((f.upper.diagonal() > 0).all())
    ref = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    scale = ref.abs().max()
    assert (f.upper - ref).abs().max() / scale < 1e-9  # κ(H̃) ≤ ~1e4 here, see conftest


def test_dead_inputs_pruned_and_finite():
    x = correlated_inputs(12, 60, seed=4)
    x[:, [2, 7]] = 0
    h = dense_hessian(x)
    f = inverse_factor(h)
    assert f.dead.nonzero().flatten().tolist() == [2, 7]
    assert float(f.hessian[2, 2]) == pytest.approx(1 + f.damping)
    w = torch.randn(5, 12, dtype=F64)
    for res in (sparsegpt(w, h, sparsity=0.25), sparsegpt(w, h, prune_n=1, prune_m=4),
                sparsegpt(w, h, mask=torch.ones(5, 12, dtype=torch.bool)),
                obc(w, h, sparsity=0.25), obc(w, h, sparsity=0.25, scope="layer"),
                obc(w, h, prune_n=1, prune_m=4)):
        assert torch.isfinite(res.weight).all() and torch.isfinite(res.loss).all()
        assert not res.mask[:, [2, 7]].any() and (res.weight[:, [2, 7]] == 0).all()
    # all-dead layer: H = 0 is handled (H̃ = (1 + λ)·I), nothing NaN
    res = sparsegpt(w, torch.zeros(12, 12), sparsity=0.5)
    assert (res.weight == 0).all() and torch.isfinite(res.loss).all()


def test_singular_hessian_warns_and_stays_finite():
    # duplicated input columns with exactly representable sums: H = XᵀX has a 0 pivot exactly
    x = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=F64)
    x = torch.cat([x, x])
    h = x.T @ x  # [[4,4,0,2],[4,4,0,2],[0,0,4,2],[2,2,2,4]]: columns 0 and 1 are equal
    with pytest.warns(DampingWarning, match="failed at damping 0"):
        f = inverse_factor(h, percdamp=0.0)
    assert f.damping > 0 and torch.isfinite(f.upper).all()
    w = torch.randn(4, 4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DampingWarning)
        ok = sparsegpt(w, h, sparsity=0.5)  # the default 1 % damping needs no retry
    assert torch.isfinite(ok.weight).all()
    with pytest.warns(DampingWarning):
        res = sparsegpt(w, h, sparsity=0.5, percdamp=0.0)
    assert torch.isfinite(res.weight).all() and torch.isfinite(res.loss).all()


def test_bound_and_nonfinite_raise():
    with pytest.raises(HessianError, match="non-finite"):
        inverse_factor(torch.full((3, 3), float("nan")))
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -1e9]], dtype=F64)
    with pytest.raises(HessianError, match="not positive definite"):
        inverse_factor(indefinite, max_retries=2)
    with pytest.raises(HessianError, match="no calibration inputs"):
        LayerHessian(3).factor()
