"""One pruning step on one model: gradients → estimator → scores → mask → update → audit.

:class:`StepRunner` holds the model, its layout and masks for the whole run;
:meth:`StepRunner.step` is the body of every pruning step, whether :meth:`curvprune.Pipeline.prune`
runs it one-shot or a :class:`curvprune.PruningSession` runs it inside training. Plugin hooks run
only after a step, never inside it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvprune._log import get_logger
from curvprune._progress import Progress
from curvprune.errors import CheckpointError, ConfigError, CurvpruneError, NumericalError
from curvprune.pipeline.audit import SingleWeightAudit, audit_single_weights
from curvprune.pipeline.owned import on_owners, prune_on_owners
from curvprune.pipeline.rankstats import RankMeter
from curvprune.pipeline.sharding import ShardedEstimator, maybe_shard
from curvprune.pipeline.stages import OneShotProgress, SequentialCalibration, plan_stages
from curvprune.pipeline.view import PipelineView
from curvprune.roles.context import PruneContext
from curvprune.roles.reports import StepReport
from curvprune.roles.scheduler import StagedCalibration
from curvprune.structure.graph import attach_structures
from curvprune.tensors import distributed
from curvprune.tensors.gradients import GradientSource, LossFn, default_loss
from curvprune.tensors.masks import MaskSet

__all__ = ["AuditSet", "StepRunner"]

log = get_logger(__name__)

#: Rows of gradients per mini-batch when a scorer needs the mean gradient but there is no estimator.
_MEAN_GRAD_MINI_BATCH = 32


class StepRunner:
    """Runs pruning steps on one model: gradients, estimator, scores, masks, update, audit."""

    def __init__(
        self,
        pipeline: PipelineView,
        model: nn.Module,
        data: Iterable[Any] | None,
        loss_fn: LossFn | None,
        masks: MaskSet | None,
        *,
        progress: Progress | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.progress = progress or Progress(enabled=False)
        self.model = model
        self.data = data
        self.loss_fn = loss_fn or default_loss
        self.layout = attach_structures(pipeline.mask, pipeline.select(model), model)
        self.device = next(iter(self.layout.parameters(model))).device
        if masks is None:
            masks = MaskSet.dense(self.layout, self.device)
        elif masks.layout.names != self.layout.names:
            raise ConfigError("masks were made for other parameters than [prune] selects @ masks")
        masks = masks.to(self.device)
        self.masks = MaskSet(self.layout, masks.flat, masks.extra).with_structure_gates()
        self.masks.apply_(model)
        #: the estimator of whole-model steps: split over the ranks by weights when it can be
        self.estimator = maybe_shard(pipeline.estimator, pipeline.config.prune.shard)
        self.reports: list[StepReport] = []
        self._audit = AuditSet(data, pipeline.config.prune.loss_samples, self.device)
        #: called after every stage of a sequential step (``Pipeline.prune(on_stage=...)``)
        self.on_stage: Callable[[int, float | None, dict[str, float]], None] | None = None
        #: (stages done, loss before, times) of a sequential step being resumed
        self.resume_stage: tuple[int, float | None, dict[str, float]] | None = None

    def step(self, level: float, *, train_step: int | None = None) -> StepReport:
        pipeline = self.pipeline
        scorer, estimator = pipeline.scorer, self.estimator
        if (scorer.needs_curvature or scorer.needs_gradient or scorer.needs_data) and self.data is None:
            raise ConfigError(
                f"scorer {pipeline.config.scorer.name!r} needs data: pass batches of "
                "(inputs, targets) @ data"
            )
        staged = pipeline.schedule.staged_calibration(pipeline.components)
        if staged is not None:
            return self._staged_step(level, staged, train_step)
        index = len(self.reports)
        times: dict[str, float] = {}
        started = time.perf_counter()
        loss_before = self._audit.loss(self.model, self.loss_fn)
        mean_grad = None
        num_grads = 0
        tick = time.perf_counter()
        meter = RankMeter(self.device) if distributed.is_distributed() else None
        if scorer.needs_curvature or scorer.needs_gradient:
            with _phase(meter, "collect", "gradients") as inside:
                mean_grad, num_grads = self._collect_gradients(index)
                inside["curvature"] = self._curvature_seconds
        times["gradients"] = time.perf_counter() - tick
        ctx = PruneContext(
            model=self.model,
            layout=self.layout,
            weights=self.layout.gather(self.model),
            mask=self.masks.flat,
            target_sparsity=level,
            estimator=estimator if scorer.needs_curvature else None,
            mean_grad=mean_grad,
            batches=self._batches if self.data is not None else None,
            loss_fn=self.loss_fn,
            step=index,
        )
        tick = time.perf_counter()
        answer = _phase(meter, "answer", "scoring")
        inside = answer.__enter__()
        queried = getattr(estimator, "inner_seconds", 0.0)
        chosen = pipeline.schedule.select(ctx)
        owners = chosen is None and on_owners(pipeline, estimator)
        delta = None
        if owners:  # each rank scores, selects and updates its own columns (owned.py)
            del ctx  # the whole gathered vector is not needed there
            new_mask, predicted = prune_on_owners(
                pipeline, estimator, self.model, self.layout, self.masks.flat, level,
                mean_grad=mean_grad, batches=self._batches if self.data is not None else None,
                loss_fn=self.loss_fn, step=index,
            )
        elif chosen is None:
            new_mask, delta, predicted = self._decide(ctx, level)
        else:  # the schedule owns the choice (GReg): no scores, no compensation
            new_mask = self.masks.flat & chosen.to(device=self.masks.flat.device, dtype=torch.bool)
            predicted = None
        times["scores"] = time.perf_counter() - tick
        pruned = self.masks.flat & ~new_mask
        tick = time.perf_counter()
        single = None
        if chosen is None and not owners and pipeline.config.prune.audit_single:
            audit_tick = time.perf_counter()
            single = self._single_weight_audit(ctx, index)
            times["audit"] = time.perf_counter() - audit_tick
            tick += times["audit"]
        masks = self.masks.narrowed(new_mask)
        if owners:  # the weights are written and equal on every rank (all-gathered)
            masks.apply_(self.model)
        else:
            # in place: the gathered weights are not read again; two fewer d-vectors at the peak
            weights = self._updated(ctx.weights, delta).mul_(new_mask)
            del delta
            # Every rank must prune alike (the reduced estimator state is identical): verify
            # with exact fingerprints (one small all-gather) before touching the model.
            distributed.check_same_across_ranks((new_mask, weights), "the masks and pruned weights")
            masks.write_(self.model, weights)
        self.masks = masks
        inside["curvature"] = getattr(estimator, "inner_seconds", 0.0) - queried
        answer.__exit__(None, None, None)
        times["update"] = time.perf_counter() - tick
        loss_after = self._audit.loss(self.model, self.loss_fn)
        times["total"] = time.perf_counter() - started
        report = StepReport(
            step=index,
            target_sparsity=level,
            sparsity=self.masks.sparsity(),
            unit_sparsity=pipeline.mask.achieved_sparsity(new_mask, self.layout),
            per_layer=self.masks.per_layer_sparsity(),
            num_pruned=int(pruned.sum()),
            predicted_loss_change=None if predicted is None else float(predicted),
            loss_before=loss_before,
            loss_after=loss_after,
            num_grads=num_grads,
            times=times,
            train_step=train_step,
            single_audit=None if single is None else single.to_dict(),
            ranks=None if meter is None else meter.gather(),
        )
        return self._finish(report)

    def resume_from(self, progress: OneShotProgress) -> None:
        """Take over the masks and reports of an interrupted prune; the next sequential step
        skips the stages it had finished (:meth:`curvprune.Pipeline.prune`, ``resume``)."""
        if progress.masks.shape != self.masks.flat.shape:
            raise CheckpointError(
                f"the saved masks cover {progress.masks.numel()} weights, the model's selection "
                f"{self.layout.d} @ checkpoint"
            )
        self.masks = self.masks.narrowed(progress.masks.to(self.masks.flat.device))
        self.reports = list(progress.reports)
        if progress.stages_done:
            self.resume_stage = (progress.stages_done, progress.loss_before, dict(progress.times))

    def _finish(self, report: StepReport) -> StepReport:
        self.reports.append(report)
        log.info(
            "prune_step_completed", step=report.step, target=report.target_sparsity,
            sparsity=report.sparsity, predicted=report.predicted_loss_change,
            measured=report.measured_loss_change,
        )
        self.pipeline.host.after_prune_step(self.pipeline, report)
        return report

    def _staged_step(
        self, level: float, staged: StagedCalibration, train_step: int | None
    ) -> StepReport:
        """One step run stage by stage with sequential calibration (:mod:`.stages`).

        Each stage is pruned like a whole step restricted to its parameters (the estimator
        fitted on the stage's inputs, the scorer and the mask applier seeing only the stage),
        then written into the model before the next stage's inputs are computed. Predicted
        losses of layer-wise methods are in layer-output units, so the step has none.
        """
        pipeline = self.pipeline
        scorer = pipeline.scorer
        estimator = pipeline.estimator if scorer.needs_curvature else None
        index = len(self.reports)
        times = {"gradients": 0.0, "scores": 0.0, "update": 0.0}
        started = time.perf_counter()
        skip = 0
        if self.resume_stage is not None:  # continue a step interrupted between stages
            skip, loss_before, done = self.resume_stage
            self.resume_stage = None
            times.update({k: v for k, v in done.items() if k in times})
            started -= done.get("total", 0.0)
        else:
            loss_before = self._audit.loss(self.model, self.loss_fn)
        plan = plan_stages(self.model, self.layout, staged.stages)
        samples = staged.num_samples or (estimator.num_grads if estimator is not None else 128)
        calibration = SequentialCalibration(self.model, plan, self.data, samples, self.device)
        before = self.masks.flat
        was_training = self.model.training
        self.model.eval()
        num_samples = 0
        # per rank, summed over the stages: collect = the calibration forwards and the
        # estimator's fit (curvature), answer = the choice and the update (curvature: the
        # estimator's own work there, e.g. the layer sweeps this rank owns)
        meter = RankMeter(self.device) if distributed.is_distributed() else None
        try:
            with self.progress.bar(f"step {index + 1} stages", len(plan.stages)) as advance:
                for position, stage in enumerate(plan.stages):
                    if position < skip:
                        advance(1)
                        continue
                    tick = time.perf_counter()
                    with _phase(meter, "collect", "gradients") as inside:
                        stage_model, batches = calibration.enter(stage)
                        sub = self.layout.subset(stage.indices)
                        where = self.layout.subset_index(stage.indices, self.device)
                        if estimator is not None:
                            estimator.setup(sub.sizes, device=self.device)
                            generator = torch.Generator(device=self.device)
                            generator.manual_seed(pipeline.config.run.seed * 1_000_003 + index)
                            fitting = time.perf_counter()
                            estimator.fit(
                                stage_model, batches(), self.loss_fn, sub, generator=generator
                            )
                            inside["curvature"] = time.perf_counter() - fitting
                            num_samples = estimator.num_samples
                    times["gradients"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    with _phase(meter, "answer", "scoring") as inside:
                        queried = getattr(estimator, "inner_seconds", 0.0)
                        ctx = PruneContext(
                            model=stage_model, layout=sub, weights=sub.gather(self.model),
                            mask=self.masks.flat[where], target_sparsity=level,
                            estimator=estimator, batches=batches, loss_fn=self.loss_fn,
                            step=index,
                        )
                        keep, delta, _ = self._decide(ctx, level)
                        times["scores"] += time.perf_counter() - tick
                        tick = time.perf_counter()
                        weights = self._updated(ctx.weights, delta) * keep
                        distributed.check_same_across_ranks(
                            (keep, weights), f"the masks of {stage.label}"
                        )
                        flat = self.masks.flat.clone()
                        flat[where] = keep
                        sub.scatter_(self.model, weights)
                        self.masks = self.masks.narrowed(flat)
                        inside["curvature"] = getattr(estimator, "inner_seconds", 0.0) - queried
                    with _phase(meter, "collect", "gradients"):
                        calibration.leave(stage)  # the next stage's inputs
                    times["update"] += time.perf_counter() - tick
                    advance(1)
                    if self.on_stage is not None and position + 1 < len(plan.stages):
                        elapsed = {**times, "total": time.perf_counter() - started}
                        self.on_stage(position + 1, loss_before, elapsed)
        finally:
            self.model.train(was_training)
        self.masks.apply_(self.model)
        loss_after = self._audit.loss(self.model, self.loss_fn)
        times["total"] = time.perf_counter() - started
        report = StepReport(
            step=index,
            target_sparsity=level,
            sparsity=self.masks.sparsity(),
            unit_sparsity=pipeline.mask.achieved_sparsity(self.masks.flat, self.layout),
            per_layer=self.masks.per_layer_sparsity(),
            num_pruned=int((before & ~self.masks.flat).sum()),
            predicted_loss_change=None,
            loss_before=loss_before,
            loss_after=loss_after,
            num_grads=num_samples,
            times=times,
            train_step=train_step,
            ranks=None if meter is None else meter.gather(),
        )
        return self._finish(report)

    def _decide(
        self, ctx: PruneContext, level: float
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The new keep-mask, the update and the predicted loss change of one step (or stage).

        The scorer's joint :meth:`SaliencyScorer.select` if it has one, else scores → mask
        applier → compensation; checked before anything is written.
        """
        pipeline = self.pipeline
        scorer = pipeline.scorer
        joint = scorer.select(ctx, pipeline.mask, level)
        if joint is not None:
            new_mask, delta, predicted = joint.keep, joint.update, joint.predicted_loss_change
            new_mask = new_mask.to(device=ctx.mask.device, dtype=torch.bool)
        else:
            scores = scorer.score(ctx)
            new_mask = pipeline.mask.select(scores, ctx.mask, level, ctx.layout)
            del scores  # not alive while the update is computed
        if new_mask.shape != ctx.mask.shape or bool((new_mask & ~ctx.mask).any()):
            raise NumericalError(
                f"mask applier {pipeline.config.mask.name!r} (or scorer "
                f"{pipeline.config.scorer.name!r}) revived pruned weights or returned a mask "
                "of the wrong shape"
            )
        if joint is None:
            pruned = ctx.mask & ~new_mask
            delta = scorer.compensate(ctx, pruned)
            predicted = scorer.predicted_loss_change(ctx, pruned)
        return new_mask, delta, predicted

    def _updated(self, weights: Tensor, delta: Tensor | None) -> Tensor:
        """``weights + delta``, in place, refusing a non-finite update (``weights`` untouched)."""
        if delta is None:
            return weights
        if not bool(torch.isfinite(delta).all()):
            raise NumericalError(
                f"the compensating update of scorer {self.pipeline.config.scorer.name!r} is not "
                "finite; increase the estimator's damping or use dtype = 'float64'"
            )
        return weights.add_(delta.to(weights.dtype))

    def _batches(self, num_samples: int | None = None) -> Iterator[Any]:
        """``PruneContext.batches``: the data, as this rank's slice of every batch when
        distributed; ``num_samples`` (over all ranks) cuts it like one process would."""
        return distributed.shard(self.data, num_samples)  # type: ignore[arg-type]

    def gate_parameters_snapshot(self) -> dict[str, Tensor]:
        """Copies of the biases and BN γ, β that structure masks zero (restored on errors)."""
        structures = self.layout.structures
        if structures is None:
            return {}
        names = structures.gate_masks(torch.ones(structures.n_structures, dtype=torch.bool))
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().clone() for n in names if n in params}

    def restore_gate_parameters(self, snapshot: Mapping[str, Tensor]) -> None:
        """Write back :meth:`gate_parameters_snapshot` output."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)

    def _single_weight_audit(self, ctx: PruneContext, index: int) -> SingleWeightAudit | None:
        """Predicted vs measured change of removing single sampled weights (before the step)."""
        generator = torch.Generator()
        generator.manual_seed(self.pipeline.config.run.seed * 1_000_003 + index + 7919)
        return audit_single_weights(
            ctx, self.pipeline.scorer, self._audit.batches,
            self.pipeline.config.prune.audit_single, generator,
        )

    def _collect_gradients(self, index: int) -> tuple[Tensor | None, int]:
        """Feed ``num_grads`` gradients to the estimator; return their mean and count.

        An estimator with ``fits_model`` (K-FAC) fits itself on the model and data instead;
        the mean gradient is then computed only if the scorer needs it (else None).
        """
        pipeline = self.pipeline
        estimator = self.estimator if pipeline.scorer.needs_curvature else None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(pipeline.config.run.seed * 1_000_003 + index)
        self._curvature_seconds = 0.0  # time inside the estimator (per-rank report)
        if estimator is not None and estimator.fits_model:
            estimator.setup(self.layout.sizes, device=self.device)
            tick = time.perf_counter()
            data = self.data
            if estimator.layer_local and distributed.is_distributed():
                data = self._batches(estimator.num_grads)  # its sums add up over the ranks
            estimator.fit(self.model, data, self.loss_fn, self.layout, generator=generator)  # type: ignore[arg-type]
            self._curvature_seconds = time.perf_counter() - tick
            if not pipeline.scorer.needs_gradient:
                return None, estimator.num_samples
            estimator = None  # the mean gradient alone, from mini-batches below
        if estimator is not None:
            cfg = estimator.config
            num_grads, mini_batch, fisher = estimator.num_grads, cfg.fisher_mini_batch, cfg.fisher
            estimator.setup(self.layout.sizes, device=self.device)
        else:  # only the mean gradient is needed
            samples = max(pipeline.config.prune.loss_samples, _MEAN_GRAD_MINI_BATCH)
            num_grads, mini_batch, fisher = max(1, samples // _MEAN_GRAD_MINI_BATCH), _MEAN_GRAD_MINI_BATCH, "empirical"
        source = GradientSource(
            self.model,
            self.layout,
            self.loss_fn,
            fisher_mini_batch=mini_batch,
            fisher=fisher,  # type: ignore[arg-type]
            mask=self.masks.flat,
            chunk_size=pipeline.config.prune.gradient_chunk,
            generator=generator,
            micro_batch=pipeline.config.prune.gradient_micro_batch,
        )
        # Under torch.distributed: "gather" estimators get every row on every rank (in the
        # single-process order); "sum" estimators and the mean see this rank's rows, then sum.
        # A sharded estimator gets this rank's columns of every row (one all-to-all per round).
        sharded = isinstance(estimator, ShardedEstimator)
        gather = estimator is not None and estimator.reduction == "gather" and not sharded
        columns = estimator.bounds if sharded else None  # type: ignore[union-attr]
        failure: CurvpruneError | None = None
        # this rank's rows only when they are local (about num_grads / W of them)
        total = num_grads if gather or sharded or distributed.world_size() == 1 else None
        try:
            with self.progress.bar(f"step {index + 1} gradients", total) as advance:
                chunks = source.iter_grads(self.data, num_grads, gather=gather, columns=columns)  # type: ignore[arg-type]
                for chunk in chunks:
                    if estimator is not None:
                        tick = time.perf_counter()
                        try:
                            estimator.update(chunk)
                        except NumericalError as exc:
                            if sharded:  # other ranks are in the next exchange: stop them too
                                failure = exc
                            else:
                                source.check_finite()  # the source knows which parameter: say so
                                raise
                        self._curvature_seconds += time.perf_counter() - tick
                        if sharded and distributed.any_rank(failure is not None):
                            source.synchronize()
                            source.check_finite()
                            raise failure or NumericalError(
                                "another rank's share of the curvature failed; see its error"
                            )
                    advance(chunk.shape[0])
                    del chunk  # not alive while the next chunk is computed (see iter_grads)
        except CurvpruneError as exc:
            if not source.rows_are_local or sharded:
                raise  # every rank saw the same rows (or agreed above) and fails the same way
            failure = exc  # only this rank's rows: agree with the others before raising
        if source.rows_are_local:
            if distributed.any_rank(failure is not None):
                raise failure or NumericalError(
                    "another rank failed while collecting gradients; see its error"
                )
            source.synchronize()
            if estimator is not None and not sharded:
                estimator.all_reduce()
        source.check_finite()
        # the mean gradient is a d-vector held through scoring: only for scorers that read it
        return (source.mean() if pipeline.scorer.needs_gradient else None), num_grads


class AuditSet:
    """A fixed set of samples on which each step's actual loss change is measured."""

    def __init__(self, data: Iterable[Any] | None, samples: int, device: torch.device) -> None:
        self.batches: list[tuple[Any, Tensor]] = []
        if data is None or samples <= 0:
            return
        have = 0
        for batch in data:
            x, y = batch[0], batch[1]
            take = min(samples - have, x.shape[0])
            self.batches.append((x[:take].to(device), y[:take].to(device)))
            have += take
            if have >= samples:
                break

    def loss(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> float | None:
        """Mean loss over the audit samples; under torch.distributed each rank evaluates its
        slice of every batch and the sums are all-reduced (``loss_fn`` must be a mean over the
        batch, so slice mean × slice size is the slice's sum)."""
        if not self.batches:
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = self.batches[0][1].device
                sums = torch.zeros(2, dtype=torch.float64, device=device)
                for x, y in distributed.shard(self.batches):
                    if y.shape[0]:
                        sums[0] += loss_fn(model(x), y).double() * y.shape[0]
                        sums[1] += y.shape[0]
                distributed.all_reduce_sum_(sums)
                value = float(sums[0] / sums[1])
        finally:
            model.train(was_training)
        if value != value or value in (float("inf"), float("-inf")):
            raise NumericalError("the loss is not finite on the audit samples; check the model and inputs")
        return value


def _phase(meter: RankMeter | None, name: str, rest: str) -> Any:
    """``meter.phase(name, rest)``, or a context giving a scratch dict when not distributed."""
    if meter is None:
        return contextlib.nullcontext({"curvature": 0.0})
    return meter.phase(name, rest)
