"""The four roles of a pruning pipeline, as abstract base classes.

::

    model + data ──► GradientSource ──► CurvatureEstimator ──► SaliencyScorer ──► MaskApplier
                                                  ▲                                    │
                                                  └──────────── Scheduler ◄────────────┘

Every component is built by a factory registered under a name (see :mod:`curvprune.hookspecs`)
from a frozen attrs config, and the pipeline calls these plain methods in its loops; no plugin hook
runs inside a numerical loop.

All tensors are flat over the selected weights (:class:`curvprune.ParamLayout`): a weight vector
is ``[d]``, a batch of gradients ``[k, d]``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from curvprune.distributed import is_distributed
from curvprune.errors import ConfigError, EstimatorStateError, UnsupportedQuery
from curvprune.layout import BlockLayout, ParamLayout

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CurvatureEstimator",
    "EstimatorConfig",
    "Granularity",
    "MaskApplier",
    "PruneContext",
    "SaliencyScorer",
    "Scheduler",
]

Granularity = Literal["weight", "channel"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _optional_at_least_one(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen(kw_only=True)
class EstimatorConfig:
    """Options every curvature estimator shares; plugins subclass it and add their own.

    Attributes:
        damping: λ in F = λ·I + (1/m)·Σ gᵢgᵢᵀ; absolute, never divided by m. Must be > 0.
        block_size: width B of the diagonal blocks (consecutive weights of one parameter, never
            crossing a parameter); None means one block over all selected weights.
        num_grads: m, the number of gradients the pipeline feeds before each pruning step.
        fisher_mini_batch: samples averaged into one gradient (1: per-sample gradients).
        fisher: ``"empirical"`` (labels from the data) or ``"true"`` (labels sampled from the
            model's predictive distribution).
        dtype: accumulation dtype.
    """

    damping: float = attrs.field(default=1e-5, converter=float, validator=_positive)
    block_size: int | None = attrs.field(default=None, validator=_optional_at_least_one)
    num_grads: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    fisher_mini_batch: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    fisher: Literal["empirical", "true"] = attrs.field(
        default="empirical", validator=attrs.validators.in_(("empirical", "true"))
    )
    dtype: Literal["float32", "float64"] = attrs.field(
        default="float32", validator=attrs.validators.in_(tuple(_DTYPES))
    )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The accumulation dtype as a ``torch.dtype``."""
        return _DTYPES[self.dtype]


class CurvatureEstimator(abc.ABC):
    """Accumulates gradients and answers queries about the inverse of the damped Fisher.

    The convention, the same for every estimator::

        F = damping·I + (1/m)·Σᵢ gᵢgᵢᵀ          (over the m gradients seen, or in the window)

    restricted to the estimator's structure (block diagonal with ``block_size`` for exact
    estimators; diagonal, Kronecker-factored, ... for approximations, which document theirs).

    Life cycle: :meth:`setup` (once per layout; resets all state), :meth:`update` (any number of
    times, with ``[k, d]`` gradient chunks), then queries. Subclasses implement the protected
    ``_setup``, ``_update``, ``_ihvp``, ``_inverse_diagonal`` and :attr:`num_samples`; the public
    methods check shapes and move tensors to the estimator's device and dtype.

    Args:
        config: the estimator's frozen config (an :class:`EstimatorConfig` subclass).
    """

    config: EstimatorConfig

    def __init__(self, config: EstimatorConfig) -> None:
        self.config = config
        self.sizes: tuple[int, ...] = ()
        self.device = torch.device("cpu")
        self.dtype = config.torch_dtype

    # -- gradient collection settings, read by the pipeline ----------------------------------
    @property
    def num_grads(self) -> int:
        """How many gradients the pipeline feeds before each pruning step."""
        return self.config.num_grads

    @property
    def d(self) -> int:
        """Total number of weights the estimator covers (after :meth:`setup`)."""
        return sum(self.sizes)

    @property
    def block_layout(self) -> BlockLayout:
        """The estimator's diagonal blocks; OBS joint updates never cross them."""
        return BlockLayout.build(self.sizes, self.config.block_size)

    # -- life cycle ---------------------------------------------------------------------------
    def setup(self, sizes: Sequence[int], *, device: torch.device | str | None = None) -> None:
        """Prepare for a new layout and drop all accumulated state.

        Args:
            sizes: number of weights of each selected parameter, in layout order (d = sum).
            device: where state lives; defaults to the CPU.
        """
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ConfigError(f"sizes must be a non-empty list of positive ints, got {sizes}")
        self.sizes = tuple(int(s) for s in sizes)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._setup()

    def update(self, grads: Tensor) -> None:
        """Accumulate a chunk of gradients.

        Args:
            grads: ``[k, d]``, any floating dtype and device; rows are single gradients gᵢ.
        """
        self._require_setup("update")
        if grads.dim() != 2 or grads.shape[1] != self.d:
            raise ValueError(f"grads must have shape [k, {self.d}], got {tuple(grads.shape)}")
        if grads.shape[0]:
            self._update(grads.to(device=self.device, dtype=self.dtype))

    def ihvp(self, v: Tensor) -> Tensor:
        """Inverse-Fisher-vector products F⁻¹v.

        Args:
            v: ``[d]`` or ``[n, d]``.

        Returns:
            F⁻¹v with the shape of ``v``, in the estimator's dtype and device.
        """
        self._require_setup("ihvp")
        if v.shape[-1] != self.d or v.dim() not in (1, 2):
            raise ValueError(f"v must have shape [{self.d}] or [n, {self.d}], got {tuple(v.shape)}")
        out = self._ihvp(v.reshape(-1, self.d).to(device=self.device, dtype=self.dtype))
        return out.reshape(v.shape)

    def inverse_diagonal(self) -> Tensor:
        """The diagonal of F⁻¹, ``[d]``; every entry is > 0."""
        self._require_setup("inverse_diagonal")
        return self._inverse_diagonal()

    def inverse_columns(self, idx: Tensor) -> Tensor:
        """The entries of F⁻¹ among groups of coordinates (for joint OBS updates).

        Args:
            idx: long ``[n, k]``; each row is a group of flat indices (in one block, for blocked
                estimators); ``-1`` pads short rows.

        Returns:
            ``[n, k, k]`` with ``out[r, i, j] = [F⁻¹]_{idx[r,i], idx[r,j]}``: the columns
            ``idx[r]`` of F⁻¹ read at the rows ``idx[r]``. Padded rows and columns hold the
            identity, so a batched solve with a zero right-hand side there is harmless.

        Subclasses implement :meth:`_inverse_columns`; this method checks ``idx`` and enforces
        the identity on padding.
        """
        self._require_setup("inverse_columns")
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx must be an integer tensor [n, k], got {idx.dtype} {tuple(idx.shape)}")
        idx = idx.to(device=self.device, dtype=torch.long)
        if idx.numel() and (bool((idx < -1).any()) or bool((idx >= self.d).any())):
            raise ValueError(f"idx entries must be in [-1, {self.d}), got {idx.min()}..{idx.max()}")
        out = self._inverse_columns(idx)
        n, k = idx.shape
        valid = idx >= 0
        pair_valid = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(k, device=self.device, dtype=out.dtype).expand(n, k, k)
        return torch.where(pair_valid, out, eye)

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """``[n, k, k]`` entries of F⁻¹ for groups ``idx`` (long, on the device, -1 padding).

        Values at padded positions are ignored (the caller puts the identity there). The default
        builds the needed columns with :meth:`_ihvp` on unit vectors, in chunks of bounded memory
        (O(n·k·d) work); blocked estimators override it with a gather from their blocks.
        """
        n, k = idx.shape
        flat = idx.clamp_min(0).reshape(-1)
        out = torch.empty(n * k, k, device=self.device, dtype=self.dtype)
        chunk = max(1, (1 << 24) // max(self.d, 1))
        rows_of = flat.reshape(n, k)
        for start in range(0, n * k, chunk):
            sel = flat[start : start + chunk]
            basis = torch.zeros(sel.numel(), self.d, device=self.device, dtype=self.dtype)
            basis[torch.arange(sel.numel(), device=self.device), sel] = 1
            cols = self._ihvp(basis)  # [c, d]: column q of F⁻¹ (F⁻¹ is symmetric)
            group = torch.arange(start, start + sel.numel(), device=self.device) // k
            out[start : start + sel.numel()] = torch.gather(cols, 1, rows_of[group])
        return out.reshape(n, k, k)

    def _require_setup(self, call: str) -> None:
        if not self.sizes:
            raise EstimatorStateError(
                f"{type(self).__name__}.{call}() before setup(sizes): call setup with the number "
                "of weights of each selected parameter first"
            )

    # -- to implement -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """m: the number of gradients in the current estimate."""

    @classmethod
    @abc.abstractmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """Peak bytes the estimator will hold for ``sizes`` (for ``curvprune plan``).

        Count the estimator's own state (block inverses, stored gradients, window matrices) at
        its configured dtype; the gradient chunks fed to :meth:`update` are counted by the
        pipeline.
        """

    @abc.abstractmethod
    def _setup(self) -> None:
        """Allocate empty state for ``self.sizes`` on ``self.device``."""

    @abc.abstractmethod
    def _update(self, grads: Tensor) -> None:
        """Accumulate ``grads`` ``[k, d]`` (already on the estimator's device and dtype)."""

    @abc.abstractmethod
    def _ihvp(self, v: Tensor) -> Tensor:
        """F⁻¹v for ``v`` ``[n, d]`` (on the estimator's device and dtype)."""

    @abc.abstractmethod
    def _inverse_diagonal(self) -> Tensor:
        """The diagonal of F⁻¹, ``[d]``."""

    # -- optional: torch.distributed ----------------------------------------------------------
    #: How the pipeline combines the ranks' gradients under torch.distributed (read after
    #: :meth:`setup`, so a subclass may make it a property of its resolved algorithm):
    #:
    #: * ``"gather"`` (default, exact for every estimator): every rank receives every gradient
    #:   row, in the single-process order, and runs the same :meth:`update` calls, so its state
    #:   equals one process's. Order-dependent estimators (a Woodbury recursion, a sliding
    #:   window, a stored gradient matrix) need this.
    #: * ``"sum"``: each rank calls :meth:`update` with its own rows only; after the last update
    #:   the pipeline calls :meth:`all_reduce` on every rank, which sums the additive
    #:   accumulators (Gram blocks, squared gradients, m). No gradient row is sent, and each
    #:   rank does 1/W of the accumulation work; the state equals one process's up to the
    #:   summation order (float round-off).
    reduction: Literal["gather", "sum"] = "gather"

    def all_reduce(self) -> None:
        """Combine every rank's accumulated state (``reduction = "sum"``); call on every rank.

        The pipeline calls it after the last :meth:`update` and before any query. A no-op in a
        single process.

        Raises:
            EstimatorStateError: before :meth:`setup`, or for an estimator that gathers.
        """
        self._require_setup("all_reduce")
        if self.reduction != "sum":
            raise EstimatorStateError(
                f"{type(self).__name__} gathers gradient rows (reduction = {self.reduction!r}); "
                "it has no state to all-reduce"
            )
        if is_distributed():
            self._all_reduce()

    def _all_reduce(self) -> None:
        """Sum this estimator's additive state over the ranks (see :attr:`reduction`).

        Estimators with ``reduction = "sum"`` implement it with
        :func:`curvprune.distributed.all_reduce_sum_`; it runs only when distributed.
        """
        raise NotImplementedError(
            f"{type(self).__name__} declares reduction = 'sum' but does not implement _all_reduce()"
        )

    # -- optional -----------------------------------------------------------------------------
    #: True for an estimator that builds its estimate from the model and data itself
    #: (:meth:`fit`) rather than from gradient rows fed to :meth:`update`; K-FAC needs each
    #: layer's inputs and output gradients, which flattened gradient rows do not carry. The
    #: pipeline then calls :meth:`setup` and :meth:`fit` instead of feeding rows.
    fits_model: ClassVar[bool] = False

    def fit(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        layout: ParamLayout,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Build the estimate from ``model`` on ``num_grads`` samples of ``batches``.

        Only estimators with :attr:`fits_model` implement it; the pipeline calls it after
        :meth:`setup` (with ``layout.sizes``) in place of :meth:`update`.

        Args:
            model: the model (pruned weights already zero); it must be left unchanged,
                its train/eval mode included.
            batches: ``(inputs, targets)`` batches (a DataLoader); use the first ``num_grads``
                samples.
            loss_fn: ``loss_fn(outputs, targets)``, the mean loss over a batch.
            layout: the selected parameters (the layout whose sizes :meth:`setup` got).
            generator: random generator for sampled labels (``fisher = "true"``).
        """
        raise self.unsupported("fit(model, batches, ...)", "feed gradient rows with update(grads)")

    @classmethod
    def plan_memory_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """Peak bytes for the parameters of ``layout`` (what ``plan`` reports).

        The default is :meth:`memory_bytes` of ``layout.sizes``; an estimator whose state
        depends on the parameters' shapes, not only their sizes (K-FAC: an in×in and an
        out×out factor per layer), overrides it.
        """
        return cls.memory_bytes(layout.sizes, config)

    @classmethod
    def plan_held_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """Bytes of state held while gradients are fed to :meth:`update` (for ``plan``).

        ``plan`` takes the step's peak as the larger of two phases: accumulating (this, plus the
        gradient chunks and :meth:`plan_update_bytes`) and answering queries
        (:meth:`plan_memory_bytes`, the gradients freed). The default, the whole peak, assumes
        the two overlap; an estimator whose peak is a transient of its inversion (WoodFisher's
        ``gram``: the Cholesky factor next to the Gram batch) returns less.
        """
        return cls.plan_memory_bytes(layout, config)

    @classmethod
    def plan_update_bytes(cls, rows: int, layout: ParamLayout, config: EstimatorConfig) -> int:
        """Work bytes of one :meth:`update` with ``rows`` gradient rows, beside the rows themselves.

        The default is one float32 copy of the rows (an elementwise square, a contiguous copy);
        an estimator whose update makes more (or none) overrides it.
        """
        return rows * layout.d * 4

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        """Rough floating-point operations to build the estimate (for ``plan``); None: unknown."""
        return None

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Return why this estimator cannot run with the other components, or None if it can.

        Args:
            components: the pipeline's built components by role, plus ``prune`` (its config).
        """
        return None

    def unsupported(self, query: str, instead: str) -> UnsupportedQuery:
        """Build the error for a query this estimator cannot answer."""
        return UnsupportedQuery(f"{type(self).__name__} cannot answer {query}; {instead}")


@attrs.define(kw_only=True)
class PruneContext:
    """What a scorer sees at one pruning step.

    Attributes:
        model: the model being pruned (weights already masked).
        layout: the selected parameters.
        weights: their current values, flat ``[d]``.
        mask: current keep-mask, bool ``[d]`` (False = pruned).
        target_sparsity: the sparsity this step prunes to.
        estimator: the fitted curvature estimator, if the pipeline has one.
        mean_grad: mean of the gradients fed to the estimator, ``[d]`` (None if not collected).
        batches: a callable returning an iterator of ``(inputs, targets)`` batches on the
            model's device, for scorers that need the model and data themselves;
            ``batches(num_samples=N)`` stops after N samples (the last batch cut). Under
            torch.distributed it yields this rank's slice of every batch
            (:func:`curvprune.distributed.shard`): pass N here rather than counting samples
            on the slices, accumulate sums over samples and all-reduce the sums and the
            sample count (``curvprune.distributed.all_reduce_sum_``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch).
        step: the index of this pruning step in the run.
    """

    model: nn.Module
    layout: ParamLayout
    weights: Tensor
    mask: Tensor
    target_sparsity: float
    estimator: CurvatureEstimator | None = None
    mean_grad: Tensor | None = None
    batches: Callable[..., Iterable[tuple[Any, Tensor]]] | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    step: int = 0


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
    * ``quadratic_prediction``: for one pruned weight q, ``predicted_loss_change(ctx, {q})``
      is ½δwᵀFδw at δw = ``compensate(ctx, {q})``, F the estimator's damped estimate, with no
      first-order term (OBS, Hassibi & Stork 1993; for a larger set the summed update's
      prediction need not be one). The single-weight audit then splits the prediction into
      the curvature part ½δwᵀF₀δw and the damping part ½λ‖δw‖² (F = F₀ + λI), and the
      measurement into ∇Lᵀδw and the rest (:mod:`curvprune.audit`); the conformance suite
      checks the identity. An instance attribute, since an option may turn the compensation
      off.
    """

    granularity: Granularity = "weight"
    needs_curvature: ClassVar[bool] = False
    needs_gradient: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    quadratic_prediction: bool = False

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @abc.abstractmethod
    def score(self, ctx: PruneContext) -> Tensor:
        """Saliency of each unit (smaller is pruned first), ``[d]`` or ``[S]`` (structures)."""

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


class MaskApplier(abc.ABC):
    """Turns saliencies and a target sparsity into a keep-mask over the selected weights.

    A mask applier never revives a pruned weight: the new mask is a subset of the current one.
    """

    granularity: Granularity = "weight"

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @abc.abstractmethod
    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """The new keep-mask.

        Args:
            scores: saliencies ``[d]`` (weight granularity) or ``[S]`` (channel granularity:
                one per structure, see :attr:`ParamLayout.n_structures`).
            mask: the current keep-mask, bool ``[d]``.
            sparsity: the target fraction of removed units, in [0, 1): of all selected weights
                (weight granularity) or of all structures (channel granularity), counting the
                units already removed.
            layout: the selected parameters.

        Returns:
            bool ``[d]``, True where a weight is kept; a subset of ``mask``.
        """

    def achieved_sparsity(self, mask: Tensor, layout: ParamLayout) -> float:
        """The sparsity of ``mask`` in this applier's units (for reports and schedules)."""
        return float(1.0 - mask.float().mean())

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Return why this applier cannot run with the other components, or None if it can."""
        return None


class Scheduler(abc.ABC):
    """Decides when to prune and to which sparsity.

    One-shot pruning asks :meth:`levels` for the sparsity of each sub-step (curvature is
    recomputed between sub-steps). Pruning during training asks :meth:`level_at` after every
    optimizer step and prunes when it returns a level; :meth:`before_optimizer_step` lets a
    schedule act on gradients (penalties) before each optimizer step.

    ``during_training`` is True for schedules that only make sense inside a training loop
    (``Pipeline.prune`` refuses them; ``Pipeline.attach`` drives them).

    ``prune_phase`` is True for a during-training schedule that brings its own training phase
    (GReg: a penalty grows until the chosen units are near zero, then they are removed). Such a
    schedule decides at run time when it is done, so ``curvprune run`` gives it a *prune phase*
    before ``[finetune]``: it trains with :meth:`prune_phase_optimizer` (iterating the training
    data) until :meth:`finished`, at most :meth:`max_steps` steps, measures the accuracy right
    after the removal, then fine-tunes with a fresh optimizer and the masks held.
    """

    during_training: ClassVar[bool] = False
    prune_phase: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def levels(self, target: float, current: float = 0.0) -> list[float]:
        """Sparsity after each one-shot sub-step, ending at ``target``."""
        return [target]

    def level_at(self, step: int, target: float) -> float | None:
        """The sparsity to prune to after optimizer step ``step`` (0-based), or None."""
        return None

    def before_optimizer_step(self, step: int, model: nn.Module, layout: ParamLayout) -> None:
        """Act on gradients before optimizer step ``step`` (e.g. add a penalty). Default: no-op."""

    def finished(self, step: int) -> bool:
        """Whether no pruning event remains after ``step``."""
        return True

    def select(self, ctx: PruneContext) -> Tensor | None:
        """The keep-mask this schedule chooses itself at a pruning step, or None (the default).

        Most schedules only say *when* and *how much*; the scorer and mask applier choose *which*
        units go. A schedule that owns the choice (GReg fixes its pruned groups when its penalty
        starts) returns a bool ``[d]`` keep-mask here; the pipeline then skips the scorer and
        the mask applier's selection for this step and keeps ``ctx.mask & returned``.
        """
        return None

    def prune_phase_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of the prune phase (only for schedules with ``prune_phase``)."""
        raise NotImplementedError(f"{type(self).__name__} has no prune phase")

    def max_steps(self) -> int:
        """An upper bound on the prune phase's optimizer steps (only with ``prune_phase``)."""
        raise NotImplementedError(f"{type(self).__name__} has no prune phase")

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (tensors and plain values) for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Return why this schedule cannot run with the other components, or None if it can."""
        return None
