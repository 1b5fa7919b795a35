"""Options of the ``kfac`` estimator."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from curvprune import EstimatorConfig

__all__ = ["KFACConfig"]


def _no_block_size(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None:
        raise ValueError(
            f"{attribute.name} must be unset for kfac: its blocks are whole parameters "
            f"(one Kronecker product per layer), got {value}"
        )


def _one(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if value != 1:
        raise ValueError(
            f"{attribute.name} must be 1 for kfac: its factors average per-sample layer inputs "
            f"and output gradients, got {value}"
        )


@attrs.frozen(kw_only=True)
class KFACConfig(EstimatorConfig):
    """Options of the ``kfac`` estimator (the shared ones are :class:`curvprune.EstimatorConfig`'s).

    Attributes:
        damping: λ. With ``damping_split = "exact"``, F = λ·I + A⊗G per layer: added to the
            Kronecker product (curvlinops' ``use_exact_damping = True``; its default damps the
            factors, (A + λI)⊗(G + λI), which is a different matrix).
        damping_split: ``"exact"`` (default; the core's F = λI + ... convention) or ``"pi"``:
            Martens & Grosse's (2015, Sec. 6.3) π-corrected factor damping, as WoodFisher's
            K-FAC baseline (``inv_covs``, ``use_pi = True``) does: (A + π√λ·I)⊗(G + √λ/π·I),
            π = sqrt((tr A/dim A)/(tr G/dim G)) per layer.
        block_size: must stay unset; the blocks are the selected parameters.
        num_grads: m, the number of samples the factors average over.
        fisher_mini_batch: must be 1 (the factors are per-sample averages by construction).
        fisher: ``"empirical"`` (labels from the data; curvlinops ``"empirical"``), ``"true"``
            (labels sampled from the model's predictive distribution, ``mc_samples`` per input;
            curvlinops ``"mc"``) or ``"type-2"`` (the exact expectation over that distribution
            through the loss Hessian's square root, one backward pass per output; curvlinops
            ``"type-2"``, the generalized Gauss-Newton).
        mc_samples: labels drawn per input for ``fisher = "true"`` (must be 1 otherwise).
        kfac_approx: ``"expand"`` or ``"reduce"``, how Conv2d weight sharing is folded into
            the factors (Eschenhagen et al., NeurIPS 2023); ``"expand"`` is Grosse & Martens'
            KFC (ICML 2016). No effect on Linear layers with 2-d inputs.
    """

    block_size: int | None = attrs.field(default=None, validator=_no_block_size)
    fisher_mini_batch: int = attrs.field(default=1, validator=_one)
    fisher: Literal["empirical", "true", "type-2"] = attrs.field(  # type: ignore[assignment]
        default="empirical", validator=attrs.validators.in_(("empirical", "true", "type-2"))
    )
    mc_samples: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    kfac_approx: Literal["expand", "reduce"] = attrs.field(
        default="expand", validator=attrs.validators.in_(("expand", "reduce"))
    )
    damping_split: Literal["exact", "pi"] = attrs.field(
        default="exact", validator=attrs.validators.in_(("exact", "pi"))
    )

    def __attrs_post_init__(self) -> None:
        if self.mc_samples != 1 and self.fisher != "true":
            raise ValueError(
                f"mc_samples = {self.mc_samples} needs fisher = 'true' (sampled labels), "
                f"got fisher = {self.fisher!r}"
            )
