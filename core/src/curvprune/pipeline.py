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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvprune._log import get_logger
from curvprune.config import PipelineConfig, load_raw_config, structure_config
from curvprune.errors import ConfigError, NumericalError
from curvprune.gradients import GradientSource, LossFn, default_loss
from curvprune.interfaces import CurvatureEstimator, MaskApplier, PruneContext, SaliencyScorer, Scheduler
from curvprune.layout import ParamLayout, select_parameters
from curvprune.masking import MaskSet
from curvprune.planning import Plan, make_plan
from curvprune.plugins import PluginHost, get_plugin_manager
from curvprune.registry import KINDS
from curvprune.report import PruneResult, StepReport

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

    def plan(self, model: nn.Module, *, device: torch.device | str | None = None) -> Plan:
        """Memory and time needed to prune ``model``, computed before any compute."""
        return make_plan(self, model, device=device)

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
                "pipeline.attach(model, optimizer, data=...) in a training loop (or set "
                "[finetune] epochs for `curvprune run`) @ schedule.name"
            )
        started = time.perf_counter()
        runner = _StepRunner(self, model, data, loss_fn, masks)
        self.plan(model).check()
        self.host.pipeline_start(self, model)
        target = self.config.prune.sparsity
        current = self.mask.achieved_sparsity(runner.masks.flat, runner.layout)
        snapshot = runner.layout.gather(model)
        try:
            for level in self.schedule.levels(target, current):
                runner.step(level)
        except BaseException:
            runner.layout.scatter_(model, snapshot)
            raise
        result = PruneResult(
            masks=runner.masks, steps=runner.reports, seconds=time.perf_counter() - started
        )
        self.host.pipeline_end(self, result)
        return result

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
        """Iteration, masks and schedule state, for checkpoints."""
        return {
            "iteration": self.iteration,
            "masks": self._runner.masks.flat.clone(),
            "schedule": self.pipeline.schedule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output and re-apply the masks."""
        self.iteration = int(state["iteration"])
        flat = state["masks"].to(self._runner.masks.flat.device)
        self._runner.masks = MaskSet(self._runner.layout, flat)
        self.pipeline.schedule.load_state_dict(state["schedule"])
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
        self.layout = pipeline.select(model)
        self.device = next(iter(self.layout.parameters(model))).device
        if masks is None:
            masks = MaskSet.dense(self.layout, self.device)
        elif masks.layout.names != self.layout.names:
            raise ConfigError("masks were made for other parameters than [prune] selects @ masks")
        self.masks = masks.to(self.device)
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
            batches=(lambda: iter(self.data)) if self.data is not None else None,  # type: ignore[arg-type]
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
        weights = ctx.weights
        if delta is not None:
            if not bool(torch.isfinite(delta).all()):
                raise NumericalError(
                    f"the compensating update of scorer {pipeline.config.scorer.name!r} is not "
                    "finite; increase the estimator's damping or use dtype = 'float64'"
                )
            weights = weights + delta.to(weights.dtype)
        weights = weights * new_mask
        self.layout.scatter_(self.model, weights)
        self.masks = MaskSet(self.layout, new_mask)
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
        )
        self.reports.append(report)
        log.info(
            "prune_step_completed", step=index, target=level, sparsity=report.sparsity,
            predicted=report.predicted_loss_change, measured=report.measured_loss_change,
        )
        pipeline.host.after_prune_step(pipeline, report)
        return report

    def _collect_gradients(self, index: int) -> tuple[Tensor, int]:
        """Feed ``num_grads`` gradients to the estimator; return their mean and count."""
        pipeline = self.pipeline
        estimator = pipeline.estimator if pipeline.scorer.needs_curvature else None
        if estimator is not None:
            cfg = estimator.config
            num_grads, mini_batch, fisher = estimator.num_grads, cfg.fisher_mini_batch, cfg.fisher
            estimator.setup(self.layout.sizes, device=self.device)
        else:  # only the mean gradient is needed
            samples = max(pipeline.config.prune.loss_samples, _MEAN_GRAD_MINI_BATCH)
            num_grads, mini_batch, fisher = max(1, samples // _MEAN_GRAD_MINI_BATCH), _MEAN_GRAD_MINI_BATCH, "empirical"
        generator = torch.Generator(device=self.device)
        generator.manual_seed(pipeline.config.run.seed * 1_000_003 + index)
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
        for chunk in source.iter_grads(self.data, num_grads):  # type: ignore[arg-type]
            if estimator is not None:
                try:
                    estimator.update(chunk)
                except NumericalError:
                    source.check_finite()  # the source knows which parameter: say so
                    raise
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
        if not self.batches:
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                total = sum(
                    loss_fn(model(x), y).double() * x.shape[0] for x, y in self.batches
                )
                count = sum(x.shape[0] for x, _ in self.batches)
                value = float(total / count)
        finally:
            model.train(was_training)
        if value != value or value in (float("inf"), float("-inf")):
            raise NumericalError("the loss is not finite on the audit samples; check the model and inputs")
        return value
