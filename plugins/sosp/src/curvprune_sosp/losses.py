"""The loss's derivatives in the model outputs: the residual r = ∂ℓ/∂f and Λ = ∂²ℓ/∂f².

The Gauss-Newton matrix of a loss L = (1/N)·Σₙ ℓ(f(xₙ), yₙ) is G = (1/N)·Σₙ JₙᵀΛₙJₙ with
Jₙ = ∂f(xₙ)/∂θ (memo §4.2). Its pieces that depend on the loss live here, per sample:

* **cross entropy** (softmax on logits f ∈ ℝᶜ, p = softmax(f)): r = p − y (y one-hot or a
  probability vector), Λ = diag(p) − ppᵀ, so Λu = p ⊙ u − p·(pᵀu);
* **mean squared error** (``F.mse_loss``, mean over the N·C entries, so ℓₙ = (1/C)·‖f − y‖²):
  r = (2/C)(f − y), Λ = (2/C)·I;
* **autograd**: r and Λ by automatic differentiation of ℓ(f[None], y[None]) per sample, for
  any loss that is the batch mean of a per-sample loss.

``auto`` recognises the two closed forms by evaluating the pipeline's ``loss_fn`` on the first
batch and comparing with ``F.cross_entropy`` / ``F.mse_loss``; a loss that matches neither
(label smoothing, class weights, a custom loss) raises :class:`curvprune.ConfigError`, so a
wrong Λ is never used silently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from curvprune import ConfigError

__all__ = ["OutputCurvature", "resolve_output_curvature"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class OutputCurvature:
    """r = ∂ℓₙ/∂fₙ and Λₙu for a batch of outputs ``[B, C]`` (per sample, not averaged).

    Args:
        kind: ``"cross_entropy"``, ``"mse"`` or ``"autograd"``.
        loss_fn: the loss (used by ``"autograd"`` only).

    """

    def __init__(self, kind: str, loss_fn: LossFn | None = None) -> None:
        if kind not in ("cross_entropy", "mse", "autograd"):
            raise ValueError(f"unknown loss kind {kind!r}")
        if kind == "autograd" and loss_fn is None:
            raise ValueError("loss kind 'autograd' needs the loss function")
        self.kind = kind
        self.loss_fn = loss_fn

    def residual(self, out: Tensor, y: Tensor) -> Tensor:
        """rₙ = ∂ℓ(fₙ, yₙ)/∂fₙ, ``[B, C]``."""
        if self.kind == "cross_entropy":
            return torch.softmax(out, dim=1) - _as_probabilities(y, out)
        if self.kind == "mse":
            return (2.0 / out.shape[1]) * (out - y.to(out.dtype))
        return torch.func.vmap(torch.func.grad(self._per_sample))(out, y)

    def apply(self, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """Λₙuₙ for every sample: ``u`` is ``[B, C]`` or ``[B, C, K]`` (K vectors per sample)."""
        if self.kind == "cross_entropy":
            p = torch.softmax(out, dim=1)
            if u.dim() == 3:
                p = p.unsqueeze(2)
            return p * u - p * (p * u).sum(dim=1, keepdim=True)
        if self.kind == "mse":
            return (2.0 / out.shape[1]) * u
        lam = self.matrix(out, y)
        return torch.einsum("bcd,bd...->bc...", lam, u)

    def matrix(self, out: Tensor, y: Tensor) -> Tensor:
        """Λₙ as matrices, ``[B, C, C]``."""
        if self.kind == "autograd":
            return torch.func.vmap(torch.func.hessian(self._per_sample))(out, y)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return self.apply(out, y, eye.expand(out.shape[0], -1, -1))

    def _per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        assert self.loss_fn is not None
        return self.loss_fn(out.unsqueeze(0), y.unsqueeze(0))


def _as_probabilities(y: Tensor, out: Tensor) -> Tensor:
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return F.one_hot(y.long(), out.shape[1]).to(out.dtype)
    return y.to(out.dtype)


def resolve_output_curvature(
    choice: str, loss_fn: LossFn | None, out: Tensor, y: Tensor, *, where: str = "scorer.loss"
) -> OutputCurvature:
    """Build the :class:`OutputCurvature` for ``choice`` (``auto`` probes ``loss_fn`` on a batch).

    Raises:
        ConfigError: outputs that are not ``[B, C]`` logits, or ``auto`` facing a loss that is
            neither cross entropy nor mean squared error.

    """
    if out.dim() != 2:
        raise ConfigError(
            f"SOSP needs model outputs of shape [batch, classes], got {list(out.shape)} @ model"
        )
    if choice != "auto":
        return OutputCurvature(choice, loss_fn)
    loss_fn = loss_fn or F.cross_entropy
    with torch.no_grad():
        value = loss_fn(out, y)
        if value.dim() == 0:
            if _matches(value, lambda: F.cross_entropy(out, _ce_target(y))):
                return OutputCurvature("cross_entropy")
            if y.shape == out.shape and _matches(value, lambda: F.mse_loss(out, y.to(out.dtype))):
                return OutputCurvature("mse")
    raise ConfigError(
        "cannot identify the loss: it matches neither mean cross entropy nor mean squared "
        "error on the first batch; set loss = 'cross_entropy' or 'mse' if it is one of them, "
        f"or loss = 'autograd' for the exact per-sample Hessian of any batch-mean loss @ {where}"
    )


def _ce_target(y: Tensor) -> Tensor:
    return y.long() if not y.is_floating_point() else y


def _matches(value: Tensor, reference: Callable[[], Tensor]) -> bool:
    try:
        ref = reference()
    except (RuntimeError, ValueError, IndexError):
        return False
    return bool(torch.allclose(value.double(), ref.double(), rtol=1e-5, atol=1e-7))
