"""The layer-reconstruction Hessian H = (2/n)·Σ xxᵀ and the factor of its damped inverse.

For a layer computing ``y = W·x`` (W ``[rows, d_in]``) and calibration inputs x₁…x_n, the loss
``‖WX − ŴX‖²_F`` is quadratic in every row of Ŵ with Hessian ``2XXᵀ``, shared by all rows
(OBC, Frantar & Alistarh, NeurIPS 2022, Eq. 1–2; SparseGPT, ICML 2023, §3). This module keeps the
running mean ``H = (2/n)·Σᵢ xᵢxᵢᵀ`` (n = number of input *vectors*: tokens for a Linear layer,
output positions × images for a Conv2d) and produces, with damping, the upper Cholesky factor U
of H̃⁻¹ (``H̃⁻¹ = UᵀU``) that the SparseGPT sweep consumes.

Input vectors per layer type (the columns of X):

* ``nn.Linear`` and transformers' ``Conv1D`` (detected by class name, weight stored ``[in, out]``):
  the last dimension of the input, every leading position one vector;
* ``nn.Conv2d`` (``groups == 1``): the unfolded patches, ``torch.nn.functional.unfold`` with the
  conv's kernel size, dilation, padding and stride, ``C·kh·kw`` long in the order of
  ``weight.flatten(1)``; non-zero padding modes and string padding go through ``F.pad`` first.

Difference from the reference implementation: its ``add_batch`` counts *sequences* (the batch
dimension), so its H is ``(2/#sequences)·Σ xxᵀ``, a constant multiple (tokens per sequence) of
ours. Every method here is invariant to a positive scaling of H (the damping is relative), so
masks and updates agree; only the loss estimates differ by that constant.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


class DampingWarning(UserWarning):
    """The Cholesky factorization needed more damping than ``percdamp`` asked for."""


class HessianError(RuntimeError):
    """The layer Hessian cannot be factored (non-finite entries, or no damping up to the bound)."""


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"Conv2d with groups={layer.groups} is not supported (only groups=1: "
                             "a grouped conv has one Hessian per group)")
        return "conv2d"
    if type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None \
            and layer.weight.dim() == 2:
        return "conv1d"  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W [in, out]
    raise TypeError(f"unsupported layer type {type(layer).__name__} (Linear, Conv2d with "
                    "groups=1 and transformers-style Conv1D are)")


def weight_matrix(layer: nn.Module) -> Tensor:
    """Return the layer's weight as a ``[rows, d_in]`` copy, columns matching the inputs."""
    kind = _kind(layer)
    w = layer.weight.detach()
    if kind == "conv2d":
        return w.flatten(1).clone()
    if kind == "conv1d":
        return w.t().clone()
    return w.clone()


@torch.no_grad()
def set_weight_matrix(layer: nn.Module, matrix: Tensor) -> None:
    """Write a ``[rows, d_in]`` matrix back into the layer's weight (shape and dtype restored)."""
    kind = _kind(layer)
    w = layer.weight
    src = matrix.t() if kind == "conv1d" else matrix
    w.copy_(src.reshape(w.shape).to(dtype=w.dtype, device=w.device))


def layer_inputs(layer: nn.Module, inp: Tensor) -> Tensor:
    """Return the columns of X for one forward input of ``layer``, as ``[n, d_in]``."""
    kind = _kind(layer)
    if kind in ("linear", "conv1d"):
        d_in = layer.weight.shape[1] if kind == "linear" else layer.weight.shape[0]
        if inp.shape[-1] != d_in:
            raise ValueError(f"input's last dimension is {inp.shape[-1]}, the layer takes {d_in}")
        return inp.reshape(-1, d_in)
    conv: nn.Conv2d = layer  # type: ignore[assignment]
    x = inp.unsqueeze(0) if inp.dim() == 3 else inp
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"Conv2d input must be [B, {conv.in_channels}, H, W], got "
                         f"{tuple(inp.shape)}")
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding,
                    stride=conv.stride)  # [B, C·kh·kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class InverseFactor(NamedTuple):
    """The damped Hessian and the upper Cholesky factor of its inverse.

    ``upper``: U with ``H̃⁻¹ = UᵀU`` (upper triangular, positive diagonal). Row j of U carries the
    inverse of H̃ restricted to columns j…d−1: ``[(H̃_{j:,j:})⁻¹]_{0,:} = U_jj·U_{j,j:}``, which
    is what SparseGPT's sweep needs (SparseGPT §3.2, "the sequence of inverse Hessians").
    ``dead``: bool ``[d]``, inputs that were always zero (H_jj = 0). ``damping``: the λ used.
    ``hessian``: H̃ = H (with H_jj := 1 on dead inputs) + λI.
    """

    upper: Tensor
    dead: Tensor
    damping: float
    hessian: Tensor


def _upper_inverse_cholesky(damped: Tensor) -> Tensor | None:
    """U with ``damped⁻¹ = UᵀU``, U upper, or None if the factorization fails.

    With J the reversal permutation and ``J·H̃·J = MMᵀ`` (lower M), ``U = J·M⁻¹·J``: then
    ``UᵀU = J·M⁻ᵀM⁻¹·J = J·(JH̃J)⁻¹·J = H̃⁻¹``, and U is upper with a positive diagonal, hence
    the Cholesky factor. One Cholesky and one triangular inverse, never forming H̃⁻¹ (the
    reference computes chol → cholesky_inverse → chol, squaring the conditioning once).
    """
    flipped = damped.flip(0, 1)
    lower, info = torch.linalg.cholesky_ex(flipped)
    if int(info) != 0:
        return None
    eye = torch.eye(damped.shape[0], dtype=damped.dtype, device=damped.device)
    inv_lower = torch.linalg.solve_triangular(lower, eye, upper=False)
    upper = inv_lower.flip(0, 1)
    if not bool(torch.isfinite(upper).all()):
        return None
    return upper


