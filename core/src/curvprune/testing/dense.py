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

import attrs
import torch
from torch import Tensor

from curvprune.distributed import all_reduce_sum_
from curvprune.errors import NumericalError
from curvprune.interfaces import CurvatureEstimator, EstimatorConfig
from curvprune.layout import BlockLayout

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


# --------------------------------------------------------------------------------------------
# The exact estimator
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class DenseConfig(EstimatorConfig):
    """Options of the ``dense`` estimator: those of :class:`curvprune.EstimatorConfig`.

    ``block_size`` None (the default) keeps one block over all selected weights: the exact
    damped empirical Fisher, d² numbers. Meant for small d (tests, ground truth, tiny models).
    """


class DenseEstimator(CurvatureEstimator):
    """The exact damped empirical-Fisher inverse, blockwise, by batched Cholesky.

    Accumulates the Gram matrix Σᵢ gᵢgᵢᵀ of each diagonal block as one padded
    ``[n_blocks, W, W]`` tensor (via :meth:`curvprune.BlockLayout.pack`). On the first query
    after an update it forms F_b = λ·I + G_b/m, factors F_b = L_bL_bᵀ and keeps
    F_b⁻¹ = L_b⁻ᵀL_b⁻¹ (triangular solves and a GEMM, robust to thread contention in batched
    LAPACK); updates invalidate that cache. Padding slots have G = 0, so they hold λ on the
    diagonal of F_b and decouple from the real coordinates.

    Memory: 2·n_blocks·W² numbers (Gram and inverse), W the padded block width.

    Under torch.distributed it sums (``reduction = "sum"``): each rank accumulates the Gram
    blocks of its own gradients and :meth:`all_reduce` adds them up.
    """

    config: DenseConfig
    reduction = "sum"

    def __init__(self, config: DenseConfig | None = None) -> None:
        super().__init__(config or DenseConfig())
        self._blocks: BlockLayout | None = None
        self._gram: Tensor | None = None
        self._inverse: Tensor | None = None
        self._m = 0

    # -- state --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """m: gradients accumulated since :meth:`setup`."""
        return self._m

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """Bytes of the padded Gram blocks and their inverses: 2·n_blocks·W²·itemsize."""
        blocks = BlockLayout.build(sizes, config.block_size)
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        return 2 * blocks.n_blocks * blocks.width**2 * itemsize

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        """num_grads·Σ W² for the Gram updates plus n_blocks·W³ for the factorizations."""
        blocks = BlockLayout.build(sizes, config.block_size)
        return float(
            2 * config.num_grads * blocks.n_blocks * blocks.width**2
            + 2 * blocks.n_blocks * blocks.width**3
        )

    def _setup(self) -> None:
        self._blocks = BlockLayout.build(self.sizes, self.config.block_size)
        n, w = self._blocks.n_blocks, self._blocks.width
        self._gram = torch.zeros(n, w, w, device=self.device, dtype=self.dtype)
        self._inverse = None
        self._m = 0

    def _update(self, grads: Tensor) -> None:
        assert self._blocks is not None and self._gram is not None
        packed = self._blocks.pack(grads).transpose(0, 1)  # [n_blocks, k, W]
        self._gram.baddbmm_(packed.mT, packed)  # G_b += Σᵢ g_{i,b} g_{i,b}ᵀ
        self._m += grads.shape[0]
        self._inverse = None

    def _all_reduce(self) -> None:
        assert self._gram is not None
        all_reduce_sum_(self._gram)
        count = torch.tensor([self._m], dtype=torch.int64, device=self.device)
        self._m = int(all_reduce_sum_(count))
        self._inverse = None

    # -- queries ------------------------------------------------------------------------------
    def block_inverses(self) -> Tensor:
        """F_b⁻¹ for every block, ``[n_blocks, W, W]`` (padding rows/columns hold 1/λ·I)."""
        if self._inverse is None:
            if self._gram is None:
                raise RuntimeError("DenseEstimator: call setup(sizes) before querying")
            n, w = self._gram.shape[:2]
            eye = torch.eye(w, device=self.device, dtype=self.dtype)
            fisher = self._gram / max(self._m, 1) + self.config.damping * eye
            chol, info = torch.linalg.cholesky_ex(fisher)
            if bool(info.any()):
                raise NumericalError(
                    f"dense estimator: the damped Fisher of block {int(info.nonzero()[0])} is not "
                    "positive definite (non-finite gradients?); check the gradients or raise "
                    "damping"
                )
            chol_inv = torch.linalg.solve_triangular(chol, eye.expand(n, w, w), upper=False)
            inverse = chol_inv.mT @ chol_inv
            # A blocked GEMM may sum (i, j) and (j, i) in different orders; averaging with the
            # transpose makes the ground truth exactly symmetric (float addition commutes).
            self._inverse = 0.5 * (inverse + inverse.mT)
        return self._inverse

    def _ihvp(self, v: Tensor) -> Tensor:
        assert self._blocks is not None
        packed = self._blocks.pack(v).transpose(0, 1)  # [n_blocks, n, W]
        out = packed @ self.block_inverses()  # F_b⁻¹ is symmetric: (F_b⁻¹ v_b)ᵀ = v_bᵀ F_b⁻¹
        return self._blocks.unpack(out.transpose(0, 1))

    def _inverse_diagonal(self) -> Tensor:
        assert self._blocks is not None
        return self._blocks.unpack(self.block_inverses().diagonal(dim1=-2, dim2=-1))

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """Entries of F⁻¹ among each row's indices, gathered from the block inverses.

        Args:
            idx: long ``[n, k]``, each row's valid entries in one block; ``-1`` pads.

        Returns:
            ``[n, k, k]``; rows and columns of padding hold the identity.

        Raises:
            ValueError: a row mixes indices of two blocks.
        """
        assert self._blocks is not None
        valid = idx >= 0
        block_of = self._blocks.block_of(self.device)
        block = torch.where(valid, block_of[idx.clamp_min(0)], -1)
        row_block = block.max(dim=1).values  # the block of each row (-1: all padding)
        if bool((valid & (block != row_block[:, None])).any()):
            raise ValueError(
                "inverse_columns: each row of idx must hold indices of one block "
                f"(block_size={self.config.block_size}); got rows spanning blocks"
            )
        row_block = row_block.clamp_min(0)
        pos = torch.where(valid, idx - self._blocks.starts.to(self.device)[row_block, None], 0)
        out = self.block_inverses()[row_block[:, None, None], pos[:, :, None], pos[:, None, :]]
        k = idx.shape[1]
        eye = torch.eye(k, device=self.device, dtype=self.dtype)
        return torch.where(valid[:, :, None] & valid[:, None, :], out, eye)
