"""The pruning pipeline: built once from a config, then run one-shot or inside training.

:meth:`Pipeline.from_config` resolves every name in the registry, structures each component's
options, builds the components and checks that they can work together, all before any compute.
Then either

* :meth:`Pipeline.prune` prunes a trained model one-shot (``steps`` sub-steps, with the curvature
  recomputed from fresh gradients between them), or
* :meth:`Pipeline.attach` returns a :class:`PruningSession` for the user's own training loop:
  ``session.before_optimizer_step()`` before and ``session.step()`` after each optimizer step;
  the session keeps pruned weights at exactly zero and prunes when the schedule says so.

One pruning step: (gradients → estimator) → scores → new mask → compensating update → zero the
pruned weights. Plugin hooks run only around steps, never inside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvprune import distributed
from curvprune._log import get_logger
from curvprune.audit import SingleWeightAudit, audit_single_weights
from curvprune.config import PipelineConfig, load_raw_config, structure_config
from curvprune.errors import ConfigError, CurvpruneError, NumericalError
from curvprune.gradients import GradientSource, LossFn, default_loss
from curvprune.interfaces import (
    CurvatureEstimator,
    MaskApplier,
    PruneContext,
    SaliencyScorer,
    Scheduler,
)
from curvprune.layout import ParamLayout, select_parameters
from curvprune.masking import MaskSet
from curvprune.planning import Plan, make_plan
from curvprune.plugins import PluginHost, get_plugin_manager
from curvprune.registry import KINDS
from curvprune.removal import RemovalResult, remove_structures
from curvprune.report import PruneResult, StepReport
from curvprune.structures import StructureGraph, attach_structures

__all__ = ["Pipeline", "PruningSession"]

log = get_logger(__name__)

#: Rows of gradients per mini-batch when a scorer needs the mean gradient but there is no estimator.
_MEAN_GRAD_MINI_BATCH = 32


class Pipeline:
    """A validated combination of estimator, scorer, schedule and mask applier.

    Build it with :meth:`from_config`. Attributes ``estimator`` (or None), ``scorer``,
    ``schedule`` and ``mask`` are the built components; ``config`` the structured config.
    """

    def __init__(
        self,
        config: PipelineConfig,
        host: PluginHost,
        *,
        estimator: CurvatureEstimator | None,
        scorer: SaliencyScorer,
        schedule: Scheduler,
        mask: MaskApplier,
    ) -> None:
        self.config = config
        self.host = host
        self.estimator = estimator
        self.scorer = scorer
        self.schedule = schedule
        self.mask = mask
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, source: str | Path | Mapping[str, Any] | PipelineConfig, *, host: PluginHost | None = None
    ) -> Pipeline:
        """Build a pipeline from a TOML/JSON path, a dict, or a structured :class:`PipelineConfig`.

        ``[model]`` and ``[data]`` are optional here: the model and data are passed to
        :meth:`prune` or :meth:`attach`. ``[plugins] disable`` blocks plugins by name.

        Raises:
            ConfigError: every problem of the config, one line each, before any compute.
        """
        if isinstance(source, PipelineConfig):
            config = source
            host = host or get_plugin_manager(blocked=config.plugins.disable)
        else:
            raw = load_raw_config(source)
            if host is None:
                disable = raw.get("plugins", {}).get("disable", []) if isinstance(
                    raw.get("plugins"), Mapping) else []
                host = get_plugin_manager(blocked=[d for d in disable if isinstance(d, str)])
            config = structure_config(raw, host.registry)
        built: dict[str, Any] = {}
        for role in KINDS:
            spec = getattr(config, role)
            if spec is None:
                built[role] = None
                continue
            component = host.registry.get(role, spec.name)
            try:
                built[role] = component.factory(spec.config)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{KINDS[role].title} {spec.name!r} rejected its options: {exc} @ {role}") from exc
        return cls(config, host, **built)

    @property
    def components(self) -> dict[str, Any]:
        """The built components by role, plus ``prune`` (the :class:`PruneConfig`)."""
        return {
            "estimator": self.estimator,
            "scorer": self.scorer,
            "schedule": self.schedule,
            "mask": self.mask,
            "prune": self.config.prune,
        }

    def problems(self) -> list[str]:
        """Why these components cannot work together (empty when they can)."""
        cfg = self.config
        out: list[str] = []
        scorer_name = cfg.scorer.name
        if self.scorer.needs_curvature and self.estimator is None:
            names = ", ".join(self.host.registry.names("estimator")) or "none installed"
            out.append(
                f"scorer {scorer_name!r} needs a curvature estimator: add an [estimator] table "
                f"(installed: {names}) @ estimator"
            )
        if cfg.prune.audit_single and not cfg.prune.loss_samples:
            out.append(
                "the single-weight audit measures losses on the audit samples: set "
                "[prune] loss_samples > 0 or audit_single = 0 @ prune.audit_single"
            )
        if self.scorer.granularity != self.mask.granularity:
            unit = {"weight": "single weights", "channel": "channels"}
            out.append(
                f"scorer {scorer_name!r} scores {unit[self.scorer.granularity]} but mask "
                f"{cfg.mask.name!r} prunes {unit[self.mask.granularity]}; pick a "
                f"{self.scorer.granularity} mask applier"
                + (" ('channel')" if self.scorer.granularity == "channel" else " ('global')")
                + " @ mask.name"
            )
        for role in ("estimator", "scorer", "schedule", "mask"):
            component = getattr(self, role)
            reason = component.check_pipeline(self.components) if component is not None else None
            if reason and reason not in out:
                out.append(reason if " @ " in reason else f"{reason} @ {role}")
        return out

    def warnings(self) -> list[str]:
        """Valid but probably unintended combinations."""
        if self.estimator is not None and not (
            self.scorer.needs_curvature or self.scorer.needs_gradient
        ):
            return [
                f"estimator {self.config.estimator.name!r} is configured but scorer "  # type: ignore[union-attr]
                f"{self.config.scorer.name!r} does not use curvature; it will not run"
            ]
        return []

    # -- inspection -----------------------------------------------------------------------------
    def select(self, model: nn.Module) -> ParamLayout:
        """The parameters ``[prune] targets`` minus ``ignore`` select in ``model``."""
        return select_parameters(model, self.config.prune.targets, self.config.prune.ignore)

    def plan(
        self,
        model: nn.Module,
        *,
        device: torch.device | str | None = None,
        world_size: int | None = None,
    ) -> Plan:
        """Memory and time needed to prune ``model``, computed before any compute.

        Under torch.distributed (or with ``world_size``) the memory is that of one rank.
        """
        return make_plan(self, model, device=device, world_size=world_size)

    # -- one-shot -------------------------------------------------------------------------------
    def prune(
        self,
        model: nn.Module,
        data: Iterable[Any] | None,
        loss_fn: LossFn | None = None,
        *,
        masks: MaskSet | None = None,
    ) -> PruneResult:
        """Prune a trained model one-shot to ``[prune] sparsity``, in the schedule's sub-steps.

        Args:
            model: the model, pruned in place (on its own device).
            data: ``(inputs, targets)`` batches for gradients and the loss audit (a DataLoader;
                None only if the scorer needs no data and ``loss_samples = 0``).
            loss_fn: ``loss_fn(outputs, targets)``, mean over the batch (default cross entropy).
            masks: masks of an earlier pruning to continue from (default: nothing pruned yet).

        Returns:
            The masks and one :class:`StepReport` per sub-step.

        Raises:
            ConfigError: a schedule that prunes during training, or bad data.
            MemoryPlanError: the plan says the run does not fit (before any compute).
            NumericalError: non-finite gradients, losses or updates. The model is restored to
                its state before the call on any error.
        """
        if self.schedule.during_training:
            raise ConfigError(
                f"schedule {self.config.schedule.name!r} prunes during training: use "
                "pipeline.attach(model, optimizer, data=...) in a training loop (or "
                + ("`curvprune run`, which gives it a prune phase" if self.schedule.prune_phase
                   else "set [finetune] epochs for `curvprune run`")
                + ") @ schedule.name"
            )
        started = time.perf_counter()
        runner = _StepRunner(self, model, data, loss_fn, masks)
        self.plan(model).check()
        self.host.pipeline_start(self, model)
        target = self.config.prune.sparsity
        current = self.mask.achieved_sparsity(runner.masks.flat, runner.layout)
        snapshot = runner.layout.gather(model)
        gate_snapshot = runner.gate_parameters_snapshot()
        try:
            for level in self.schedule.levels(target, current):
                runner.step(level)
        except BaseException:
            runner.layout.scatter_(model, snapshot)
            runner.restore_gate_parameters(gate_snapshot)
            raise
        result = PruneResult(
            masks=runner.masks, steps=runner.reports, seconds=time.perf_counter() - started
        )
        self.host.pipeline_end(self, result)
        return result

    # -- physical removal -----------------------------------------------------------------------
    def remove(
        self, model: nn.Module, masks: MaskSet, *, example_input: Tensor | None = None
    ) -> RemovalResult:
        """Remove, in place, the channel structures that ``masks`` prunes entirely.

        A structure is removed when none of its weights is kept (what the ``channel`` mask
        produces). The model gets smaller parameters: rebuild any optimizer afterwards.

        Args:
            model: the pruned model (the one ``masks`` was made on).
            masks: masks of a channel pruning (:attr:`PruneResult.masks`).
            example_input: an input batch, to count FLOPs before and after (optional).

        Raises:
            UnsupportedModelError: the model cannot be traced or a pruned group cannot be
                removed (named); ConfigError: a group would lose every channel. The model is
                untouched on any error.
        """
        layout = masks.layout
        if layout.structures is None:
            layout = layout.with_structures(StructureGraph.trace(model).structures(layout))
        keep = layout.alive_structures(masks.flat.to(layout.structure_index().device))
        return remove_structures(model, layout.structures, keep, example_input=example_input)

    # -- during training ------------------------------------------------------------------------
    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        masks: MaskSet | None = None,
    ) -> PruningSession:
        """Start a session that prunes ``model`` during the user's training loop.

        Args:
            model: the model being trained.
            optimizer: its optimizer (pruned positions of its state are zeroed).
            data: batches for gradients when the scorer needs curvature (a DataLoader).
            loss_fn: loss for gradients and the audit (default cross entropy).
            masks: masks to hold from the start (e.g. from a one-shot :meth:`prune`).
        """
        scorer = self.scorer
        needs_data = scorer.needs_curvature or scorer.needs_gradient or scorer.needs_data
        if self.schedule.during_training and needs_data and data is None:
            raise ConfigError(
                f"schedule {self.config.schedule.name!r} will prune during training with scorer "
                f"{self.config.scorer.name!r}, which needs data: pass data=<DataLoader> to attach"
            )
        self.plan(model).check()
        session = PruningSession(self, _StepRunner(self, model, data, loss_fn, masks), optimizer)
        self.host.pipeline_start(self, model)
        return session


class PruningSession:
    """Prunes inside a training loop and keeps pruned weights at zero.

    Use it as::

        session = pipeline.attach(model, optimizer, data=loader)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            session.before_optimizer_step()
            optimizer.step()
            session.step()
        result = session.close()
    """

    def __init__(
        self, pipeline: Pipeline, runner: _StepRunner, optimizer: torch.optim.Optimizer
    ) -> None:
        self.pipeline = pipeline
        self._runner = runner
        self.optimizer = optimizer
        self.iteration = 0
        self._started = time.perf_counter()
        self._closed = False

    @property
    def masks(self) -> MaskSet:
        """The current masks."""
        return self._runner.masks

    @property
    def reports(self) -> list[StepReport]:
        """Reports of the pruning steps so far."""
        return self._runner.reports

    def before_optimizer_step(self) -> None:
        """Zero the gradients of pruned weights and let the schedule act (e.g. add a penalty)."""
        runner = self._runner
        runner.masks.mask_grads_(runner.model)
        self.pipeline.schedule.before_optimizer_step(self.iteration, runner.model, runner.layout)

    def step(self) -> StepReport | None:
        """After ``optimizer.step()``: re-zero pruned weights and state, prune if it is time.

        Returns:
            The report of the pruning step that ran, or None.
        """
        runner = self._runner
        runner.masks.apply_(runner.model)
        runner.masks.mask_optimizer_state_(self.optimizer, runner.model)
        level = self.pipeline.schedule.level_at(self.iteration, self.pipeline.config.prune.sparsity)
        report = None
        if level is not None:
            current = self.pipeline.mask.achieved_sparsity(runner.masks.flat, runner.layout)
            if level > current + 1e-12:
                report = runner.step(level, train_step=self.iteration)
                runner.masks.mask_optimizer_state_(self.optimizer, runner.model)
        self.iteration += 1
        return report

    def state_dict(self) -> dict[str, Any]:
        """Iteration, masks, schedule state and step reports, for checkpoints.

        Only tensors and plain values, so ``torch.load(..., weights_only=True)`` reads it back.
        The estimator has no state to save: the pipeline re-fits it from fresh gradients at every
        pruning step (``setup`` then ``update``), and seeds those gradients by the step index,
        which the reports' count restores.
        """
        return {
            "iteration": self.iteration,
            "masks": self._runner.masks.flat.clone(),
            "extra_masks": {n: m.clone() for n, m in self._runner.masks.extra.items()},
            "schedule": self.pipeline.schedule.state_dict(),
            "reports": [r.to_dict() for r in self._runner.reports],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output and re-apply the masks."""
        self.iteration = int(state["iteration"])
        flat = state["masks"].to(self._runner.masks.flat.device)
        extra = state.get("extra_masks", {})
        self._runner.masks = self._runner.gated(MaskSet(self._runner.layout, flat, extra))
        self.pipeline.schedule.load_state_dict(state["schedule"])
        if "reports" in state:
            self._runner.reports = [StepReport.from_dict(r) for r in state["reports"]]
        self._runner.masks.apply_(self._runner.model)

    def close(self) -> PruneResult:
        """Finish the session: call ``curvprune_pipeline_end`` and return the result."""
        result = PruneResult(
            masks=self._runner.masks,
            steps=self._runner.reports,
            seconds=time.perf_counter() - self._started,
        )
        if not self._closed:
            self._closed = True
            self.pipeline.host.pipeline_end(self.pipeline, result)
        return result

    def __enter__(self) -> PruningSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


