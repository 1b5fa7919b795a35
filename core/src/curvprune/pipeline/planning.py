"""``plan``: what a pruning run will select, hold and roughly cost, before any compute.

The plan counts the selected weights per layer, the estimator's blocks and the memory each part
of a pruning step holds at its peak:

* the estimator's peak (:meth:`CurvatureEstimator.plan_memory_bytes`, by default
  :meth:`~CurvatureEstimator.memory_bytes` of the sizes);
* one chunk of C gradient rows and its work space, C + max(C, U): the vectorised per-parameter
  gradients and the flattened rows exist together for a moment, then the rows and the
  estimator's update work U (:meth:`CurvatureEstimator.plan_update_bytes`, one copy of the rows
  by default); C + U where the closed form for ``nn.Linear`` models writes the rows directly
  (:mod:`curvprune.tensors.linear_rows`);
* a snapshot of the selected weights (restored if the step fails) and the masks, held
  throughout (``weights``);
* while answering, beside the estimator's peak, the d-vectors of scoring (``scoring``,
  :data:`SCORING_VECTORS`): the gathered weights, the scores, the mask's selection (sort-free,
  :mod:`curvprune.builtin.lowest`) and the update;
* the scorer's own state when it holds more than that (:meth:`SaliencyScorer.memory_bytes`,
  e.g. SOSP-I's S×S structure matrix).

Given one batch of the data (``example``; ``curvprune plan``, ``curvprune run`` and
``Pipeline.prune`` pass one), the gradient phase also counts the peak of one forward and
backward pass over one chunk's samples (``activations``): on a ResNet-50 at 224×224 with
8-row chunks that is about 1.5 GiB beside the rows, which a plan from sizes alone cannot see.

An estimator fitted on the model itself (``kfac``) makes no gradient rows: given one batch
(``example``, see :func:`wants_example`) the plan counts the samples its fit takes and the peak of
its fit's passes over that batch (:meth:`CurvatureEstimator.fit_passes`, ``activations``: for
K-FAC also the unfolded patches and the batch's covariances), beside the state held from earlier
batches (:meth:`~CurvatureEstimator.plan_held_bytes`, the factor sums) when the fit spans more
than one; without a batch it counts a gradient chunk as a stand-in.

A layer-local estimator (``sparsegpt``) is fitted from the layers' inputs, so no gradient rows
are counted; with sequential calibration it holds one stage's state at a time (the largest
stage is counted), and given one batch of the data (``example``) the plan also counts the
cached block inputs (``calibration``: samples × tokens × width) and one block's forward
activations (``activations``, measured by running that batch through the first block: they
stream beside the Hessians being accumulated, like gradient chunks beside an estimator).

The parts do not all peak together: gradients stream in while the estimator holds its
accumulating state (:meth:`CurvatureEstimator.plan_held_bytes`), and are freed before it
inverts or answers queries. :attr:`Plan.total_bytes` is therefore the weights and scorer state
plus the larger of the two phases, held + gradients and the estimator's peak
(``docs/benchmarks.md``, plan accuracy, has the measured peaks this model matches).

Under torch.distributed every number is per rank. A sharded estimator
(:mod:`curvprune.pipeline.sharding`) holds its share: the plan counts the rank with the largest
share, its own chunk of full rows, and the round of W chunks' columns it receives (``exchange``:
the send buffer, a copy of the chunk in rank order unless it is one row, and the received
columns); where the rows come in closed form (all-``nn.Linear`` models) the round's layer
inputs and output gradients travel instead, and one chunk's columns are formed at a time
(:mod:`curvprune.tensors.gradient_rounds`); scoring on the owners (:mod:`.owned`) holds four
vectors of the share, or the gathered weights beside one. Unsharded estimators hold all on every
rank, and those that gather rows (``reduction = "gather"``) a round of W gathered chunks
(``gathered``). A layer-local estimator that gives each layer of a stage one owner rank
(:meth:`~curvprune.CurvatureEstimator.layer_owners`, ``sparsegpt``) holds the whole stage's
sums while they accumulate (``estimator_held``), then only its own layers' state: the plan
counts the rank with the largest share, and the owners' results gathered on every rank
(``results``).

It refuses a run that needs more than the limit (``[run] memory_limit_gb``, else the memory
available on the device) with a message that names the biggest part and the knob that shrinks it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.errors import MemoryPlanError
from curvprune.pipeline.memprobe import peak_allocated, profiling
from curvprune.pipeline.owned import scores_on_owners, scoring_on_owners_bytes
from curvprune.pipeline.sharding import shards, share_layouts
from curvprune.pipeline.stages import SequentialCalibration, StagePlan, plan_stages
from curvprune.pipeline.view import PipelineView
from curvprune.tensors import distributed
from curvprune.tensors.gradients import LossFn, default_chunk_size, default_loss
from curvprune.tensors.layout import ParamLayout
from curvprune.tensors.linear_rows import linear_owners

__all__ = ["Plan", "available_memory", "make_plan", "wants_example"]

#: d-vectors (in the weights' dtype) a step holds while answering, beside the estimator's peak:
#: the gathered weights, the scores or the update with its right-hand side, the mask's
#: sort-free selection (keys, flags, an int32 count). Measured on MLPs of 0.8 M and 11 M
#: weights (global mask; magnitude, and OBS over diagfisher and mfac): 13–17 bytes per weight
#: beyond the snapshot, the masks and the estimator, docs/benchmarks.md "Plan accuracy".
SCORING_VECTORS = 4
_GiB = 2**30


@functools.lru_cache(maxsize=8)
def measured_flops_per_second(device: torch.device) -> float:
    """This machine's float32 matrix-multiply throughput on ``device``, measured once.

    The best of five 512×512 products (after one warm-up), with the current thread count: a
    step's flop estimate divided by it is a lower bound on its time (a Cholesky, a per-sample
    gradient or a Python loop runs below GEMM speed), good for an order of magnitude.
    """
    n = 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for i in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - tick)
    return 2.0 * n**3 / max(best, 1e-9)


@attrs.frozen(kw_only=True)
class Plan:
    """What a run will need.

    Attributes:
        layout: the selected parameters.
        estimator: the estimator's name (None without one).
        n_blocks: number of estimator blocks (None without a blocked estimator).
        block_width: their padded width.
        memory: bytes per part (``estimator``, ``gradients``, ``weights``, ...).
        estimator_held: bytes the estimator holds while gradients stream in (None: its whole
            peak, ``memory["estimator"]``).
        limit: bytes allowed; the run is refused above it.
        limit_source: where the limit comes from.
        flops: rough floating-point operations of one pruning step (None if unknown).
        flops_per_second: this machine's measured matrix-multiply rate on the device
            (:func:`measured_flops_per_second`; None when there is no flop estimate).
        device: the device type the estimate is for.
        hint: the knob that reduces the biggest part.
        world_size: the ranks the plan is for; ``memory`` is per rank.
    """

    layout: ParamLayout
    estimator: str | None
    n_blocks: int | None
    block_width: int | None
    memory: dict[str, int]
    limit: int
    limit_source: str
    flops: float | None
    device: str
    hint: str
    world_size: int = 1
    estimator_held: int | None = None
    flops_per_second: float | None = None

    @property
    def total_bytes(self) -> int:
        """The step's peak: the other parts plus the larger of the two estimator phases.

        Accumulating: the state held meanwhile plus the gradient chunk and its work (and a
        gathered round under torch.distributed); answering: the estimator's peak, the
        gradients freed, and the scoring's d-vectors (``scoring``).
        """
        parts = dict(self.memory)
        peak = parts.pop("estimator", 0)
        streaming = sum(parts.pop(k, 0) for k in ("gradients", "gathered", "exchange",
                                                  "activations"))
        scoring = parts.pop("scoring", 0)
        held = peak if self.estimator_held is None else min(self.estimator_held, peak)
        return sum(parts.values()) + max(held + streaming, peak + scoring)

    @property
    def fits(self) -> bool:
        """Whether the run fits under the limit."""
        return self.total_bytes <= self.limit

    @property
    def seconds(self) -> float | None:
        """A lower bound on one pruning step's time: its flops at the measured GEMM rate."""
        if self.flops is None or not self.flops_per_second:
            return None
        return self.flops / self.flops_per_second

    @property
    def time_class(self) -> str:
        """``seconds``, ``minutes`` or ``hours``: the order of magnitude of :attr:`seconds`."""
        seconds = self.seconds
        if seconds is None:
            return "unknown"
        return "seconds" if seconds < 60 else "minutes" if seconds < 3600 else "hours"

    def check(self) -> None:
        """Raise :class:`MemoryPlanError` if the run does not fit."""
        if self.fits:
            return
        part = max(self.memory, key=self.memory.__getitem__)
        raise MemoryPlanError(
            f"the run needs {self.total_bytes / _GiB:.2f} GiB ({part}: "
            f"{self.memory[part] / _GiB:.2f} GiB) but {self.limit / _GiB:.2f} GiB is available "
            f"({self.limit_source}); {self.hint}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "layers": [
                {"name": n, "shape": list(s), "numel": int(torch.Size(s).numel())}
                for n, s in zip(self.layout.names, self.layout.shapes, strict=True)
            ],
            "d": self.layout.d,
            "estimator": self.estimator,
            "n_blocks": self.n_blocks,
            "block_width": self.block_width,
            "memory_bytes": dict(self.memory),
            "total_bytes": self.total_bytes,
            "estimator_held_bytes": self.estimator_held,
            "limit_bytes": self.limit,
            "limit_source": self.limit_source,
            "fits": self.fits,
            "flops": self.flops,
            "flops_per_second": self.flops_per_second,
            "seconds": self.seconds,
            "time_class": self.time_class,
            "world_size": self.world_size,
            "memory_scope": "per rank",
        }


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes available on ``device`` and a phrase saying how that was measured."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable of this machine"
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")), "available physical memory"


