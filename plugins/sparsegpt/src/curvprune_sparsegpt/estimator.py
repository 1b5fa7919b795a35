"""The ``sparsegpt`` curvature estimator: layer-wise Hessians H = 2XXᵀ/n in the pipeline.

How layer-wise OBS maps onto curvprune's roles (OBC Eq. 1–3, SparseGPT §3):

* **Curvature** (this estimator): for a layer y = W·x with calibration inputs X, the loss
  ‖WX − ŴX‖² is a quadratic whose Hessian H = 2XXᵀ/n (d_in × d_in) is shared by every output
  row. As a curvature estimator over the selected weights, the "Fisher" is block diagonal with
  one block per output row, every row of a layer having the layer's damped H̃ = H + λ·mean(diag H)·I
  (λ = ``damping``, relative, the reference's ``percdamp``). :meth:`fit` collects H with forward
  pre-hooks (:class:`curvprune_sparsegpt.LayerHessian`) on ``num_grads`` calibration samples;
  no loss and no gradient is used (``layer_local``). Queries: ``inverse_diagonal`` (the
  diagonal of H̃⁻¹ repeated over rows), ``ihvp`` (V·H̃⁻¹ row by row).
* **Saliency and update** (the ``obs`` scorer): OBS on this curvature is OBC. Because the
  choice and the update interleave, the ``obs`` scorer asks the estimator for both
  (:meth:`obs_select`): ``algorithm = "sparsegpt"`` runs the column sweep with adaptive mask
  blocks (:func:`curvprune_sparsegpt.sparsegpt`), ``"exact"`` OBC's greedy removal
  (:func:`curvprune_sparsegpt.obc`). Other scorers (magnitude, wanda) ignore the estimator.
* **Mask** (the mask applier): ``layerwise`` gives the per-layer sparsity (the papers'
  uniform setting, with its ``overrides``), ``nm`` the N:M pattern. A ranking across layers
  (``global``) has no meaning for layer-output errors and is refused.
* **Schedule**: ``oneshot`` (or ``sequential``) with ``calibration = "auto"`` runs stage by
  stage, each stage calibrated on the outputs of the stages already pruned (the papers'
  sequential mode, :mod:`curvprune.pipeline.stages`).

**Under torch.distributed** the layers of a fit are split over the ranks (docs/distributed.md):

1. every layer has one owner rank (:meth:`SparseGPTEstimator.layer_owners`: greedy, balanced
   by the sweep's cost, :mod:`curvprune_sparsegpt.owners`), the same on every rank;
2. each rank accumulates Σxxᵀ of every layer on its slice of the calibration samples; one
   all-reduce shares the counts, and each layer's sum goes to its owner alone
   (:func:`curvprune.distributed.reduce_sum_to_`); the other ranks drop it;
3. the owner factors H̃ and sweeps the layer; one all-gather (:meth:`~SparseGPTEstimator._owned`)
   brings every layer's pruned weights, keep-mask and loss to every rank, so each rank returns
   the selection of one process. The queries work the same way: the owners compute their
   layers' pieces, which are all-gathered (every rank must call them alike).

One all-gather of the owners' pieces, not one broadcast per layer from its owner: a stage's
results travel in one collective whatever its number of layers, at the cost of padding every
rank's piece to the largest (the assignment balances cost, so the largest piece is at most
about the largest layer plus a 1/W share).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor, nn

from curvprune import (
    ConfigError,
    CurvatureEstimator,
    EstimatorConfig,
    LayerwiseMask,
    MaskApplier,
    NMMask,
    NumericalError,
    ParamLayout,
    Selection,
    distributed,
)
from curvprune_sparsegpt.hessian import InverseFactor, LayerHessian, inverse_factor
from curvprune_sparsegpt.masks import PruneResult
from curvprune_sparsegpt.obc import obc
from curvprune_sparsegpt.owners import balanced_owners, sweep_costs
from curvprune_sparsegpt.sweep import sparsegpt

__all__ = ["SparseGPTConfig", "SparseGPTEstimator"]


def _relative_damping(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 < value < 1e3:
        raise ValueError(f"{attribute.name} must be in (0, 1000), got {value}")


@attrs.frozen(kw_only=True)
class SparseGPTConfig(EstimatorConfig):
    """``[estimator] name = "sparsegpt"``.

    Attributes:
        damping: **relative** damping λ: H̃ = H + λ·mean(diag H)·I (SparseGPT's ``percdamp``,
            default 0.01). Raised ×10 (with a warning) while H̃ is not positive definite.
        num_grads: calibration samples (sequences) H is collected on (the papers: 128).
        algorithm: ``"sparsegpt"`` (the column sweep, SparseGPT Algorithm 1) or ``"exact"``
            (OBC's greedy OBS per row; O(rows·d³), for small layers and as ground truth).
        blocksize: columns of one lazy batch and one adaptive mask block (reference: 128).
        dtype: accumulation and factorization dtype (``float32``, the reference; ``float64``).
    """

    damping: float = attrs.field(default=0.01, converter=float, validator=_relative_damping)
    num_grads: int = attrs.field(default=128, validator=attrs.validators.ge(1))
    algorithm: Literal["sparsegpt", "exact"] = attrs.field(
        default="sparsegpt", validator=attrs.validators.in_(("sparsegpt", "exact"))
    )
    blocksize: int = attrs.field(default=128, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        if self.block_size is not None:
            raise ValueError(
                "block_size does not apply: every output row is a block with its layer's H"
            )


def _kind(module: nn.Module) -> str | None:
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    return None


def _to_matrix(piece: Tensor, kind: str) -> Tensor:
    """A parameter-shaped tensor (or ``[n, *shape]`` batch) as ``[..., rows, d_in]``."""
    if kind == "conv1d":
        return piece.transpose(-1, -2)
    if kind == "conv2d":
        return piece.flatten(-3)
    return piece


def _from_matrix(matrix: Tensor, kind: str, shape: torch.Size) -> Tensor:
    if kind == "conv1d":
        return matrix.transpose(-1, -2)
    return matrix.reshape(*matrix.shape[:-2], *shape)


def _matrix_shapes(layout: ParamLayout) -> Iterable[tuple[int, int]]:
    """``(rows, d_in)`` of every selected weight as the layer problem sees it."""
    for shape, kind in zip(layout.shapes, layout.module_types, strict=True):
        if kind == "Conv1D":
            yield int(shape[1]), int(shape[0])
        else:
            yield int(shape[0]), math.prod(int(x) for x in shape[1:])


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to 8, so that every piece of a gathered byte buffer starts at an
    offset its dtype can be viewed at."""
    return -(-nbytes // 8) * 8


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(item, device) for item in batch)
    return batch


def _cut(batch: Any, take: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[:take]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut(item, take) for item in batch)
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    raise ConfigError(f"cannot count the samples of a {type(batch).__name__} input @ data")


class SparseGPTEstimator(CurvatureEstimator):
    """Layer-wise OBS curvature: one damped Hessian H̃ per selected layer, shared by its rows."""

    fits_model: ClassVar[bool] = True
    layer_local: ClassVar[bool] = True
    prefers_sequential: ClassVar[bool] = True

    config: SparseGPTConfig

    def __init__(self, config: SparseGPTConfig | None = None) -> None:
        super().__init__(config or SparseGPTConfig())
        #: each layer's accumulator; after :meth:`fit`, None where another rank owns the layer
        self._hessians: list[LayerHessian | None] = []
        self._kinds: list[str] = []
        self._shapes: list[torch.Size] = []
        self._factors: dict[int, InverseFactor] = {}
        self._owners: list[int] = []
        self._counts: list[int] = []  # input vectors of each layer, over all ranks
        self._n = 0
        #: ½·tr(ΔW·H̃·ΔWᵀ) of each layer pruned by :meth:`obs_select` (the layer error).
        self.layer_losses: dict[str, float] = {}
        #: seconds this rank spent factoring and sweeping its own layers (the per-rank report)
        self.inner_seconds = 0.0

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Calibration samples H was collected on (over all ranks)."""
        return self._n

    def _setup(self) -> None:
        self._hessians, self._kinds, self._shapes, self._factors = [], [], [], {}
        self._owners, self._counts = [], []
        self._n = 0

    @classmethod
    def layer_owners(
        cls, layout: ParamLayout, config: EstimatorConfig, world: int
    ) -> list[int]:
        """Each layer's owner among ``world`` ranks: greedy, balanced by the cost of its sweep
        (``rows·d² + d³``, OBC-exact ``rows·d³``; :mod:`curvprune_sparsegpt.owners`)."""
        algorithm = getattr(config, "algorithm", "sparsegpt")
        return balanced_owners(sweep_costs(_matrix_shapes(layout), algorithm), world)

    def _update(self, grads: Tensor) -> None:
        raise self.unsupported(
            "update(grads)",
            "it builds layer Hessians from the layers' inputs with fit(model, batches)",
        )

    def fit(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        layout: ParamLayout,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Collect H = 2XXᵀ/n for every selected layer over ``num_grads`` samples.

        The loss is not used (layer-wise OBS needs only the layers' inputs). Under
        torch.distributed ``batches`` are this rank's slices of the samples: the counts are
        all-reduced and each layer's sum is reduced to the layer's owner
        (:meth:`layer_owners`), which then holds the H of one process.
        """
        self._require_setup("fit")
        modules = dict(model.named_modules())
        layers: list[nn.Module] = []
        self._setup()
        self._owners = type(self).layer_owners(layout, self.config, distributed.world_size())
        for name in layout.names:
            owner, _, leaf = name.rpartition(".")
            module = modules.get(owner)
            kind = _kind(module) if module is not None and leaf == "weight" else None
            if kind is None:
                raise ConfigError(
                    f"estimator 'sparsegpt' builds layer Hessians for the weights of Linear, "
                    f"Conv2d (groups = 1) and Conv1D layers, not {name!r} "
                    f"({type(module).__name__}); leave it out with prune.ignore @ prune.targets"
                )
            layers.append(module)
            self._kinds.append(kind)
            self._shapes.append(module.weight.shape)
            self._hessians.append(LayerHessian(module, dtype=self.dtype, device=self.device))
        handles = [
            layer.register_forward_pre_hook(
                lambda _, args, acc=acc: acc.add_batch(args[0].detach())
            )
            for layer, acc in zip(layers, self._hessians, strict=True)
        ]
        was_training = model.training
        model.eval()
        seen = 0
        try:
            with torch.no_grad():
                for batch in batches:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if seen >= self.num_grads:
                        break
                    n = _batch_size(x)
                    if seen + n > self.num_grads:
                        x, n = _cut(x, self.num_grads - seen), self.num_grads - seen
                    model(_move(x, self.device))
                    seen += n
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        self._reduce(seen)

    def _reduce(self, seen: int) -> None:
        """Share the counts with every rank and send each layer's Σxxᵀ to its owner.

        One all-reduce of the samples and of every layer's input vectors (every rank knows
        them all, so a layer no input reached is refused on every rank alike); then per layer
        one reduce of ``n_r·H_r`` (twice this rank's Σxxᵀ) to the owner, which divides by the
        total count: the running mean of one process, up to the summation order. The other
        ranks drop their H.
        """
        local = [0 if acc is None else acc.num_samples for acc in self._hessians]
        counts = torch.tensor([float(seen), *map(float, local)], dtype=torch.float64)
        distributed.all_reduce_sum_(counts)
        self._n = int(counts[0].item())
        self._counts = [int(c) for c in counts[1:].tolist()]
        if distributed.world_size() > 1:
            me = distributed.rank()
            for i, acc in enumerate(self._hessians):
                assert acc is not None  # fit has just made every one
                acc.hessian.mul_(acc.num_samples)
                distributed.reduce_sum_to_(acc.hessian, self._owners[i])
                if self._owners[i] == me:
                    acc.num_samples = self._counts[i]
                    acc.hessian.div_(max(acc.num_samples, 1))
                else:
                    self._hessians[i] = None
        if self._n == 0:
            raise ConfigError("estimator 'sparsegpt' got no calibration samples @ data")

    # -- queries ------------------------------------------------------------------------------
    def _factor(self, i: int) -> InverseFactor:
        if i not in self._factors:
            acc = self._hessians[i]
            if acc is None:
                raise RuntimeError(f"layer {i} is owned by rank {self._owners[i]}, not this one")
            self._factors[i] = inverse_factor(acc.hessian, percdamp=self.config.damping)
        return self._factors[i]

    def _require_fit(self, layers: Iterable[int] = ()) -> None:
        """Refuse a query before :meth:`fit`, or one about ``layers`` no input reached."""
        if len(self._hessians) != len(self.sizes) or len(self._counts) != len(self.sizes):
            raise self.unsupported("a query before fit(model, batches, ...)", "call fit first")
        for i in layers:
            if self._counts[i] == 0:
                raise ConfigError(
                    f"no calibration input reached the layer of {i}th selected parameter; it is "
                    "not used by the model's forward @ prune.targets"
                )

    def _owned(
        self,
        work: Callable[[int], tuple[Tensor, ...]],
        layers: Sequence[int],
        spec: Callable[[int], Sequence[tuple[tuple[int, ...], torch.dtype]]],
    ) -> dict[int, tuple[Tensor, ...]]:
        """``work(i)`` for this rank's layers among ``layers``, then every layer's on every rank.

        ``spec(i)``: the shapes and dtypes of ``work(i)``'s tensors, known to every rank. A
        failure on one owner is agreed on first (one tiny all-reduce) so that every rank raises
        instead of waiting for it; then one all-gather of the owners' tensors as raw bytes, in
        rank order and layer order within a rank (:func:`curvprune.distributed.all_gather_rows`).
        Every rank must call it alike; in one process it is ``work`` on every layer.
        """
        me = distributed.rank()
        local: dict[int, tuple[Tensor, ...]] = {}
        failure: Exception | None = None
        try:
            for i in layers:
                if self._owners[i] == me:
                    started = time.perf_counter()
                    local[i] = work(i)
                    self.inner_seconds += time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - raised below, once every rank knows
            failure = exc
        if distributed.any_rank(failure is not None):
            raise failure or NumericalError(
                "another rank failed on the layers it owns (estimator 'sparsegpt'); see its error"
            )
        world = distributed.world_size()
        if world == 1:
            return local
        order = sorted(layers, key=lambda i: (self._owners[i], i))
        sizes = {i: [math.prod(shape) * dtype.itemsize for shape, dtype in spec(i)] for i in order}
        counts = [sum(_aligned(n) for i in order if self._owners[i] == r for n in sizes[i])
                  for r in range(world)]
        mine: list[Tensor] = []
        for i in order:
            for t in local.pop(i, ()):
                raw = t.contiguous().reshape(-1).view(torch.uint8)
                mine += [raw, raw.new_zeros(_aligned(raw.numel()) - raw.numel())]
        device = mine[0].device if mine else self.device
        send = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.uint8, device=device)
        del mine
        every = distributed.all_gather_rows(send, counts)
        del send
        out: dict[int, tuple[Tensor, ...]] = {}
        at = 0
        for i in order:
            pieces = []
            for (shape, dtype), size in zip(spec(i), sizes[i], strict=True):
                pieces.append(every[at : at + size].view(dtype).reshape(shape))  # no copy
                at += _aligned(size)
            out[i] = tuple(pieces)
        return out

    def _inverse_diagonal(self) -> Tensor:
        """diag(H̃⁻¹) of each layer, repeated over its rows: ``Σ_k U_kj²`` for H̃⁻¹ = UᵀU."""
        layers = range(len(self.sizes))
        self._require_fit(layers)

        def piece(i: int) -> tuple[Tensor, ...]:
            kind, shape = self._kinds[i], self._shapes[i]
            diag = self._factor(i).upper.square().sum(0).to(self.dtype)
            rows = _to_matrix(torch.empty(shape, device="meta"), kind).shape[0]
            return (_from_matrix(diag.expand(rows, -1), kind, shape).reshape(-1),)

        pieces = self._owned(piece, layers, lambda i: [((self.sizes[i],), self.dtype)])
        return torch.cat([pieces[i][0] for i in layers])

    def _ihvp(self, v: Tensor) -> Tensor:
        """Row by row V·H̃⁻¹ (each row's block is its layer's H̃)."""
        layers = range(len(self.sizes))
        self._require_fit(layers)
        n = v.shape[0]
        parts = torch.split(v, list(self.sizes), dim=1)

        def solve(i: int) -> tuple[Tensor, ...]:
            kind, shape = self._kinds[i], self._shapes[i]
            upper = self._factor(i).upper.to(self.dtype)
            matrix = _to_matrix(parts[i].reshape(n, *shape), kind)
            solved = (matrix @ upper.t()) @ upper  # V·UᵀU
            return (_from_matrix(solved, kind, shape).reshape(n, -1).to(self.dtype),)

        out = self._owned(solve, layers, lambda i: [((n, self.sizes[i]), self.dtype)])
        return torch.cat([out[i][0] for i in layers], dim=1)

    def obs_select(
        self, weights: Tensor, mask: Tensor, layout: ParamLayout, applier: MaskApplier, level: float
    ) -> Selection | None:
        """SparseGPT's sweep (or OBC-exact) on every layer at the mask applier's rule.

        ``layerwise``: each layer loses the applier's count (``round(s·n)``, ``overrides`` and
        ``min_keep`` honoured), chosen over the whole layer (SparseGPT's reference; OBC's global
        selection) or, with the mask's ``scope = "row"``, ``round(s·d_in)`` in every output
        row; ``nm``: round(level·m)
        of every m inputs pruned. Weights pruned before stay pruned and count. Any other
        applier: None (refused earlier by :meth:`check_pipeline`). Under torch.distributed each
        rank sweeps the layers it owns and every rank gets every layer's result
        (:meth:`_owned`).
        """
        self._require_fit()
        scope = "layer"
        if isinstance(applier, LayerwiseMask):
            # the applier's own counts (round(s·n), min_keep, overrides) as fractions that the
            # sweep floors back to the same counts: per layer, or per output row
            scope = applier.config.scope
            if scope == "row":
                levels = [
                    min(round(s * r), r - applier.config.min_keep) / r
                    for s, r in zip(applier.layer_sparsities(level, layout),
                                    (self._row_length(i) for i in range(len(layout))), strict=True)
                ]
            else:
                counts = applier.layer_counts(level, layout)
                levels = [c / n for c, n in zip(counts, layout.sizes, strict=True)]
            prune_n = prune_m = 0
        elif isinstance(applier, NMMask):
            prune_m = applier.config.m
            prune_n = round(level * prune_m)
            levels = [None] * len(layout)
            applier.groups(layout)  # the applier's own one-line error for indivisible inputs
        else:
            return None
        # the layers with something to prune
        todo = [i for i, level_i in enumerate(levels)
                if (level_i != 0.0 if level_i is not None else prune_n != 0)]
        self._require_fit(todo)

        def sweep(i: int) -> tuple[Tensor, ...]:
            part = layout.slice(i)
            kind, shape = self._kinds[i], self._shapes[i]
            w = _to_matrix(weights[part].reshape(shape), kind)
            prior = _to_matrix(mask[part].reshape(shape), kind)
            order = None
            if prune_n and kind == "conv2d" and w.shape[1] != shape[1]:
                # The nm mask groups m input channels at one kernel position: sweep the columns
                # in (kh, kw, in) order so that each group is m consecutive columns.
                order = torch.arange(w.shape[1], device=w.device).view(shape[1], -1).t().reshape(-1)
                acc = self._hessians[i]
                assert acc is not None  # this rank owns layer i
                factor = inverse_factor(acc.hessian[order][:, order], percdamp=self.config.damping)
                w, prior = w[:, order], prior[:, order]
            else:
                factor = self._factor(i)
            result = self._prune_layer(w, factor, prior, levels[i], prune_n, prune_m, scope)
            pruned_w, kept = result.weight.to(weights.dtype), result.mask & prior
            if order is not None:
                back = torch.argsort(order)
                pruned_w, kept = pruned_w[:, back], kept[:, back]
            loss = torch.full((1,), math.nan, dtype=torch.float64, device=weights.device)
            if result.loss is not None:
                loss.fill_(float(result.loss.sum()))
            return (_from_matrix(pruned_w, kind, shape).reshape(-1).to(weights.device),
                    _from_matrix(kept, kind, shape).reshape(-1).to(weights.device), loss)

        results = self._owned(sweep, todo, lambda i: [
            ((layout.sizes[i],), weights.dtype), ((layout.sizes[i],), torch.bool),
            ((1,), torch.float64)])
        new_weights, keep = weights.clone(), mask.clone()
        for i in todo:
            part = layout.slice(i)
            new_weights[part], keep[part], loss = results.pop(i)
            if not math.isnan(float(loss)):
                self.layer_losses[layout.names[i]] = float(loss)
        return Selection(keep=keep, update=new_weights - weights)

    def _row_length(self, i: int) -> int:
        """d_in of selected layer i (the length of its output rows)."""
        shape = self._shapes[i]
        return int(shape[0]) if self._kinds[i] == "conv1d" else math.prod(int(x) for x in shape[1:])

    def _prune_layer(
        self,
        w: Tensor,
        factor: InverseFactor,
        prior: Tensor,
        sparsity: float | None,
        prune_n: int,
        prune_m: int,
        scope: Literal["layer", "row"],
    ) -> PruneResult:
        cfg = self.config
        if cfg.algorithm == "exact":
            return obc(w, factor, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m,
                       scope=scope, dtype=torch.float64)
        return sparsegpt(w, factor, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m,
                         blocksize=cfg.blocksize, scope=scope, prior=prior)

    # -- plan and validation ------------------------------------------------------------------
    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """Without shapes: a bound from the sizes (d_in ≤ size); see :meth:`plan_memory_bytes`."""
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        return sum(2 * s * s * itemsize for s in sizes)

    @classmethod
    def plan_memory_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """Peak while choosing and updating: H and its inverse factor (d_in² each) of every
        layer of ``layout``, the largest layer's factorization transient (the damped copy,
        the Cholesky factor, its triangular inverse and their flips: about 6·d_in², measured)
        and its sweep work (about two copies of the ``[rows, d_in]`` weight). With sequential
        calibration the pipeline asks for one stage's layout at a time."""
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        shapes = list(_matrix_shapes(layout))
        held = sum(2 * d_in * d_in for _, d_in in shapes)
        transient = max((6 * d_in * d_in for _, d_in in shapes), default=0)
        sweep = max((2 * rows * d_in for rows, d_in in shapes), default=0)
        return (held + transient + sweep) * itemsize

    @classmethod
    def plan_held_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """While calibration inputs stream through the layers: the Hessians alone."""
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        return sum(d_in * d_in for _, d_in in _matrix_shapes(layout)) * itemsize

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        return None

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Refuse masks that rank across layers or channels (layer errors are per layer)."""
        scorer, mask = components.get("scorer"), components.get("mask")
        if not getattr(scorer, "needs_curvature", False):
            return None
        if not isinstance(mask, (LayerwiseMask, NMMask)):
            return (
                "estimator 'sparsegpt' measures each layer's output error, which is not "
                "comparable across layers or channels: use mask layerwise or nm @ mask.name"
            )
        return None
