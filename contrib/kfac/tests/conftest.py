"""Tiny models and K-FAC built by hand in float64, independently of curvlinops (fixture ``ref``).

For every Linear/Conv2d layer, hooks record the layer input and the gradient of the *summed*
per-sample loss w.r.t. the layer output (so each row is ∂ℓ_n/∂z_n), then

    A = (1/(N·S)) Σ_ns a_ns a_nsᵀ,   G = (1/N) Σ_ns g_ns g_nsᵀ,

with a Conv2d's inputs unfolded into patches (S output positions) — Martens & Grosse 2015
Eq. 1-2, Grosse & Martens 2016 (KFC). The dense block of a row-major flattened weight [o, i] is
kron(G, A); a bias's block is G.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyMLP(nn.Sequential):
    def __init__(self, bias: bool = True) -> None:
        super().__init__(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias))


class TinyCNN(nn.Module):
    """Conv (2→3, 3×3, pad 1) → ReLU → Linear(3·4·4 → 3) on 2×4×4 inputs."""

    def __init__(self, bias: bool = True, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=stride, bias=bias)
        side = 4 if stride == 1 else 2
        self.fc = nn.Linear(3 * side * side, 3, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


def make_problem(kind: str, seed: int, n: int = 6, bias: bool = True):
    """A float64 model with drawn weights and ``n`` samples in two batches."""
    gen = torch.Generator().manual_seed(seed)
    model = (TinyMLP(bias) if kind == "mlp" else TinyCNN(bias)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    shape = (n, 5) if kind == "mlp" else (n, 2, 4, 4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    half = n // 2
    return model, [(x[:half], y[:half]), (x[half:], y[half:])]


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _record(model: nn.Module, x: Tensor):
    inputs, outputs = {}, {}
    handles = []
    for layer in _layers(model):
        def hook(module, args, out, layer=layer):
            inputs[layer] = args[0].detach()
            out.retain_grad()
            outputs[layer] = out
        handles.append(layer.register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, inputs, outputs


def _patches(layer: nn.Module, a: Tensor) -> Tensor:
    """Rows of layer inputs: [N, S, i] (S = 1 for Linear)."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # [N, c·kh·kw, S]
        return cols.transpose(1, 2)
    return a[:, None, :]


def _out_rows(layer: nn.Module, g: Tensor) -> Tensor:
    """Rows of output gradients: [N, S, o]."""
    if isinstance(layer, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g[:, None, :]


def handmade_factors(model: nn.Module, batches, approx: str = "expand") -> dict[nn.Module, tuple[Tensor, Tensor]]:
    """(G, A) per layer from the empirical per-sample losses (labels from the data)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = x.shape[0]
    out, inputs, outputs = _record(model, x)
    F.cross_entropy(out, y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    factors = {}
    for layer in _layers(model):
        a = _patches(layer, inputs[layer])  # [N, S, i]
        g = _out_rows(layer, outputs[layer].grad)  # [N, S, o]
        s = a.shape[1]
        if approx == "expand":
            big_a = torch.einsum("nsi,nsj->ij", a, a) / (n * s)
            big_g = torch.einsum("nsi,nsj->ij", g, g) / n
        else:  # reduce: mean patch, summed output gradient per sample
            a_bar, g_sum = a.mean(1), g.sum(1)
            big_a = a_bar.T @ a_bar / n
            big_g = g_sum.T @ g_sum / n
        factors[layer] = (big_g, big_a)
    return factors


def type2_factors(model: nn.Module, batches) -> dict[nn.Module, tuple[Tensor, Tensor]]:
    """(G, A) with G = (1/N) Σ_n J_nᵀ H_n J_n: J_n = ∂f(x_n)/∂z_l, H_n = diag(p) − ppᵀ (MLP only)."""
    x = torch.cat([b[0] for b in batches])
    n = x.shape[0]
    factors = {}
    for layer in _layers(model):
        out, inputs, outputs = _record(model, x)
        z = outputs[layer]
        p = out.softmax(-1)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
        rows = []
        for c in range(out.shape[1]):  # J[:, c, :] = ∂f_c/∂z (samples are independent)
            (grad,) = torch.autograd.grad(out[:, c].sum(), z, retain_graph=True)
            rows.append(grad)
        jac = torch.stack(rows, 1)  # [N, C, o]
        big_g = torch.einsum("nco,ncd,ndp->op", jac, hess, jac) / n
        a = inputs[layer]
        factors[layer] = (big_g, a.T @ a / n)
    return factors


def dense_kfac(model: nn.Module, factors, names: list[str], damping: float) -> Tensor:
    """λI + blockdiag of kron(G, A) (weights) or G (biases), for parameters ``names``."""
    by_name = {}
    for mname, module in model.named_modules():
        if module in factors:
            g, a = factors[module]
            prefix = f"{mname}." if mname else ""
            by_name[f"{prefix}weight"] = torch.kron(g.contiguous(), a.contiguous())
            by_name[f"{prefix}bias"] = g
    return torch.block_diag(*[by_name[n] for n in names]) + damping * torch.eye(
        sum(by_name[n].shape[0] for n in names), dtype=torch.float64
    )


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The hand-built ground truth of this module."""
    return SimpleNamespace(
        TinyMLP=TinyMLP, TinyCNN=TinyCNN, make_problem=make_problem,
        handmade_factors=handmade_factors, type2_factors=type2_factors, dense_kfac=dense_kfac,
    )
