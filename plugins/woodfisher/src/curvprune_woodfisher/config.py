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
Normalize = Literal["reference", "first_order"]
Ranking = Literal["exact", "reference"]
MeanGradient = Literal["labels", "estimator"]


def _optional_at_least_one(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _non_negative(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


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
        first_order: α, the weight of the linear term (ḡ → αḡ); 0 gives ``obs``. Default 1,
            the paper's model.
        normalize_update: bound the update (default false: the exact method, the paper's
            model; the reference's ``--normalize-update`` is off by default too).
        normalize: how ``normalize_update`` bounds it. ``"reference"`` (the reference's
            ``_get_weight_update``): the whole update of parameter l, OBS part and −u_l,
            δ_l ← δ_l / (‖δ_l‖/(r‖w_l‖) + 1e-9) when ‖δ_l‖ > ‖w_l‖; scores are unchanged, the
            pruned weights are zeroed afterwards by the pipeline, and no loss change is
            predicted (the quadratic model's prediction is for the unscaled update).
            ``"first_order"`` (curvprune's extension): the linear term is clipped per parameter
            to a trust radius r‖w_l‖ before scoring, so scores and update are exact WoodTaylor
            on the clipped model (see :mod:`curvprune_woodfisher.woodtaylor`).
        normalize_update_mult: r. Default 1, the reference's ``--normalize-update-mult``. With
            ``"first_order"``, 0.003 was the best on the digits CNN one-shot at 50-90 % (3
            trainings): within 2 of 450 test samples of ``obs``; 0.01 lost up to 0.4 points,
            0.03 up to 2, 0.1 up to 38 and 1 89.
        ranking: ``"exact"`` (default): ρ_q = ½(w_q − u_q)²/[F⁻¹]_qq, the model's change up to
            one global constant. ``"reference"`` (``woodtaylorblock._get_param_stat``): per
            parameter l, ρ_q − ½ḡ_lᵀu_l, minus its minimum over l, plus 1e-10, times the mask;
            the global threshold then compares layers shifted by different amounts.
        mean_gradient: where ḡ comes from. ``"labels"`` (default): the data's labels, also
            when the estimator samples labels (``fisher = "true"``), for which the mean of the
            fed gradients estimates E_y~p[∇ log p] = 0, not the loss gradient; the scorer then
            computes it from the same number of samples (one extra backward pass over them).
            ``"estimator"``: the mean of the gradients fed to the estimator (the reference's
            ``avg_grads``, sampled labels with ``--true-fisher``).

    """

    update: bool = True
    joint: bool = False
    max_joint_group: int = attrs.field(default=2048, validator=_at_least_one)
    first_order: float = attrs.field(default=1.0, converter=float, validator=_non_negative)
    normalize_update: bool = False
    normalize: Normalize = attrs.field(
        default="reference", validator=attrs.validators.in_(("reference", "first_order"))
    )
    normalize_update_mult: float = attrs.field(default=1.0, converter=float, validator=_positive)
    ranking: Ranking = attrs.field(
        default="exact", validator=attrs.validators.in_(("exact", "reference"))
    )
    mean_gradient: MeanGradient = attrs.field(
        default="labels", validator=attrs.validators.in_(("labels", "estimator"))
    )