def make_plan(
    pipeline: PipelineView,
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    world_size: int | None = None,
    example: Any = None,
    loss_fn: LossFn | None = None,
) -> Plan:
    """Build the :class:`Plan` for pruning ``model`` with ``pipeline`` (no compute).

    ``world_size`` (default: the current one, 1 outside torch.distributed) makes it the plan of
    one rank among that many; ``loss_fn`` (default cross entropy) is the loss an estimator
    fitted on the model is probed with on ``example``.
    """
    world = distributed.world_size() if world_size is None else max(1, int(world_size))
    layout = pipeline.select(model)
    if device is None:
        device = next(iter(layout.parameters(model))).device
    device = torch.device(device)
    d = layout.d
    itemsize = 4
    # held through the step: the snapshot of the selected weights (restored if the step fails),
    # the keep-mask and the gradient source's mask of pruned weights
    memory = {"weights": d * itemsize + 2 * d}
    estimator = pipeline.estimator if pipeline.scorer.needs_curvature else None
    name = pipeline.config.estimator.name if pipeline.config.estimator else None
    n_blocks = width = held = None
    flops = None
    hint = "select fewer parameters ([prune] targets/ignore)"
    staged = pipeline.schedule.staged_calibration(pipeline.components)
    if estimator is None or not estimator.layer_local:
        # answering only: the gathered weights, the scores, the mask's selection and the update
        memory["scoring"] = SCORING_VECTORS * d * itemsize
    if estimator is not None and estimator.layer_local:
        memory["weights"] = 3 * d * itemsize + d  # the layer-wise OBS holds its own scoring
        # fitted from the layers' inputs: no gradient rows; stage by stage, one stage's state
        cfg = estimator.config
        parts = [layout]
        if staged is not None:
            plan = plan_stages(model, layout, staged.stages)
            parts = [layout.subset(stage.indices) for stage in plan.stages]
            # the snapshot of the selected weights and two masks; one stage's weights, update
            # and result at a time
            memory["weights"] = 4 * d + 2 * d + 3 * itemsize * max(p.d for p in parts)
            samples = staged.num_samples or cfg.num_grads
            samples = -(-samples // world)  # each rank caches its slice of the samples
            memory.update(_calibration_probe(model, plan, example, samples, device))
        memory["estimator"] = max(max(_layer_shares(estimator, p, world)) for p in parts)
        if _owners(estimator, layout, world) is not None:  # layers split over the ranks: each
            # rank accumulates the whole stage's sums, then keeps (and factors) its own layers'
            held = max(int(type(estimator).plan_held_bytes(p, cfg)) for p in parts)
            memory["estimator"] = max(memory["estimator"], held)
            # the stage's pruned weights and masks from their owners: this rank's pieces, the
            # padded copy and the W received, their concatenation
            most = max(max(_owned_sizes(estimator, p, world)) for p in parts)
            memory["results"] = (itemsize + 1) * (
                (world + 2) * most + max(p.d for p in parts))
        n_blocks, width = len(layout), max(layout.sizes)
        hint = "select fewer parameters ([prune] targets/ignore), or use sequential calibration"
    elif estimator is not None:
        cfg = estimator.config
        memory["estimator"] = int(type(estimator).plan_memory_bytes(layout, cfg))
        blocks = layout.blocks(getattr(cfg, "block_size", None))
        n_blocks, width = blocks.n_blocks, blocks.width
        fit_probe: dict[str, int] = {}
        if estimator.fits_model:  # fitted on the model (K-FAC): one block per parameter
            n_blocks, width = len(layout), max(layout.sizes)
            loss = loss_fn or default_loss
            fit_probe = _fit_probe(model, example, cfg.num_grads, device, passes=functools.partial(
                estimator.fit_passes, model, loss_fn=loss, layout=layout))
        chunk = pipeline.config.prune.gradient_chunk
        rows = chunk if chunk is not None else default_chunk_size(d, cfg.fisher_mini_batch)
        if chunk is None and world > 1:  # as GradientSource balances chunks over the ranks
            rows = max(1, min(rows, -(-cfg.num_grads // world)))
        rows = min(rows, cfg.num_grads)
        update = int(type(estimator).plan_update_bytes(rows, layout, cfg))
        # vmap's per-parameter gradients exist next to the flat rows for a moment; the closed
        # form for nn.Linear models writes the rows directly (tensors/linear_rows.py)
        vectorised = 0 if linear_owners(model, layout) is not None else rows * d * itemsize
        memory["gradients"] = rows * d * itemsize + max(vectorised, update)
        if fit_probe:  # no gradient rows: the fit's samples and one batch's passes, measured
            memory["gradients"] = fit_probe["samples"]
            memory["activations"] = fit_probe["activations"]
        elif example is not None:  # the chunk's forward and backward pass, measured
            micro = pipeline.config.prune.gradient_micro_batch or cfg.fisher_mini_batch
            chunk_probe = _fit_probe(model, example, rows * min(micro, cfg.fisher_mini_batch),
                                     device)
            if chunk_probe:
                memory["activations"] = chunk_probe["activations"]
        held = int(type(estimator).plan_held_bytes(layout, cfg))
        if fit_probe and cfg.num_grads <= fit_probe["batch"]:
            held = 0  # one batch: its passes (measured) make the whole state
        sharded = world > 1 and shards(estimator, pipeline.config.prune.shard)
        if sharded:  # this rank's share (the largest), fed a round of W chunks' columns
            every_share = share_layouts(layout, estimator, world)
            share = max(every_share, key=lambda p: type(estimator).plan_memory_bytes(p, cfg))
            if scores_on_owners(pipeline) and all(p.d for p in every_share):
                widest = max(p.d for p in every_share)  # each rank scores its own columns
                memory["scoring"] = scoring_on_owners_bytes(d, widest, itemsize)
            memory["estimator"] = int(type(estimator).plan_memory_bytes(share, cfg))
            held = int(type(estimator).plan_held_bytes(share, cfg))
            received = world * rows
            update = int(type(estimator).plan_update_bytes(received, share, cfg))
            owners = linear_owners(model, layout)
            if owners is None:
                memory["gradients"] = rows * d * itemsize + max(vectorised, rows * d * itemsize)
                send = rows * d * itemsize if rows > 1 else 0  # the pieces, copied in rank order
                memory["exchange"] = send + received * share.d * itemsize + update
            else:  # closed form: each layer's x and g travel; one chunk's columns at a time
                per_row = 1 + cfg.fisher_mini_batch * sum(
                    m.in_features + m.out_features for m in dict.fromkeys(m for m, _ in owners)
                )
                memory["gradients"] = rows * per_row * itemsize
                update = int(type(estimator).plan_update_bytes(rows, share, cfg))
                gathered = 2 * received * per_row * itemsize  # padded pieces, concatenated
                memory["exchange"] = gathered + rows * share.d * itemsize + update
        if world > 1 and estimator.reduction == "gather" and not sharded:
            # a round of W chunks (+ a loss column): the padded pieces and their concatenation
            memory["gathered"] = 2 * world * rows * (d + 1) * itemsize
        flops = type(estimator).estimated_flops(share.sizes if sharded else layout.sizes, cfg)
        if flops is not None:
            # backward passes for the gradients: ~3 forward costs, ~2 flop per weight each
            params = sum(p.numel() for p in model.parameters())
            samples = cfg.num_grads * cfg.fisher_mini_batch / (world if sharded else 1)
            flops += 6.0 * params * samples
        hint = (
            f"lower block_size (now {getattr(cfg, 'block_size', None)}) or num_grads (now "
            f"{cfg.num_grads}) in [estimator], set [prune] gradient_chunk, or select fewer "
            "parameters"
        )
    scorer_bytes = int(pipeline.scorer.memory_bytes(model, layout))
    if scorer_bytes:  # a scorer with more than O(d) state (SOSP-I's S×S matrix)
        memory["scorer"] = scorer_bytes
        if scorer_bytes >= max(memory.values()):
            hint = f"scorer {pipeline.config.scorer.name!r}: {pipeline.scorer.memory_hint}"
    limit_gb = pipeline.config.run.memory_limit_gb
    if limit_gb is not None:
        limit, source = int(limit_gb * _GiB), "[run] memory_limit_gb"
    else:
        limit, source = available_memory(device)
    return Plan(
        layout=layout,
        estimator=name if estimator is not None else None,
        n_blocks=n_blocks,
        block_width=width,
        memory=memory,
        limit=limit,
        limit_source=source,
        flops=flops,
        device=device.type,
        hint=hint,
        world_size=world,
        estimator_held=held,
        flops_per_second=None if flops is None else measured_flops_per_second(device),
    )


def _owners(estimator: Any, layout: ParamLayout, world: int) -> list[int] | None:
    """Each parameter's owner rank if ``estimator`` splits ``layout``'s layers over ``world``
    ranks (:meth:`~curvprune.CurvatureEstimator.layer_owners`), else None."""
    if world <= 1:
        return None
    return type(estimator).layer_owners(layout, estimator.config, world)


def _layer_shares(estimator: Any, layout: ParamLayout, world: int) -> list[int]:
    """The estimator's planned peak on each rank owning part of ``layout`` (the whole
    layout's alone when its layers are not split over the ranks)."""
    kind, cfg = type(estimator), estimator.config
    owners = _owners(estimator, layout, world)
    if owners is None:
        return [int(kind.plan_memory_bytes(layout, cfg))]
    mine = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    return [int(kind.plan_memory_bytes(layout.subset(m), cfg)) for m in mine if m] or [0]


def _owned_sizes(estimator: Any, layout: ParamLayout, world: int) -> list[int]:
    """The weights each rank owns of ``layout`` (layers split over ``world`` ranks)."""
    owners = _owners(estimator, layout, world) or [0] * len(layout)
    return [sum(s for s, o in zip(layout.sizes, owners, strict=True) if o == r)
            for r in range(world)]


def wants_example(pipeline: PipelineView) -> bool:
    """Whether :func:`make_plan` measures part of the step on one batch of the data: with
    sequential calibration (the cached block inputs, one block's activations), for an
    estimator fitted on the model itself (K-FAC: its samples and one batch's passes), and for
    one fed gradient rows (the activations of one chunk's forward and backward pass)."""
    estimator = pipeline.estimator if pipeline.scorer.needs_curvature else None
    staged = pipeline.schedule.staged_calibration(pipeline.components) is not None
    # gradient rows: one chunk's forward and backward pass (its activations) beside the rows
    return staged or estimator is not None


def _fit_probe(model: nn.Module, example: Any, samples: int, device: torch.device,
               *, passes: Callable[[tuple[Tensor, Tensor]], None] | None = None) -> dict[str, int]:
    """The samples a step takes and one batch's passes over them, measured on ``example``.

    ``samples``: the ``samples`` inputs taken from the data (counted from the example's
    per-sample size); ``batch``: how many of them one batch holds; ``activations``: the peak of
    ``passes`` over the example batch (at most ``samples`` of it, as an ``(inputs, targets)``
    pair, the model in eval mode): an estimator's :meth:`~CurvatureEstimator.fit_passes`. By
    default (gradient rows, whose per-sample gradients the plan counts itself) one forward and
    backward pass over exactly ``samples`` inputs (a chunk's rows × ``fisher_mini_batch``; the
    example repeated when it is smaller), taken to a floating input, which runs through every
    layer without making the parameters' gradients. {} without an example, or on the CPU inside another profile (a CPU
    probe would end it); the plan then counts a gradient chunk in their place.
    """
    if example is None or (device.type != "cuda" and profiling()):
        return {}
    x = example[0] if isinstance(example, (tuple, list)) else example
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return {}
    n = min(int(x.shape[0]), samples)
    per_sample = x[0].numel() * x.element_size()
    x = x[:n].to(device)
    if passes is None and n < samples:
        # a chunk of rows regroups the data into rows × fisher_mini_batch samples whatever
        # the batch size: measure that many (the example repeated), not one batch
        x, n = x.repeat(-(-samples // n), *([1] * (x.dim() - 1)))[:samples], samples
    y = example[1] if isinstance(example, (tuple, list)) and len(example) > 1 else None
    if passes is not None and not isinstance(y, torch.Tensor):
        return {}
    was_training = model.training
    model.eval()

    def through_input() -> None:
        inputs = x.detach().requires_grad_() if x.is_floating_point() else x
        out = model(inputs)
        logits = getattr(out, "logits", out)
        if isinstance(logits, torch.Tensor) and logits.requires_grad and inputs.requires_grad:
            torch.autograd.grad(logits.float().sum(), [inputs], allow_unused=True)

    run = through_input if passes is None else functools.partial(passes, (x, y[:n].to(device)))
    try:
        _, activations = peak_allocated(run, device)
    finally:
        model.train(was_training)
    return {"samples": per_sample * samples, "batch": n, "activations": int(activations)}


@torch.no_grad()
def _calibration_probe(
    model: nn.Module, plan: StagePlan, example: Any, samples: int, device: torch.device
) -> dict[str, int]:
    """``calibration`` (the cached block inputs of ``samples`` samples) and ``activations`` (the
    tensors one block's forward holds on one batch), measured on ``example``; {} without one.

    Runs ``example`` to the first block's input (the capture, which stops there) and that block
    once, under :func:`curvprune.pipeline.memprobe.peak_allocated`. The model is not changed.
    """
    first = next((stage for stage in plan.stages if stage.block is not None), None)
    if example is None or first is None:
        return {}
    calibration = SequentialCalibration(model, plan, [example], 1 << 62, device)
    was_training = model.training
    model.eval()
    try:
        stage_model, batches = calibration.enter(first)
        entries = calibration.cache_entries()
        if not entries:
            return {}
        per_sample = sum(e.hidden.numel() * e.hidden.element_size() for e in entries) / sum(
            e.hidden.shape[0] for e in entries)
        out = {"calibration": int(per_sample * samples)}
        if device.type == "cuda" or not profiling():  # never nest a CPU profile in another
            x, _ = next(iter(batches()))
            _, activations = peak_allocated(lambda: stage_model(x), device)
            out["activations"] = int(activations)
    finally:
        model.train(was_training)
    return out
