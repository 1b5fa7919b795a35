"""Builtin saliency scorers: ``magnitude`` and ``obs`` (Optimal Brain Surgeon over any estimator).

OBS (Hassibi & Stork, 1993), in the form WoodFisher (Singh & Alistarh, 2020, Eq. 4-5) and M-FAC
(Frantar et al., 2021) use it: with the local quadratic model L(w + δw) ≈ L(w) + ½ δwᵀFδw around
a trained point,

* the saliency of weight q is ρ_q = w_q² / (2 [F⁻¹]_qq), the loss increase of removing q alone
  after the optimal compensation;
* the compensation for a removed set P is δw = −F⁻¹u with u_q = w_q / [F⁻¹]_qq on P and 0
  elsewhere: the sum of the single-weight updates, one inverse-Hessian-vector product, so it works
  for unblocked low-rank estimators (M-FAC) as well as for blocks;
* with ``joint = true``, the exact update for removing the whole set at once,
  δw = −F⁻¹ E_P ([F⁻¹]_PP)⁻¹ w_P, solved per block (P restricted to a block), with predicted loss
  increase ½ w_Pᵀ ([F⁻¹]_PP)⁻¹ w_P (WoodFisher, Appendix on pruning multiple weights).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from curvprune.builtin.group_saliency import group_sums, unsupported_group
from curvprune.errors import ConfigError
from curvprune.plugin.manager import hookimpl
from curvprune.plugin.registry import Register
from curvprune.roles.context import PruneContext
from curvprune.roles.mask_applier import MaskApplier
from curvprune.roles.scorer import SaliencyScorer
from curvprune.roles.units import Selection
from curvprune.tensors import distributed

__all__ = ["MagnitudeConfig", "MagnitudeScorer", "OBSConfig", "OBSScorer"]


@attrs.frozen(kw_only=True)
class MagnitudeConfig:
    """Options of the ``magnitude`` scorer.

    Attributes:
        granularity: ``weight`` (score |w|) or ``channel`` (norm of each channel structure).
        norm: ``l1`` or ``l2``, the channel norm (ignored for weights).
        extent: which parameters a channel structure's norm runs over. ``group`` (default):
            every parameter entry that removing the structure deletes: the weight rows and
            biases of all its producers (every producer of a residual stream), its norms' γ
            and β, its depthwise convolutions' rows and biases, and its **consumers' input
            columns** (:mod:`curvprune.builtin.group_saliency`); ``producers``: the weight rows
            of its producers (and selected depthwise convolutions) only, the filter norm of
            Li et al. (2017). Without traced structures (``mask.coupled = false``) the
            consumers are unknown and both count the weight rows only.
        normalize: ``mean`` (channels only): each structure's norm divided by the mean norm of
            the kept structures of its group, so that a global ranking compares channels
            within their group's scale (Torch-Pruning's default normalizer) instead of taking
            the groups with small weights down to their last channel; ``none``: raw norms.
            With ``extent = "group"`` the mean is over the group's group-summed norms, so a
            structure scores 1 when its removal deletes as much weight mass as the average
            channel of its group; a group's fan-in, fan-out, number of coupled producers and
            BatchNorm scale all cancel, and the global ranking compares relative importances.
    """

    granularity: Literal["weight", "channel"] = "weight"
    norm: Literal["l1", "l2"] = "l2"
    extent: Literal["group", "producers"] = attrs.field(
        default="group", validator=attrs.validators.in_(("group", "producers"))
    )
    normalize: Literal["mean", "none"] = attrs.field(
        default="mean", validator=attrs.validators.in_(("mean", "none"))
    )


class MagnitudeScorer(SaliencyScorer):
    """Magnitude pruning: the smallest |w| (or channel norm) goes first. No data needed."""

    layer_local = True

    def __init__(self, config: MagnitudeConfig | None = None) -> None:
        super().__init__(config or MagnitudeConfig())
        self.granularity = self.config.granularity

    def score(self, ctx: PruneContext) -> Tensor:
        """|w| per weight ``[d]``, or the L1/L2 norm of each structure's parameters ``[S]``.

        With ``extent = "group"`` and traced structures, a structure's norm runs over every
        parameter entry its removal deletes (producers' rows and biases, norms' γ and β,
        depthwise rows and biases, consumers' input columns, layer scales, embeddings; a
        head's rows and output-projection columns: :mod:`curvprune.builtin.group_entries`),
        without the entries of structures already removed; with ``extent = "producers"`` over
        the weight rows of all its channels (for a coupled structure, the rows of every
        producer of the residual stream channel). The norm is the sum of |θ| (l1) or the
        square root of the sum of θ² (l2). Channels of selected parameters that are not
        prunable (structure id -1) are left out.
        """
        w = ctx.weights * ctx.mask
        if self.granularity == "weight":
            return w.abs()
        layout = ctx.layout
        fn = torch.abs if self.config.norm == "l1" else torch.square
        why = None
        if self.config.extent == "group" and hasattr(layout.structures, "groups"):
            why = unsupported_group(layout.structures, ctx.model)
            if why is not None:
                warnings.warn(f"magnitude extent = 'group' cannot count every parameter "
                              f"of this model's groups ({why}); it scores the producers' "
                              "rows only", stacklevel=2)
        if self.config.extent == "group" and hasattr(layout.structures, "groups") \
                and why is None:
            out = group_sums(ctx.model, layout, ctx.weights, ctx.mask, fn)
        else:
            out = layout.structure_sums(layout.channel_sums(fn(w)))
        out = out if self.config.norm == "l1" else out.sqrt()
        if self.config.normalize == "mean":
            out = _per_group_mean_normalized(out, layout, ctx.mask)
        return out


def _per_group_mean_normalized(scores: Tensor, layout: Any, mask: Tensor) -> Tensor:
    """``scores`` divided by the mean score of the kept structures of their group."""
    group = layout.structure_group(scores.device)
    alive = layout.alive_structures(mask).to(scores.device)
    n_groups = layout.n_structure_groups
    sums = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    sums.index_add_(0, group[alive], scores[alive])
    counts = torch.bincount(group[alive], minlength=n_groups).to(scores.dtype)
    mean = sums / counts.clamp_min(1)
    tiny = torch.finfo(scores.dtype).tiny
    return scores / mean[group].clamp_min(tiny)


@attrs.frozen(kw_only=True)
class OBSConfig:
    """Options of the ``obs`` scorer.

    Attributes:
        update: apply the compensating weight update (false: rank by OBS saliency only).
        joint: solve the exact multi-weight update within each block instead of summing
            single-weight updates (needs a blocked estimator).
        max_joint_group: the largest number of weights pruned in one block that the joint solve
            accepts (its cost is that cubed, per block).
    """

    update: bool = True
    joint: bool = False
    max_joint_group: int = attrs.field(default=2048, validator=attrs.validators.ge(1))


class OBSScorer(SaliencyScorer):
    """Optimal Brain Surgeon saliency and compensation over any curvature estimator."""

    needs_curvature = True
    layer_local = True  # as local as its estimator: the pipeline checks the estimator too

    def __init__(self, config: OBSConfig | None = None) -> None:
        super().__init__(config or OBSConfig())
        self.quadratic_prediction = self.config.update  # ρ_q = ½δwᵀFδw at the OBS update δw
        # the joint update solves per block over the pruned set; the summed one is elementwise
        # but for the IHVP, which a sharded estimator answers for its own columns
        self.columns_local = not self.config.joint
        self._diag: Tensor | None = None
        self._taken_loss: Tensor | None = None

    def _inverse_diagonal(self, ctx: PruneContext) -> Tensor:
        assert ctx.estimator is not None
        diag = ctx.estimator.inverse_diagonal()
        # Guard round-off (a float32 diagonal can cancel to <= 0 when 1/damping is huge).
        largest = torch.maximum(diag.amax(), -diag.amin())  # max |diag|, no d-vector
        if ctx.columns is not None:  # this rank's columns: the largest over all of them
            largest = distributed.all_reduce_(largest.reshape(1), "max").reshape(())
        return diag.clamp_min(torch.finfo(diag.dtype).eps * largest)

    def select(self, ctx: PruneContext, applier: MaskApplier, level: float) -> Selection | None:
        """The estimator's joint OBS choice (:meth:`CurvatureEstimator.obs_select`), if it has
        one (SparseGPT, OBC); else None: score, select, compensate."""
        if not self.config.update or ctx.estimator is None:
            return None
        return ctx.estimator.obs_select(ctx.weights, ctx.mask, ctx.layout, applier, level)

    def score(self, ctx: PruneContext) -> Tensor:
        """ρ_q = w_q² / (2 [F⁻¹]_qq), ``[d]`` (WoodFisher Eq. 5)."""
        self._diag = self._inverse_diagonal(ctx)
        # in place on one new d-vector (at d = 85 M each d-vector is 0.32 GiB)
        rho = (ctx.weights * ctx.mask).to(self._diag.dtype)
        return rho.square_().div_(self._diag).mul_(0.5)

    def compensate(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """δw = −F⁻¹u (sum of single-weight OBS updates), or the exact joint update per block."""
        self._taken_loss = None
        if not self.config.update:
            return None
        assert ctx.estimator is not None
        diag = self._diag if self._diag is not None else self._inverse_diagonal(ctx)
        w = ctx.weights.to(diag.dtype)
        if not self.config.joint:
            u = (w / diag).masked_fill_(~pruned, 0)
            # Σ_P ρ_q = ½ Σ_P w_q²/[F⁻¹]_qq = ½ wᵀu: taken now, the diagonal is not alive
            # beside the IHVP's vectors (one d-vector less at the step's peak)
            self._taken_loss = 0.5 * torch.dot(w, u)
            self._diag = None
            del diag
            return ctx.estimator.ihvp(u).neg_()
        return self._joint_update(ctx, pruned, w)

    def _joint_update(self, ctx: PruneContext, pruned: Tensor, w: Tensor) -> Tensor:
        estimator = ctx.estimator
        assert estimator is not None
        blocks = estimator.block_layout
        idx = pruned.nonzero().squeeze(1)  # ascending, so grouped by block
        if idx.numel() == 0:
            return torch.zeros_like(w)
        groups, row, position = blocks.group(idx)
        width = groups.shape[1]
        if width > self.config.max_joint_group:
            raise ConfigError(
                f"joint OBS would solve a {width}x{width} system in one block (max_joint_group="
                f"{self.config.max_joint_group}); use a smaller block_size, more pruning steps, "
                "or joint = false @ scorer.joint"
            )
        rhs = torch.where(groups >= 0, w[groups.clamp_min(0)], torch.zeros((), dtype=w.dtype,
                                                                             device=w.device))
        solution = estimator.inverse_block_solve(groups, rhs)  # ([F⁻¹]_QQ)⁻¹ w_Q per block
        u = torch.zeros_like(w)
        u[idx] = solution[row, position]
        self._taken_loss = 0.5 * (w[idx] * u[idx]).sum()
        return -estimator.ihvp(u)

    def predicted_loss_change(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """Σ_P ρ_q for single-weight updates; ½ w_Pᵀ([F⁻¹]_PP)⁻¹w_P for the joint update
        (both taken by :meth:`compensate` when it ran)."""
        if self._taken_loss is not None:
            return self._taken_loss
        diag = self._diag if self._diag is not None else self._inverse_diagonal(ctx)
        rho = ctx.weights.to(diag.dtype, copy=True).square_().div_(diag).mul_(0.5)
        return rho.masked_fill_(~pruned, 0).sum()


@hookimpl
def curvprune_register_saliency_scorers(register: Register) -> None:
    """Register ``magnitude`` and ``obs``."""
    register("magnitude", MagnitudeScorer, config=MagnitudeConfig)
    register("obs", OBSScorer, config=OBSConfig)
