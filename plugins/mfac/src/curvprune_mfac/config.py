"""Config of the ``mfac`` estimator (Frantar, Kurtic & Alistarh, NeurIPS 2021).

A frozen, keyword-only attrs class; the core's converter structures an ``[estimator]`` table
into it and turns validator errors into ``<message> @ <path>`` lines.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch

from curvprune import EstimatorConfig

__all__ = ["Algorithm", "BlockMode", "MFACConfig", "StorageDtype"]

Algorithm = Literal["static", "dynamic"]
BlockMode = Literal["alive", "fixed"]
StorageDtype = Literal["float32", "float64", "bfloat16", "float16"]
STORAGE_DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def _at_least_one(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{attribute.name} must be > 0, got {value:g}")


def _optional_at_least_one(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen(kw_only=True)
class MFACConfig(EstimatorConfig):
    """Options of the ``mfac`` estimator.

    The estimate is ``F = damping·I + (1/m)·Σᵢ gᵢgᵢᵀ`` over the m gradients held (all of them for
    ``static``, the last ``window`` for ``dynamic``), block diagonal with ``block_size``. The
    defaults are those of the reference pruner (``main_prun.py``); inherited fields keep their
    meaning (see :class:`curvprune.EstimatorConfig`).

    Attributes:
        damping: λ, absolute (never divided by m). Default 1e-5, the reference ``prundamp``.
        block_size: B. Default 128 for ``static``, the reference pruner's (``main_prun.py
            --blocksize``); None (one block over all selected weights) for ``dynamic``, as the
            reference optimizer. None (Python only) or, with ``blocks = "alive"``, a B at least
            the number of live weights gives the unblocked algorithm (reference ``--blocksize
            -1``).
        blocks: what is cut into blocks of B. ``"alive"`` (the reference's ``w[mask]``): the
            concatenation of the live weights of all selected parameters, in layout order, cut
            into consecutive blocks of B live weights, so blocks straddle parameters and move as
            the mask changes. ``"fixed"``: each parameter's flattened weights, pruned ones
            included, cut into blocks of B that never cross a parameter (the core's
            convention, and WoodFisher's). Default None: ``"alive"`` for ``static``,
            ``"fixed"`` for ``dynamic`` (a window outlives a mask; ``"alive"`` is static-only).
            The estimator does not see the mask (the core gives it none): a coordinate is live
            when some gradient fed is non-zero there; the core's GradientSource zeroes the
            gradients of pruned weights exactly. A live weight whose gradients are all exactly
            zero is then treated as pruned; its own entries are the same either way (F⁻¹ e_q =
            e_q/λ), only the block boundaries of the weights after it shift.
        num_grads: m, gradients fed before each pruning step. Default 64 (reference
            ``ngrads_schedule = [64]``).
        fisher_mini_batch: samples averaged into one gradient. Default 32 (reference
            ``prun_batchsize``: each gradient is a mean loss gradient over 32 samples).
        algorithm: ``"static"`` (the paper's static algorithm: all fed gradients, coefficients
            precomputed once, O(d·m) per product and O(m) per diagonal entry) or ``"dynamic"``
            (the sliding window: each new gradient evicts the oldest; O(d·m + m²) per product).
        window: the dynamic window size; None (default) means ``num_grads``, so a pruning step
            sees exactly the gradients fed. A smaller window keeps the last ``window`` of them;
            a larger one holds all ``num_grads`` (F then averages over those actually held).
            Ignored by ``static``.
        storage_dtype: the dtype the static algorithm stores its m×d gradient matrix G (and Ŵ,
            which overwrites it) in: ``"bfloat16"`` or ``"float16"`` halve the estimator's
            memory; every product reads G in pieces converted to ``dtype``, so only the stored
            values are rounded (the error this adds is measured in docs/benchmarks.md). Default
            None: ``dtype``. Static only.
    """

    damping: float = attrs.field(default=1e-5, converter=float, validator=_positive)
    # algorithm before block_size: block_size's default depends on it
    algorithm: Algorithm = attrs.field(
        default="static", validator=attrs.validators.in_(("static", "dynamic"))
    )
    block_size: int | None = attrs.field(
        default=attrs.Factory(lambda self: 128 if self.algorithm == "static" else None,
                              takes_self=True),
        validator=_optional_at_least_one,
    )
    blocks: BlockMode | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(("alive", "fixed")))
    )
    num_grads: int = attrs.field(default=64, validator=_at_least_one)
    fisher_mini_batch: int = attrs.field(default=32, validator=_at_least_one)
    window: int | None = attrs.field(default=None, validator=_optional_at_least_one)
    storage_dtype: StorageDtype | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.in_(tuple(STORAGE_DTYPES))),
    )

    def __attrs_post_init__(self) -> None:
        if self.storage_dtype is not None and self.algorithm == "dynamic":
            raise ValueError(
                "storage_dtype applies to algorithm = 'static' (the dynamic window updates its "
                "stored gradients in place at every step); remove it or use static"
            )
        if self.blocks == "alive" and self.algorithm == "dynamic":
            raise ValueError(
                "blocks = 'alive' needs algorithm = 'static' (a sliding window outlives the mask "
                "its live set was read from); use blocks = 'fixed'"
            )

    @property
    def block_mode(self) -> BlockMode:
        """``blocks``, or its default: ``"alive"`` for static, ``"fixed"`` for dynamic."""
        if self.blocks is not None:
            return self.blocks
        return "alive" if self.algorithm == "static" else "fixed"

    @property
    def alive_blocks(self) -> bool:
        """Blocks of B live weights (``block_mode == "alive"`` with a ``block_size``)."""
        return self.block_mode == "alive" and self.block_size is not None

    @property
    def storage_torch_dtype(self) -> torch.dtype:
        """The dtype G is stored in: ``storage_dtype``, or ``dtype`` when unset."""
        if self.storage_dtype is None:
            return self.torch_dtype
        return STORAGE_DTYPES[self.storage_dtype]

    @property
    def window_size(self) -> int:
        """The dynamic window m: ``window``, or ``num_grads`` when unset."""
        return self.window if self.window is not None else self.num_grads