def inverse_factor(hessian: Tensor, *, percdamp: float = 0.01, max_retries: int = 8,
                   dtype: torch.dtype | None = None) -> InverseFactor:
    """Damp H and return the upper Cholesky factor of H̃⁻¹ (SparseGPT §3, reference defaults).

    1. Dead inputs (``H_jj == 0``) get ``H_jj := 1`` (their weights are pruned to zero by the
       methods: they never contribute to the output).
    2. ``λ = percdamp · mean(diag H)`` (after step 1, as the reference), ``H̃ = H + λI``.
    3. If a Cholesky factorization fails (or gives non-finite values), retry with
       ``λ ← max(10·λ, ε·mean(diag H))`` up to ``max_retries`` times, issuing one
       :class:`DampingWarning` with the damping finally used; past the bound raise
       :class:`HessianError`. No NaN is ever returned.

    ``dtype``: the precision of the factorization (default: H's, at least float32).
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square, got {tuple(hessian.shape)}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    dtype = dtype or torch.promote_types(hessian.dtype, torch.float32)
    h = hessian.to(dtype=dtype, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise HessianError("the layer Hessian has non-finite entries (inf/NaN in the inputs?)")
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1
    mean_diag = float(diag.mean())
    lam0 = lam = percdamp * mean_diag
    eps = float(torch.finfo(dtype).eps)
    for attempt in range(max_retries + 1):
        damped = h.clone()
        damped.diagonal().add_(lam)
        upper = _upper_inverse_cholesky(damped)
        if upper is not None:
            if attempt:
                warnings.warn(
                    f"Cholesky of the damped layer Hessian (d = {h.shape[0]}) failed at damping "
                    f"{lam0:.3g} (percdamp {percdamp}); used {lam:.3g} after {attempt} "
                    "retr" + ("y" if attempt == 1 else "ies"), DampingWarning, stacklevel=2)
            return InverseFactor(upper, dead, lam, damped)
        lam = max(10.0 * lam, eps * mean_diag)
    raise HessianError(f"the layer Hessian (d = {h.shape[0]}) is not positive definite even "
                       f"with damping {lam / 10:.3g} ({max_retries} retries from percdamp "
                       f"{percdamp}); raise percdamp or check the calibration inputs")


class LayerHessian:
    """Running mean ``H = (2/n)·Σᵢ xᵢxᵢᵀ`` over the calibration inputs of one layer.

    ``layer`` is an ``nn.Linear``, an ``nn.Conv2d`` (groups = 1) or a transformers-style
    ``Conv1D``; an int d builds a bare accumulator for ``[.., d]`` input rows. ``add_batch`` takes
    the layer's forward input as a forward pre-hook sees it. Batches of different sizes are
    weighted by their number of input vectors: after batches of k₁, k₂, … vectors H equals the
    dense ``2XXᵀ/n`` over all of them (n = Σkᵢ), whatever the split. Accumulation is in
    ``dtype`` (float32 by default, as the reference; float64 on request).
    """

    def __init__(self, layer: nn.Module | int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if isinstance(layer, int):
            self.layer: nn.Module | None = None
            columns = layer
        else:
            self.layer = layer
            kind = _kind(layer)
            w = layer.weight
            columns = w.shape[0] if kind == "conv1d" else w[0].numel()
            device = device if device is not None else w.device
        self.columns = columns
        self.dtype = dtype
        self.hessian = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.num_samples = 0

    def add_batch(self, inp: Tensor) -> None:
        """Accumulate one forward input of the layer (or ``[..., d]`` rows for a bare one)."""
        if self.layer is None:
            rows = inp.reshape(-1, self.columns)
        else:
            rows = layer_inputs(self.layer, inp)
        self.add_rows(rows)

    @torch.no_grad()
    def add_rows(self, rows: Tensor) -> None:
        """Accumulate ``[k, d]`` input vectors: ``H ← (n/(n+k))·H + (2/(n+k))·Σ xxᵀ``."""
        k = rows.shape[0]
        if k == 0:
            return
        total = self.num_samples + k
        self.hessian.mul_(self.num_samples / total)
        x = rows.to(device=self.hessian.device, dtype=self.dtype) * math.sqrt(2.0 / total)
        self.hessian.addmm_(x.t(), x)
        self.num_samples = total

    def column_norms(self) -> Tensor:
        """‖X_j‖₂ over all inputs seen, from the diagonal: ``sqrt(n·H_jj/2)`` (WANDA's norms)."""
        return (self.hessian.diagonal() * (self.num_samples / 2.0)).clamp_min(0).sqrt()

    def factor(self, *, percdamp: float = 0.01, max_retries: int = 8) -> InverseFactor:
        """:func:`inverse_factor` of the accumulated H (H itself is left untouched)."""
        if self.num_samples == 0:
            raise HessianError("no calibration inputs were added to this LayerHessian")
        return inverse_factor(self.hessian, percdamp=percdamp, max_retries=max_retries)
