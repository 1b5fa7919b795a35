"""Configs of the ``woodfisher`` estimator and the ``woodtaylor`` scorer.

Frozen, keyword-only attrs classes; the core's converter structures ``[estimator]`` and
``[scorer]`` tables into them and turns validator errors into ``<message> @ <path>`` lines.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from curvprune import EstimatorConfig

__all__ = ["Algorithm", "WoodFisherConfig", "WoodTaylorConfig"]

Algorithm = Literal["auto", "woodbury", "gram"]


def _optional_at_least_one(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _at_least_one(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen(kw_only=True)
class WoodFisherConfig(EstimatorConfig):
    """Options of the ``woodfisher`` estimator (Singh & Alistarh, NeurIPS 2020).

    The estimate is ``F = damping·I + (1/m)·Σᵢ gᵢgᵢᵀ``, block diagonal with ``block_size``.
    Inherited fields keep their meaning (see :class:`curvprune.EstimatorConfig`); the defaults
    below are the ones that differ, or that the method's reference code fixes.

    Attributes:
        damping: λ, absolute (never divided by m); inherited, default 1e-5: every shipped
            WoodFisher script overrides its CLI default (1e-3) to 1e-5, and M-FAC uses 1e-5.
        block_size: B, the width of the diagonal blocks. Default 128 (M-FAC's pruner default):
            memory is d·B floats, so 128 fits a ResNet-50 (25 M weights, 13 GB float32), and with
            ``num_grads`` ≫ B each block's Gram part has full rank. The reference's ResNet-20
            runs use whole layers as blocks (``block_size`` larger than any layer).
        num_grads: m. Default 1024: the reference's ResNet-20 one-shot runs use m = 1000
            per-sample gradients; 1024 = 8·B samples per 128-wide block, enough that the
            empirical Fisher is not dominated by the damping, at a cost linear in m.
        algorithm: ``"woodbury"`` (the paper's rank-1 recursion, streamed), ``"gram"`` (block
            Gram matrices, one batched Cholesky), or ``"auto"``: ``woodbury`` when
            ``num_grads · 8 <= B`` (few gradients: m rank-1 updates cost less than one
            factorisation), else ``gram`` (measured 9-30× faster than ``woodbury`` at
            m = 256-1024, B = 128 on a 2-core CPU; docs/benchmarks.md). Both give the same
            inverse.

    """

    block_size: int | None = attrs.field(default=128, validator=_optional_at_least_one)
    num_grads: int = attrs.field(default=1024, validator=_at_least_one)
    algorithm: Algorithm = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "woodbury", "gram"))
    )


@attrs.frozen(kw_only=True)
class WoodTaylorConfig:
    """Options of the ``woodtaylor`` scorer (WoodFisher's first-order variant).

    Attributes:
        update: apply the compensating weight update (false: rank by saliency only).
        joint: the exact constrained minimiser for all weights pruned in a block, instead of
            the sum of single-weight updates.
        max_joint_group: the most weights pruned in one block that the joint solve accepts (it
            factorises a matrix of that size per block).

    """

    update: bool = True
    joint: bool = False
    max_joint_group: int = attrs.field(default=2048, validator=_at_least_one)
