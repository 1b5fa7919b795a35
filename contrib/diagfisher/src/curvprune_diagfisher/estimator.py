"""The diagonal empirical Fisher: Optimal Brain Damage's curvature (LeCun, Denker & Solla, 1990).

OBD keeps only the diagonal of the Hessian. With the empirical Fisher in its place and
curvprune's damping convention, the estimate is

    F = diag(λ + (1/m)·Σᵢ gᵢ²)                      (gᵢ² elementwise)

so every inverse query is elementwise: F⁻¹v = v / diag(F) and [F⁻¹]_qq = 1 / F_qq. Under the core
``obs`` scorer the saliency ρ_q = w_q² / (2[F⁻¹]_qq) = w_q²·F_qq / 2 is OBD's (Eq. 6 of the
paper, with F_qq standing for h_qq) up to the damping, and the compensating update
δw = −F⁻¹u only moves the pruned weights themselves (to zero): OBD has no compensation.

Its blocks are single weights (:attr:`DiagFisherEstimator.block_layout`), so joint OBS updates
reduce to single-weight ones.

Under torch.distributed the estimate is additive (``reduction = "sum"``): each rank accumulates
Σ gᵢ² over its own gradients and one all-reduce of d numbers (and of m) combines them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from curvprune import BlockLayout, CurvatureEstimator, EstimatorConfig, ParamLayout, distributed

__all__ = ["DiagFisherConfig", "DiagFisherEstimator"]


def _none_or_one(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value not in (None, 1):
        raise ValueError(
            f"{attribute.name} must be None or 1 (the diagonal Fisher has blocks of one weight), "
            f"got {value}"
        )


@attrs.frozen(kw_only=True)
class DiagFisherConfig(EstimatorConfig):
    """Options of the ``diagfisher`` estimator.

    Attributes:
        block_size: not meaningful for a diagonal estimate (its blocks are single weights);
            accepted as None or 1 so that shared configs validate.
    """

    block_size: int | None = attrs.field(default=None, validator=_none_or_one)


class DiagFisherEstimator(CurvatureEstimator):
    """F = diag(λ + (1/m)·Σᵢ gᵢ²): O(d) memory, O(k·d) per update, elementwise queries."""

    config: DiagFisherConfig
    reduction = "sum"

    def __init__(self, config: DiagFisherConfig | None = None) -> None:
        super().__init__(config or DiagFisherConfig())
        self._squares: Tensor | None = None
        self._m = 0

    @property
    def num_samples(self) -> int:
        """m: gradients accumulated since :meth:`setup`."""
        return self._m

    @property
    def block_layout(self) -> BlockLayout:
        """Blocks of one weight: F⁻¹ couples no two weights."""
        return BlockLayout.build(self.sizes, 1)

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """Peak bytes: the running Σᵢ gᵢ² and, while a query runs, the damped diagonal and the
        answer, three d-vectors at the configured dtype."""
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        return 3 * int(sum(sizes)) * itemsize

    @classmethod
    def plan_held_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """The running Σᵢ gᵢ², one d-vector, held while gradients stream in."""
        return layout.d * torch.empty((), dtype=config.torch_dtype).element_size()

    @classmethod
    def plan_update_bytes(cls, rows: int, layout: ParamLayout, config: EstimatorConfig) -> int:
        """One d-vector: Σᵢ gᵢ² of a chunk comes from a norm reduction, not a copy of the rows."""
        return layout.d * torch.empty((), dtype=config.torch_dtype).element_size()

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        """2·num_grads·d: one square and one add per gradient entry."""
        return 2.0 * config.num_grads * float(sum(sizes))

    def _setup(self) -> None:
        self._squares = torch.zeros(self.d, device=self.device, dtype=self.dtype)
        self._m = 0

    def _update(self, grads: Tensor) -> None:
        assert self._squares is not None
        # Σᵢ gᵢ² per coordinate as a norm reduction: no [k, d] temporary of squares (which was
        # k times the state: 10× memory_bytes at 8-row chunks, docs/benchmarks.md plan accuracy)
        self._squares.add_(torch.linalg.vector_norm(grads, dim=0).square_())
        self._m += grads.shape[0]

    def _all_reduce(self) -> None:
        """Sum Σᵢ gᵢ² and m over the ranks."""
        assert self._squares is not None
        distributed.all_reduce_sum_(self._squares)
        count = torch.tensor([self._m], dtype=torch.int64, device=self.device)
        self._m = int(distributed.all_reduce_sum_(count))

    def fisher_diagonal(self) -> Tensor:
        """diag(F) = λ + (1/m)·Σᵢ gᵢ², ``[d]`` (λ alone before any gradient)."""
        assert self._squares is not None, "call setup(sizes) first"
        return self._squares / max(self._m, 1) + self.config.damping

    def _ihvp(self, v: Tensor) -> Tensor:
        return v / self.fisher_diagonal()

    def _inverse_diagonal(self) -> Tensor:
        return self.fisher_diagonal().reciprocal()

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """Entries of the diagonal F⁻¹ among each row's indices: 1/F_qq on the diagonal, else 0.

        Args:
            idx: long ``[n, k]``, distinct indices per row, ``-1`` padding.

        Returns:
            ``[n, k, k]``, diagonal; padding slots hold 1 (the identity).
        """
        idx = idx.to(self.device)
        inverse = self._inverse_diagonal()
        diag = torch.where(idx >= 0, inverse[idx.clamp_min(0)], torch.ones((), dtype=self.dtype,
                                                                           device=self.device))
        return torch.diag_embed(diag)
