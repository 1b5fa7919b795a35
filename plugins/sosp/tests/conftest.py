"""Tiny gated float64 networks and dense ground truths for the SOSP tests.

The ground truths are built by brute force from the definitions, independently of the plugin:
full Jacobians of the logits in the gates (``torch.autograd.functional.jacobian``), the loss
Hessian in the logits per sample (``torch.autograd.functional.hessian``), the dense gate-space
Gauss-Newton matrix G = (1/N)·Σ JᵀΛJ, and the exact Hessian of the loss in the gates.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvprune_sosp.gates import GateSpace

LOSSES = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "autograd": lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1),
}


class GatedMLP(nn.Module):
    """x → Linear → BN (eval) → ·m₁ → tanh → Linear → ·m₂ → ReLU → Linear (classifier).

    Gates are explicit arguments here (the plugin's tests of the maths do not depend on the
    core's tracing); ``last_only`` gates only the second hidden layer, where the logits are
    linear in the gates (ReLU(m·z) = m·ReLU(z) for m ≥ 0).
    """

    def __init__(self, d_in: int = 5, h1: int = 4, h2: int = 3, c: int = 3,
                 last_only: bool = False) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, h1), nn.BatchNorm1d(h1)
        self.fc2, self.fc3 = nn.Linear(h1, h2), nn.Linear(h2, c)
        self.h1, self.h2, self.last_only = h1, h2, last_only

    @property
    def num_gates(self) -> int:
        return self.h2 if self.last_only else self.h1 + self.h2

    def forward(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        if gates is None:
            gates = torch.ones(self.num_gates, dtype=x.dtype)
        g1 = torch.ones(self.h1, dtype=x.dtype) if self.last_only else gates[: self.h1]
        g2 = gates[-self.h2 :]
        h = torch.tanh(self.bn1(self.fc1(x)) * g1)
        h = torch.relu(self.fc2(h) * g2)
        return self.fc3(h)


def make_problem(seed: int, loss: str, *, last_only: bool = False, n: int = 11):
    """A drawn GatedMLP (eval mode, random BN statistics), data split in 3 uneven batches."""
    gen = torch.Generator().manual_seed(seed)
    model = GatedMLP(last_only=last_only).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        h1 = model.h1
        model.bn1.running_mean.copy_(0.3 * torch.randn(h1, generator=gen, dtype=torch.float64))
        model.bn1.running_var.copy_(0.5 + torch.rand(model.h1, generator=gen, dtype=torch.float64))
    model.eval()
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (n,), generator=gen)
    cuts = [0, 4, 9, n]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    space = GateSpace(
        size=model.num_gates,
        forward=lambda values, inputs: model(inputs, values),
        group=torch.tensor([0] * (0 if last_only else model.h1) + [1] * model.h2),
        group_names=("fc1", "fc2"),
        structure_of_channel=torch.arange(model.num_gates),
    )
    return SimpleNamespace(model=model, x=x, y=y, batches=batches, space=space,
                           loss_fn=LOSSES[loss], S=model.num_gates)


def dense_jacobian(p) -> Tensor:
    """Aₙ = ∂f(xₙ)/∂m, ``[N, C, S]``, by brute force."""
    ones = torch.ones(p.S, dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda m: p.model(p.x, m), ones)


def dense_output_hessians(p) -> Tensor:
    """Λₙ = ∂²ℓ(fₙ, yₙ)/∂fₙ², ``[N, C, C]``, by brute force, one sample at a time."""
    out = p.model(p.x).detach()
    return torch.stack([
        torch.autograd.functional.hessian(lambda f, i=i: p.loss_fn(f[None], p.y[i : i + 1]), out[i])
        for i in range(out.shape[0])
    ])


def dense_ggn(p) -> Tensor:
    """G = (1/N)·Σₙ AₙᵀΛₙAₙ, ``[S, S]``."""
    a = dense_jacobian(p)
    return torch.einsum("ncs,ncd,ndt->st", a, dense_output_hessians(p), a) / a.shape[0]


def loss_at(p, gates: Tensor) -> Tensor:
    """L(m) = (1/N)·Σₙ ℓ(f(xₙ; m), yₙ) over all samples."""
    return p.loss_fn(p.model(p.x, gates), p.y)


def dense_grad(p) -> Tensor:
    """g = ∂L/∂m at m = 𝟙."""
    ones = torch.ones(p.S, dtype=torch.float64, requires_grad=True)
    return torch.autograd.grad(loss_at(p, ones), ones)[0]


def dense_hessian(p) -> Tensor:
    """The exact Hessian ∂²L/∂m² at m = 𝟙."""
    ones = torch.ones(p.S, dtype=torch.float64)
    return torch.autograd.functional.hessian(lambda m: loss_at(p, m), ones)


@pytest.fixture(scope="session")
def dense() -> SimpleNamespace:
    """The ground-truth helpers (session-scoped, so usable in @given tests)."""
    return SimpleNamespace(problem=make_problem, jacobian=dense_jacobian, ggn=dense_ggn,
                           grad=dense_grad, hessian=dense_hessian, loss_at=loss_at,
                           output_hessians=dense_output_hessians)