class _StepRunner:
    """Runs pruning steps on one model: gradients, estimator, scores, masks, update, audit."""

    def __init__(
        self,
        pipeline: Pipeline,
        model: nn.Module,
        data: Iterable[Any] | None,
        loss_fn: LossFn | None,
        masks: MaskSet | None,
    ) -> None:
        self.pipeline = pipeline
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
        self.masks = self.gated(MaskSet(self.layout, masks.flat, masks.extra))
        self.masks.apply_(model)
        self.reports: list[StepReport] = []
        self._audit = _AuditSet(data, pipeline.config.prune.loss_samples, self.device)

    def step(self, level: float, *, train_step: int | None = None) -> StepReport:
        pipeline = self.pipeline
        scorer, estimator = pipeline.scorer, pipeline.estimator
        if (scorer.needs_curvature or scorer.needs_gradient or scorer.needs_data) and self.data is None:
            raise ConfigError(
                f"scorer {pipeline.config.scorer.name!r} needs data: pass batches of "
                "(inputs, targets) @ data"
            )
        index = len(self.reports)
        times: dict[str, float] = {}
        started = time.perf_counter()
        loss_before = self._audit.loss(self.model, self.loss_fn)
        mean_grad = None
        num_grads = 0
        tick = time.perf_counter()
        if scorer.needs_curvature or scorer.needs_gradient:
            mean_grad, num_grads = self._collect_gradients(index)
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
        chosen = pipeline.schedule.select(ctx)
        if chosen is None:
            scores = scorer.score(ctx)
            new_mask = pipeline.mask.select(scores, self.masks.flat, level, self.layout)
        else:  # the schedule owns the choice (GReg): no scores, no compensation
            new_mask = self.masks.flat & chosen.to(device=self.masks.flat.device, dtype=torch.bool)
        times["scores"] = time.perf_counter() - tick
        if new_mask.shape != self.masks.flat.shape or bool((new_mask & ~self.masks.flat).any()):
            raise NumericalError(
                f"mask applier {pipeline.config.mask.name!r} revived pruned weights or returned "
                "a mask of the wrong shape"
            )
        pruned = self.masks.flat & ~new_mask
        tick = time.perf_counter()
        delta = predicted = None
        if chosen is None:
            delta = scorer.compensate(ctx, pruned)
            predicted = scorer.predicted_loss_change(ctx, pruned)
        single = None
        if chosen is None and pipeline.config.prune.audit_single:
            audit_tick = time.perf_counter()
            single = self._single_weight_audit(ctx, index)
            times["audit"] = time.perf_counter() - audit_tick
            tick += times["audit"]
        weights = ctx.weights
        if delta is not None:
            if not bool(torch.isfinite(delta).all()):
                raise NumericalError(
                    f"the compensating update of scorer {pipeline.config.scorer.name!r} is not "
                    "finite; increase the estimator's damping or use dtype = 'float64'"
                )
            weights = weights + delta.to(weights.dtype)
        weights = weights * new_mask
        # Every rank must prune alike (the reduced estimator state is identical): verify with
        # exact fingerprints (one small all-gather) before touching the model.
        distributed.check_same_across_ranks((new_mask, weights), "the masks and pruned weights")
        self.layout.scatter_(self.model, weights)
        self.masks = self.gated(MaskSet(self.layout, new_mask, self.masks.extra))
        self.masks.apply_(self.model)
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
        )
        self.reports.append(report)
        log.info(
            "prune_step_completed", step=index, target=level, sparsity=report.sparsity,
            predicted=report.predicted_loss_change, measured=report.measured_loss_change,
        )
        pipeline.host.after_prune_step(pipeline, report)
        return report

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

    def gated(self, masks: MaskSet) -> MaskSet:
        """``masks`` plus the biases and BatchNorm γ, β of removed structures (exact gates)."""
        structures = self.layout.structures
        if structures is None:
            return masks
        keep = self.layout.alive_structures(masks.flat)
        return masks.with_extra(structures.gate_masks(keep))

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
        estimator = pipeline.estimator if pipeline.scorer.needs_curvature else None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(pipeline.config.run.seed * 1_000_003 + index)
        if estimator is not None and estimator.fits_model:
            estimator.setup(self.layout.sizes, device=self.device)
            estimator.fit(self.model, self.data, self.loss_fn, self.layout, generator=generator)  # type: ignore[arg-type]
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
        )
        # Under torch.distributed: "gather" estimators get every row on every rank (in the
        # single-process order); "sum" estimators and the mean see this rank's rows, then sum.
        gather = estimator is not None and estimator.reduction == "gather"
        failure: CurvpruneError | None = None
        try:
            for chunk in source.iter_grads(self.data, num_grads, gather=gather):  # type: ignore[arg-type]
                if estimator is not None:
                    try:
                        estimator.update(chunk)
                    except NumericalError:
                        source.check_finite()  # the source knows which parameter: say so
                        raise
                del chunk  # not alive while the next chunk is computed (see iter_grads)
        except CurvpruneError as exc:
            if not source.rows_are_local:
                raise  # every rank saw the same rows and fails the same way
            failure = exc  # only this rank's rows: agree with the others before raising
        if source.rows_are_local:
            if distributed.any_rank(failure is not None):
                raise failure or NumericalError(
                    "another rank failed while collecting gradients; see its error"
                )
            source.synchronize()
            if estimator is not None:
                estimator.all_reduce()
        source.check_finite()
        return source.mean(), num_grads


class _AuditSet:
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
