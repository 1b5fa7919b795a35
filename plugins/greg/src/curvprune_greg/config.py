"""Config of the ``greg`` schedule (Wang, Qin, Zhang & Fu, "Neural Pruning via Growing
Regularization", ICLR 2021).

A frozen, keyword-only attrs class; the core's converter structures a ``[schedule]`` table into
it and turns validator errors into ``<message> @ schedule`` lines. Option names and defaults are
those of the reference code (``option.py``, whose defaults are its ImageNet settings), so that
its users recognise them; docs/methods/greg.md lists the reduced values used on CPU examples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import attrs

__all__ = ["GRegConfig", "Granularity", "Residual"]

#: ``filter``: output channels (dim 0); ``channel``: input channels (dim 1); ``weight``: scalars.
Granularity = Literal["filter", "channel", "weight"]
#: ``internal``: the reference's residual rule (see :class:`GRegConfig`); ``none``: no rule.
Residual = Literal["internal", "none"]


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0 or not math.isfinite(value):  # also rejects NaN and inf
        raise ValueError(f"{attribute.name} must be > 0, got {value:g}")


def _non_negative(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be >= 0, got {value:g}")


def _finite(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be finite, got {value:g}")


def _check_ratios(_: Any, attribute: attrs.Attribute, value: Mapping[str, float]) -> None:
    for selector, ratio in value.items():
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(
                f"{attribute.name} must map selectors to pruning ratios in [0, 1), got "
                f"{selector!r} = {ratio!r}"
            )
        if selector.startswith("re:"):
            try:
                re.compile(selector[3:])
            except re.error as exc:
                raise ValueError(
                    f"{attribute.name} has an invalid regex {selector!r} ({exc})"
                ) from None


@attrs.frozen(kw_only=True)
class GRegConfig:
    """Options of the ``greg`` schedule; names and defaults follow the reference code.

    Iterations are optimizer steps of the pruning phase, counted from 0. λ is the per-group L2
    penalty coefficient: the schedule adds λ ⊙ W to the gradient of each selected Conv/Linear
    weight before every optimizer step (the gradient of ½ Σ_j λ_j ‖W_j‖², memo §1.3).

    Attributes:
        variant: 1 (GReg-1: pick the groups by L1 magnitude at the start, grow their penalty) or
            2 (GReg-2: first grow a uniform penalty on every group, pick by the magnitude this
            leaves, then continue as GReg-1 with ``reg_granularity_recover`` on kept groups).
        granularity: a group is an output channel (``filter``, the reference default), an input
            channel (``channel``) or one weight (``weight``, unstructured).
        update_reg_interval: K_u, iterations between two penalty updates (reference 5; its
            CIFAR commands use 10).
        reg_granularity_prune: δλ, the increment of the pruned groups' λ per update (1e-4).
        reg_upper_limit: τ, growth stops once max λ > τ (1.0). Must be > 0.
        mag_ratio_limit: growth also stops once every pruned layer's smoothed ratio of mean
            kept to mean pruned group magnitude reaches this (1000); structured modes only, as
            in the reference.
        stabilize_reg_interval: K_s, iterations with λ frozen before removal (40000; the
            reference's CIFAR commands use 10000).
        reg_granularity_pick: δλ_pick, GReg-2's uniform increment (1e-5).
        reg_upper_limit_pick: τ_pick, GReg-2 picks once the uniform λ reaches this (1e-2).
        reg_granularity_recover: λ held on kept groups after GReg-2 picks (−1e-4, a small
            negative penalty that lets them regrow).
        ratios: per-layer pruning ratios r ∈ [0, 1) by selector: an exact parameter name
            (``"features.3.weight"``), an exact module name (``"features.3"``) or ``"re:<regex>"``
            (full match on the parameter name or its module's name). A layer no selector matches
            gets ``[prune] sparsity``. A layer of n groups loses n_p = min(⌈r·n⌉, n − 1) of them
            (the reference rule: at least one group is kept).
        residual: ``internal`` (the reference rule for residual networks: never prune the
            producers of channels coupled across a residual addition, i.e. the last conv of
            every block and the downsample/stem convs in filter mode, nor the consumers of such
            channels in channel mode) or ``none`` (every selected layer is its own; masks only).
        reg_affine: also apply each pruned filter's λ to the parameters that gate its output:
            the producer's bias and the following BatchNorm's weight and bias (``filter`` only;
            **not in the reference**, which penalises Conv/Linear weights only: memo §8.2).
            Behind a BatchNorm a filter's scale does not matter, so its weights alone may
            never get small enough for the channel to fall silent before removal.
        select_by: how GReg picks a layer's pruned filters (``filter`` only). ``filter`` (the
            reference): the lowest mean |W_j| of the filter alone. ``group``: the lowest Σ|θ|
            over every parameter removing filter j deletes (its row and bias, its BatchNorm's
            γ_j, β_j and the next layers' input columns of channel j;
            :mod:`curvprune_greg.group_select`); **not in the reference**. Needs a model
            torch.fx can trace.
        lr_prune: constant SGD learning rate of the pruning phase (1e-3) in ``curvprune run``.
        momentum: SGD momentum of the pruning phase (0.9).
        weight_decay: SGD weight decay of the pruning phase, on all parameters (the
            reference's ``--wd``, 1e-4; its CIFAR commands use 5e-4).
    """

    variant: Literal[1, 2] = attrs.field(default=1, validator=attrs.validators.in_((1, 2)))
    granularity: Granularity = attrs.field(
        default="filter", validator=attrs.validators.in_(("filter", "channel", "weight"))
    )
    update_reg_interval: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    reg_granularity_prune: float = attrs.field(default=1e-4, converter=float, validator=_positive)
    reg_upper_limit: float = attrs.field(default=1.0, converter=float, validator=_positive)
    mag_ratio_limit: float = attrs.field(default=1000.0, converter=float, validator=_positive)
    stabilize_reg_interval: int = attrs.field(default=40000, validator=attrs.validators.ge(0))
    reg_granularity_pick: float = attrs.field(default=1e-5, converter=float, validator=_positive)
    reg_upper_limit_pick: float = attrs.field(default=1e-2, converter=float, validator=_positive)
    reg_granularity_recover: float = attrs.field(default=-1e-4, converter=float, validator=_finite)
    ratios: dict[str, float] = attrs.field(
        factory=dict, converter=dict, validator=_check_ratios, hash=False
    )
    residual: Residual = attrs.field(
        default="internal", validator=attrs.validators.in_(("internal", "none"))
    )
    reg_affine: bool = attrs.field(default=False)
    select_by: Literal["filter", "group"] = attrs.field(
        default="filter", validator=attrs.validators.in_(("filter", "group"))
    )
    lr_prune: float = attrs.field(default=1e-3, converter=float, validator=_positive)
    momentum: float = attrs.field(default=0.9, converter=float, validator=_non_negative)
    weight_decay: float = attrs.field(default=1e-4, converter=float, validator=_non_negative)

    @reg_affine.validator
    def _affine_for_filters(self, attribute: attrs.Attribute, value: bool) -> None:
        if value and self.granularity != "filter":
            raise ValueError(f"reg_affine needs granularity = 'filter', got {self.granularity!r}")

    @select_by.validator
    def _group_for_filters(self, attribute: attrs.Attribute, value: str) -> None:
        if value == "group" and self.granularity != "filter":
            raise ValueError(f"select_by = 'group' needs granularity = 'filter', got "
                             f"{self.granularity!r}")

    @reg_upper_limit_pick.validator
    def _pick_below_limit(self, attribute: attrs.Attribute, value: float) -> None:
        if self.variant == 2 and value >= self.reg_upper_limit:
            raise ValueError(
                f"reg_upper_limit_pick must be below reg_upper_limit ({self.reg_upper_limit:g}) "
                f"for variant 2, got {value:g}"
            )
