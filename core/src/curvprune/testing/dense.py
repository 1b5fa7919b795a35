"""Dense float64 ground truths, and the exact ``dense`` curvature estimator.

Everything here is the obvious O(d²)-memory computation, written for clarity on small sizes so
that faster estimators can be checked against it:

* :func:`damped_fisher`: F = λ·I + (1/m)·Σᵢ gᵢgᵢᵀ restricted to the block-diagonal structure of
  :class:`curvprune.BlockLayout` (blocks of ``block_size`` consecutive weights of one parameter;
  None: one block). This is the convention of every curvprune estimator (WoodFisher, Singh &
  Alistarh 2020, Eq. 2 with damping; M-FAC, Frantar et al. 2021, Sec. 3).
* :func:`dense_inverse`: F⁻¹ by Cholesky.
* :func:`quadratic_loss_change`: ½ δᵀFδ, the loss change the local quadratic model predicts
  (OBS, Hassibi & Stork 1993; WoodFisher Eq. 3).
* :func:`allclose_report` / :func:`assert_allclose`: comparisons that say how and where two
  tensors differ.
* :class:`DenseEstimator`: the same F⁻¹ as a :class:`curvprune.CurvatureEstimator`, registered as
  ``dense`` (``curvprune.create("estimator", "dense", damping=1e-3)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvprune.builtin.dense import DenseConfig, DenseEstimator
from curvprune.tensors.layout import BlockLayout

__all__ = [
    "DenseConfig",
    "DenseEstimator",
    "allclose_report",
    "assert_allclose",
    "block_mask",
    "condition_number",
    "damped_fisher",
    "dense_inverse",
    "quadratic_loss_change",
]


# --------------------------------------------------------------------------------------------
# Ground-truth functions
# --------------------------------------------------------------------------------------------
def block_mask(sizes: Sequence[int], block_size: int | None) -> Tensor:
    """Boolean ``[d, d]``: True where coordinates i and j lie in the same diagonal block.

    Args:
        sizes: number of weights of each parameter, in layout order.
        block_size: block width B (blocks never cross a parameter); None: one block.
    """
    block_of = BlockLayout.build(sizes, block_size).block_of()
    return block_of[:, None] == block_of[None, :]


def damped_fisher(
    grads: Tensor, sizes: Sequence[int], block_size: int | None, damping: float
) -> Tensor:
    """The damped empirical Fisher restricted to its diagonal blocks, in float64.

    F = λ·I + (1/m)·Σᵢ gᵢgᵢᵀ, with every entry outside the blocks of
    ``BlockLayout.build(sizes, block_size)`` set to zero. With m = 0 gradients, F = λ·I.

    Args:
        grads: ``[m, d]`` gradient rows gᵢ.
        sizes: number of weights of each parameter (d = sum).
        block_size: block width B; None means one block over all weights.
        damping: λ > 0.

    Returns:
        F, float64 ``[d, d]``, on the device of ``grads``.
    """
    g = grads.to(torch.float64)
    m, d = g.shape
    if d != sum(sizes):
        raise ValueError(f"grads must have shape [m, {sum(sizes)}], got {tuple(grads.shape)}")
    gram = g.mT @ g / max(m, 1)
    gram = gram * block_mask(sizes, block_size).to(g.device)
    return gram + damping * torch.eye(d, dtype=torch.float64, device=g.device)


def dense_inverse(
    grads: Tensor, sizes: Sequence[int], block_size: int | None, damping: float
) -> Tensor:
    """F⁻¹ of :func:`damped_fisher`, float64 ``[d, d]``, by Cholesky (F is SPD since λ > 0)."""
    fisher = damped_fisher(grads, sizes, block_size, damping)
    return torch.cholesky_inverse(torch.linalg.cholesky(fisher))


def quadratic_loss_change(fisher: Tensor, delta: Tensor) -> Tensor:
    """½ δᵀFδ: the loss change of the step δ under the local quadratic model (0-dim, float64)."""
    delta = delta.to(torch.float64)
    return 0.5 * delta @ (fisher.to(torch.float64) @ delta)


def condition_number(matrix: Tensor) -> float:
    """The 2-norm condition number of a symmetric positive definite matrix (float64)."""
    eig = torch.linalg.eigvalsh(matrix.to(torch.float64))
    return float(eig[-1] / eig[0])


def allclose_report(
    actual: Tensor, expected: Tensor, *, rtol: float, atol: float = 0.0, what: str = "tensor"
) -> str | None:
    """Compare elementwise as ``|a − e| <= atol + rtol·|e|``; explain the worst offender.

    Both tensors are compared in float64 after broadcasting-free shape checks.

    Returns:
        None when every element is within tolerance; otherwise one line naming ``what``, how many
        elements fail, the worst index with its two values, and the tolerances.
    """
    if actual.shape != expected.shape:
        return f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        bad = tuple(int(i) for i in torch.nonzero(~torch.isfinite(a))[0])
        return f"{what}: non-finite value {a[bad].item()} at index {bad}"
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    failing = err > allowed
    if not failing.any():
        return None
    excess = torch.where(failing, err / allowed.clamp_min(torch.finfo(torch.float64).tiny), 0)
    flat = int(excess.reshape(-1).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    rel = err[where] / e[where].abs() if e[where] != 0 else float("inf")
    return (
        f"{what}: {int(failing.sum())}/{a.numel()} elements out of tolerance; worst at "
        f"{where}: got {a[where].item():.17g}, expected {e[where].item():.17g} "
        f"(abs err {err[where].item():.3g}, rel err {float(rel):.3g}; rtol={rtol:.3g}, "
        f"atol={atol:.3g}); max abs err {err.max().item():.3g}"
    )


def assert_allclose(
    actual: Tensor, expected: Tensor, *, rtol: float, atol: float = 0.0, what: str = "tensor"
) -> None:
    """Raise ``AssertionError`` with :func:`allclose_report`'s explanation if not close."""
    report = allclose_report(actual, expected, rtol=rtol, atol=atol, what=what)
    if report is not None:
        raise AssertionError(report)
