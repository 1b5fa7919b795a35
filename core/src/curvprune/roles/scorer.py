"""The saliency-scorer role: scores weights or structures, optionally proposes an update."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from curvprune.roles.context import PruneContext
from curvprune.roles.units import Granularity, Selection
from curvprune.tensors.layout import ParamLayout

if TYPE_CHECKING:
    from torch import nn

    from curvprune.roles.mask_applier import MaskApplier

__all__ = ["SaliencyScorer"]


class SaliencyScorer(abc.ABC):
    """Scores weights or structures; optionally proposes a compensating weight update.

    Scores are saliencies in loss units where the method has them (an estimate of the loss
    increase caused by removing the unit): the smallest go first. Their units are weights
    (``granularity = "weight"``, scores ``[d]``) or channel **structures** (``granularity =
    "channel"``, scores ``[S]`` with S = :attr:`ParamLayout.n_structures`). When the pipeline
    traced the model (``channel`` mask, ``coupled = true``), ``ctx.layout.structures`` holds
    them: a structure is one channel of a prunable group, the coupled channels of a residual
    stream being one structure, and :meth:`ParamLayout.structure_index` maps each output
    channel to its structure (-1: never pruned, e.g. the classifier). Without structures each
    output channel of each selected parameter is one structure, numbered as in
    :meth:`ParamLayout.channel_index`.

    Class attributes declare what the scorer needs, so the pipeline validates a combination
    before any compute and skips work nobody needs:

    * ``granularity``: ``"weight"`` or ``"channel"``; the mask applier must match (an instance
      attribute, so a config option may choose it).
    * ``needs_curvature``: the pipeline must have an estimator, fitted before :meth:`score`.
    * ``needs_gradient``: ``PruneContext.mean_grad`` must be filled.
    * ``needs_data``: ``PruneContext.batches`` and ``loss_fn`` must be filled.
    * ``layer_local``: the scores (and update) of a layer depend only on the layer's weights
      and the inputs it receives, never on a loss or gradient (magnitude, WANDA, OBS over a
      layer-local estimator). Only such a pipeline can calibrate stage by stage
      (``[schedule] calibration = "sequential"``, :mod:`curvprune.pipeline.stages`), where
      ``ctx.model`` runs only the stage being pruned, on its cached inputs.
    * ``quadratic_prediction``: for one pruned weight q, ``predicted_loss_change(ctx, {q})``
      is ½δwᵀFδw at δw = ``compensate(ctx, {q})``, F the estimator's damped estimate, with no
      first-order term (OBS, Hassibi & Stork 1993; for a larger set the summed update's
      prediction need not be one). The single-weight audit then splits the prediction into
      the curvature part ½δwᵀF₀δw and the damping part ½λ‖δw‖² (F = F₀ + λI), and the
      measurement into ∇Lᵀδw and the rest (:mod:`curvprune.pipeline.audit`); the conformance suite
      checks the identity. An instance attribute, since an option may turn the compensation
      off.
    * ``columns_local``: the scores, the update and the predicted loss change of any run of
      weights ``[lo, hi)`` need only those weights, their mask and the estimator's answers for
      those columns (OBS with the summed update: ρ_q from [F⁻¹]_qq, δw = −F⁻¹u with u zero off
      the pruned weights). Under a sharded estimator each rank then scores and updates its
      own columns (:mod:`curvprune.pipeline.owned`) and the predicted loss changes of the
      ranks are summed. An instance attribute, since an option may change it.
    """

    granularity: Granularity = "weight"
    needs_curvature: ClassVar[bool] = False
    needs_gradient: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    layer_local: ClassVar[bool] = False
    quadratic_prediction: bool = False
    columns_local: bool = False

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @abc.abstractmethod
    def score(self, ctx: PruneContext) -> Tensor:
        """Saliency of each unit (smaller is pruned first), ``[d]`` or ``[S]`` (structures)."""

    def select(self, ctx: PruneContext, applier: MaskApplier, level: float) -> Selection | None:
        """Choose the mask and the update together, or None (the default) to score, let
        ``applier`` select, and :meth:`compensate`.

        For methods whose choice and update interleave (SparseGPT picks each column block's
        mask from weights the previous blocks' updates already moved; OBC removes one weight
        at a time), so that no score vector can be handed to the mask applier first. An
        implementation must honour ``applier``'s rule and ``level`` (or return None where it
        cannot), never revive a weight pruned in ``ctx.mask``, and is checked by the pipeline
        like any mask applier's result.
        """
        return None

    def compensate(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """The weight update δw ``[d]`` to add when the weights in ``pruned`` are removed.

        Args:
            ctx: the step's context (same as for :meth:`score`).
            pruned: bool ``[d]``, the weights removed in this step.

        Returns:
            δw, or None for no update. The pipeline adds δw and then zeroes every pruned weight
            exactly, so δw need not be exact on ``pruned``.
        """
        return None

    def predicted_loss_change(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """The loss increase the scorer's model predicts for this step (0-dim), or None."""
        return None

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Return why this scorer cannot run with the other components, or None if it can.

        Args:
            components: the pipeline's built components by role (``estimator`` may be None).
        """
        return None

    #: What to change when :meth:`memory_bytes` is the part that does not fit (for ``plan``).
    memory_hint: ClassVar[str] = "select fewer parameters ([prune] targets/ignore)"

    def memory_bytes(self, model: nn.Module, layout: ParamLayout) -> int:
        """Peak bytes of the scorer's own state when scoring ``model`` (for ``plan``).

        Default 0: most scorers hold O(d). A scorer with a larger state (SOSP-I's S×S structure
        matrix) reports it, so ``plan`` shows it and refuses a run that would not fit.
        """
        return 0

    def report(self) -> dict[str, Any] | None:
        """What the scorer adds to a run's report after pruning, or None (the default).

        JSON-able; ``curvprune run`` stores it as ``scorer_report`` in ``result.json`` and
        appends its ``"markdown"`` entry, if any, to ``report.md`` (SOSP: the bottleneck report).
        """
        return None

    def write_figures(self, folder: Path) -> list[str]:
        """Write the scorer's plots (PNG) into a run directory; return their file names.

        Called by ``curvprune run`` inside the run's staging folder, after :meth:`report`, so
        the figures land atomically with the rest of the run. Default: none.
        """
        return []
