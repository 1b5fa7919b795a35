"""Configs of the ``sosp-h`` and ``sosp-i`` scorers.

Frozen, keyword-only attrs classes; the core's converter structures the ``[scorer]`` table into
them and turns validator errors into ``<message> @ scorer.<field>`` lines.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

__all__ = ["LossKind", "SospHConfig", "SospIConfig"]

#: How the loss's curvature in the model outputs (Λ in G = (1/N)·Σ JᵀΛJ) is obtained.
LossKind = Literal["auto", "cross_entropy", "mse", "autograd"]
_LOSSES = ("auto", "cross_entropy", "mse", "autograd")


def _fraction(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen(kw_only=True)
class _SospConfig:
    """Options both SOSP scorers share.

    Attributes:
        num_samples: N, the samples the gradient and the Gauss-Newton matrix average over,
            taken in order from the pipeline's data (fewer if the data ends first). Default
            1024: the memo's CPU recommendation is 1–5k images; the split-half rank
            correlation check warns when N is too small for a stable ranking.
        loss: the loss whose curvature Λ = ∂²ℓ/∂f² enters the Gauss-Newton matrix.
            ``"auto"`` recognises cross entropy (Λ = diag(p) − ppᵀ) and mean squared error
            (Λ = (2/C)·I) by evaluating the pipeline's loss on the first batch, and raises for
            anything else; ``"cross_entropy"`` / ``"mse"`` force the closed form;
            ``"autograd"`` takes the exact per-sample Hessian of the loss in the outputs
            (any per-sample loss averaged over the batch).
        min_rank_correlation: warn when the Spearman correlation of the scores computed on
            two halves of the samples (even and odd batches) is below this (0 disables).
        bottleneck_threshold: a channel group that keeps at least this fraction of its
            structures after pruning is reported as an architectural bottleneck.
        width_multiplier: the width factor suggested for a bottleneck (the paper widens
            bottlenecks by 2).

    """

    num_samples: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    loss: LossKind = attrs.field(default="auto", validator=attrs.validators.in_(_LOSSES))
    min_rank_correlation: float = attrs.field(default=0.8, converter=float, validator=_fraction)
    bottleneck_threshold: float = attrs.field(default=0.9, converter=float, validator=_fraction)
    width_multiplier: float = attrs.field(default=2.0, converter=float, validator=_positive)


@attrs.frozen(kw_only=True)
class SospHConfig(_SospConfig):
    """Options of the ``sosp-h`` scorer (SOSP-H: saliencies from one Hessian-vector product).

    Attributes:
        absolute: rank by |λ_s| (a sensitivity: the size of the modelled loss change);
            false ranks by the signed λ_s.
        hessian: ``"exact"`` (default): λ_s = −g_s + ½·(H𝟙)_s with the exact gate-space
            Hessian H = ∂²L/∂m² by double backward: the paper's abstract describes SOSP-H as
            Hessian-vector products that account for the whole Hessian; ``"ggn"``: the Gauss-Newton
            matrix G instead (drops the residual term; the plugin's earlier behaviour, one
            forward-mode pass, positive semi-definite for convex losses).

    """

    absolute: bool = True
    hessian: Literal["exact", "ggn"] = attrs.field(
        default="exact", validator=attrs.validators.in_(("exact", "ggn"))
    )


@attrs.frozen(kw_only=True)
class SospIConfig(_SospConfig):
    """Options of the ``sosp-i`` scorer (SOSP-I: explicit S×S matrix, greedy selection).

    Attributes:
        jacobian: how the per-sample gate Jacobians ∂f/∂m (C×S) are formed: ``"reverse"``
            (C vector-Jacobian products per sample), ``"forward"`` (S Jacobian-vector
            products per batch), or ``"auto"``: reverse when C <= S, else forward.
        dtype: accumulation dtype of the S×S matrix (its memory is S²·itemsize).
        max_jacobian_elements: the per-sample Jacobians of one chunk hold at most this many
            numbers (B·C·S); batches are split to respect it.
        selection: how Q = G and q = −g become a pruning set. ``"greedy"`` (default): add
            the structure with the smallest exact increase of the quadratic model, one at a
            time (interactions over the structures actually removed). The others score each
            structure and leave the ranking to the mask: ``"upper_bound"``:
            |qₛ + ½Qₛₛ| + ½·Σ_{s'≠s alive} |Q_{ss'}| (sums to an upper bound of |ΔL(M)| over
            any M); ``"all"``: |qₛ + ½(Q𝟙)ₛ| (SOSP-H's form with the GGN); ``"diagonal"``:
            |qₛ + ½Qₛₛ| (no correlations: the diagonal-only baseline).

    """

    jacobian: Literal["auto", "reverse", "forward"] = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "reverse", "forward"))
    )
    dtype: Literal["float32", "float64"] = attrs.field(
        default="float32", validator=attrs.validators.in_(("float32", "float64"))
    )
    max_jacobian_elements: int = attrs.field(default=1 << 22, validator=attrs.validators.ge(1))
    selection: Literal["greedy", "upper_bound", "all", "diagonal"] = attrs.field(
        default="greedy",
        validator=attrs.validators.in_(("greedy", "upper_bound", "all", "diagonal")),
    )
