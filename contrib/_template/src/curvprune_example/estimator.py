"""The isotropic (scaled-identity) Fisher: the smallest real curvature estimator.

It replaces the damped empirical Fisher by the multiple of the identity with the same trace,

    F = (λ + (1/(m·d))·Σᵢ ‖gᵢ‖²)·I = (tr(λ·I + (1/m)·Σᵢ gᵢgᵢᵀ) / d)·I,

so F⁻¹v = v / s with one scalar s. Under the core ``obs`` scorer it ranks weights by magnitude
(ρ_q = w_q²·s/2) while still predicting a loss change in loss units.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from curvprune import BlockLayout, CurvatureEstimator, EstimatorConfig

__all__ = ["IsotropicConfig", "IsotropicEstimator"]


@attrs.frozen(kw_only=True)
class IsotropicConfig(EstimatorConfig):
    """Options of the ``isotropic`` estimator: the shared ones (``damping``, ``dtype``, ...).

    Add your estimator's own options here as validated attrs fields, e.g.
    ``rank: int = attrs.field(default=8, validator=attrs.validators.ge(1))``.
    """


class IsotropicEstimator(CurvatureEstimator):
    """F = s·I with s = λ + mean squared gradient entry; O(1) state."""

    config: IsotropicConfig

    def __init__(self, config: IsotropicConfig | None = None) -> None:
        super().__init__(config or IsotropicConfig())
        self._sum_squares: Tensor | None = None
        self._m = 0

    @property
    def num_samples(self) -> int:
        """m: gradients accumulated since :meth:`setup`."""
        return self._m

    @property
    def block_layout(self) -> BlockLayout:
        """Blocks of one weight: the isotropic F⁻¹ couples no two weights."""
        return BlockLayout.build(self.sizes, 1)

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """One accumulated scalar at the configured dtype."""
        return torch.empty((), dtype=config.torch_dtype).element_size()

    def _setup(self) -> None:
        self._sum_squares = torch.zeros((), device=self.device, dtype=self.dtype)
        self._m = 0

    def _update(self, grads: Tensor) -> None:
        assert self._sum_squares is not None
        self._sum_squares.add_(grads.square().sum())
        self._m += grads.shape[0]

    def scale(self) -> Tensor:
        """S = λ + (1/(m·d))·Σᵢ ‖gᵢ‖², 0-dim (λ before any gradient)."""
        assert self._sum_squares is not None, "call setup(sizes) first"
        return self._sum_squares / (max(self._m, 1) * self.d) + self.config.damping

    def _ihvp(self, v: Tensor) -> Tensor:
        return v / self.scale()

    def _inverse_diagonal(self) -> Tensor:
        return self.scale().reciprocal().expand(self.d).clone()

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """Entries of F⁻¹ = I/s among each row's indices: 1/s on the diagonal, padding 1."""
        idx = idx.to(self.device)
        ones = torch.ones(idx.shape, device=self.device, dtype=self.dtype)
        return torch.diag_embed(torch.where(idx >= 0, ones / self.scale(), ones))
