"""The curvature-estimator role: gradients in, inverse-Fisher queries out.

An estimator accumulates gradient rows ``[k, d]`` (flat over the selected weights, see
:class:`curvprune.ParamLayout`) and answers inverse queries on the damped Fisher
``F = λI + (1/m)·Σ gᵢgᵢᵀ`` restricted to its block structure. Built by a factory registered under
a name (:mod:`curvprune.plugin.hookspecs`) from a frozen :class:`EstimatorConfig`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from curvprune.errors import ConfigError, EstimatorStateError, UnsupportedQuery
from curvprune.tensors.distributed import is_distributed
from curvprune.tensors.layout import BlockLayout, ParamLayout

if TYPE_CHECKING:
    from torch import nn

    from curvprune.roles.mask_applier import MaskApplier
    from curvprune.roles.units import Selection

__all__ = ["CurvatureEstimator", "EstimatorConfig"]

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

    def inverse_block_solve(self, idx: Tensor, rhs: Tensor) -> Tensor:
        """Solve ``[F⁻¹]_{QQ} x = w_Q`` for each group Q (a row of ``idx``): the joint OBS step.

        The multipliers of pruning the weights Q together (WoodFisher Eq. 11, Hassibi & Stork's
        OBS for several weights at once): δw = −F⁻¹ e_Q x. The default reads the entries with
        :meth:`inverse_columns` and solves by batched Cholesky (LU where round-off made a system
        indefinite); a sharded estimator solves each group on the rank owning its block.

        Args:
            idx: long ``[n, k]``, ``-1`` padding, as for :meth:`inverse_columns`.
            rhs: ``[n, k]``, zero at padding.

        Returns:
            ``[n, k]`` solutions (zero at padding).
        """
        m = self.inverse_columns(idx).to(rhs.dtype)
        chol, info = torch.linalg.cholesky_ex(m)
        if bool(info.any()):
            return torch.linalg.solve(m, rhs.unsqueeze(-1)).squeeze(-1)
        return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)

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

    # -- optional: sharding the state over ranks ----------------------------------------------
    #: Whether the pipeline may split this estimator's state over the torch.distributed ranks
    #: by weights (:class:`curvprune.pipeline.sharding.ShardedEstimator`, docs/distributed.md):
    #: each rank sets up its own instance on a contiguous run of the weights (``sizes`` of the
    #: pieces it owns) and is fed only those columns of every gradient row.
    #:
    #: * ``None`` (default): not shardable; every rank holds the whole state (:attr:`reduction`).
    #: * ``"separable"``: the estimate on a run of weights is exactly the restriction of the
    #:   whole estimate (block diagonal, blocks never crossing a cut of :meth:`shard_alignment`).
    #: * ``"coupled"``: the state couples all weights, but only through sums over the columns
    #:   (a Gram matrix GGᵀ, a product Gx): the estimator calls :meth:`sum_over_shards` on each
    #:   such partial sum, which all-reduces it when sharded (identity otherwise).
    #:
    #: Read before :meth:`setup`, so a subclass may make it a property of its config.
    sharding: Literal["separable", "coupled"] | None = None

    #: Set by the sharding wrapper for ``"coupled"`` estimators: sums a partial sum over ranks.
    _shard_sum: Callable[[Tensor], Tensor] | None = None

    def shard_alignment(self) -> int | None:
        """Where a shard may cut a parameter: at multiples of this many weights from the
        parameter's start (None: only between parameters). Default: ``block_size``."""
        return self.config.block_size

    @classmethod
    def shard_cost(cls, size: int, config: EstimatorConfig) -> float:
        """Relative cost of one parameter of ``size`` weights, to balance shards (default: its
        state memory, :meth:`memory_bytes` of the parameter alone)."""
        return float(cls.memory_bytes([size], config))

    def sum_over_shards(self, partial: Tensor) -> Tensor:
        """Sum ``partial`` (a sum over this rank's columns) over the shards, in place; the
        identity unless a ``"coupled"`` estimator is sharded."""
        return partial if self._shard_sum is None else self._shard_sum(partial)

    # -- optional -----------------------------------------------------------------------------
    #: True for an estimator that builds its estimate from the model and data itself
    #: (:meth:`fit`) rather than from gradient rows fed to :meth:`update`; K-FAC needs each
    #: layer's inputs and output gradients, which flattened gradient rows do not carry. The
    #: pipeline then calls :meth:`setup` and :meth:`fit` instead of feeding rows.
    fits_model: ClassVar[bool] = False

    #: True for an estimator whose curvature of a layer comes from that layer's own inputs
    #: (the layer-wise Hessians H = 2XXᵀ/n of OBC/SparseGPT), fitted by :meth:`fit` with no
    #: loss and no gradient. Such a pipeline may calibrate stage by stage: :meth:`fit` then gets
    #: a model that runs only the stage being pruned, on inputs propagated through the stages
    #: already pruned (:mod:`curvprune.pipeline.stages`).
    layer_local: ClassVar[bool] = False

    #: True when the method is defined with sequential calibration (SparseGPT, OBC): the
    #: ``oneshot`` schedule's ``calibration = "auto"`` then runs stage by stage.
    prefers_sequential: ClassVar[bool] = False

    @classmethod
    def layer_owners(
        cls, layout: ParamLayout, config: EstimatorConfig, world: int
    ) -> list[int] | None:
        """The rank owning each parameter of ``layout`` when a :attr:`layer_local` estimator
        splits a fit's layers over ``world`` ranks (the owner alone keeps that layer's state
        and does its work), or None (the default): every rank holds every layer. The estimator
        uses it at :meth:`fit`; ``plan`` counts the largest rank's share with it."""
        return None

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

    def fit_passes(
        self,
        model: nn.Module,
        batch: tuple[Tensor, Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        layout: ParamLayout,
    ) -> None:
        """The work :meth:`fit` does on one batch, nothing kept and the model unchanged.

        ``plan`` measures its peak on one batch of the data (``activations``); the state of
        the batches before it is :meth:`plan_held_bytes`. The default is one forward and
        backward pass to the selected parameters (``torch.autograd.grad``: no ``.grad``
        changes); an estimator whose passes hold more overrides it (K-FAC also unfolds each
        convolution's patches and forms the batch's covariances).
        """
        out = model(batch[0])
        loss = loss_fn(getattr(out, "logits", out), batch[1])
        if loss.requires_grad:
            torch.autograd.grad(loss, layout.parameters(model), allow_unused=True)

    def obs_select(
        self, weights: Tensor, mask: Tensor, layout: ParamLayout, applier: MaskApplier, level: float
    ) -> Selection | None:
        """OBS with the mask chosen during the update, or None (the default).

        The ``obs`` scorer asks its estimator first: an estimator whose structure admits a
        better joint choice than score → select → compensate (SparseGPT's adaptive column
        sweep, OBC's greedy removal, both on a layer's Hessian) returns the keep-mask and the
        update here, following ``applier``'s rule at ``level``; None falls back to the usual
        path (also for an applier whose rule it cannot follow). The contract is
        :meth:`curvprune.SaliencyScorer.select`'s.

        Args:
            weights: the selected weights, flat ``[d]`` (pruned ones already zero).
            mask: the current keep-mask, bool ``[d]``; the result must be a subset.
            layout: the selected parameters (the layout :meth:`setup` got the sizes of).
            applier: the pipeline's mask applier, whose rule the choice follows.
            level: the step's target sparsity.
        """
        return None

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
