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

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvprune._progress import Progress
from curvprune.config import PipelineConfig, load_raw_config, structure_config
from curvprune.errors import ConfigError
from curvprune.pipeline.planning import Plan, make_plan, wants_example
from curvprune.pipeline.session import PruningSession
from curvprune.pipeline.stages import OneShotProgress
from curvprune.pipeline.steps import StepRunner
from curvprune.plugin.manager import PluginHost, get_plugin_manager
from curvprune.plugin.registry import KINDS
from curvprune.roles.estimator import CurvatureEstimator
from curvprune.roles.mask_applier import MaskApplier
from curvprune.roles.reports import PruneResult
from curvprune.roles.scheduler import Scheduler
from curvprune.roles.scorer import SaliencyScorer
from curvprune.structure.graph import StructureGraph
from curvprune.structure.removal import RemovalResult, remove_structures
from curvprune.tensors import distributed
from curvprune.tensors.gradients import LossFn
from curvprune.tensors.layout import ParamLayout, select_parameters
from curvprune.tensors.masks import MaskSet

__all__ = ["Pipeline"]


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
        example: Any = None,
        loss_fn: LossFn | None = None,
    ) -> Plan:
        """Memory and time needed to prune ``model``, computed before any compute.

        Under torch.distributed (or with ``world_size``) the memory is that of one rank.
        ``example`` (one ``(inputs, targets)`` batch of the data) lets the plan measure what
        sizes cannot tell: one gradient chunk's forward and backward pass, an estimator fit's
        passes over one batch (with ``loss_fn``, default cross entropy), or with sequential
        calibration the cached block inputs and one block's activations
        (:func:`~curvprune.pipeline.planning.wants_example`).
        """
        return make_plan(self, model, device=device, world_size=world_size, example=example,
                         loss_fn=loss_fn)

    # -- one-shot -------------------------------------------------------------------------------
    def prune(
        self,
        model: nn.Module,
        data: Iterable[Any] | None,
        loss_fn: LossFn | None = None,
        *,
        masks: MaskSet | None = None,
        progress: Progress | None = None,
        on_stage: Callable[[OneShotProgress], None] | None = None,
        resume: OneShotProgress | None = None,
    ) -> PruneResult:
        """Prune a trained model one-shot to ``[prune] sparsity``, in the schedule's sub-steps.

        Args:
            model: the model, pruned in place (on its own device).
            data: ``(inputs, targets)`` batches for gradients and the loss audit (a DataLoader;
                None only if the scorer needs no data and ``loss_samples = 0``).
            loss_fn: ``loss_fn(outputs, targets)``, mean over the batch (default cross entropy).
            masks: masks of an earlier pruning to continue from (default: nothing pruned yet).
            progress: where to show the steps and their gradient chunks (default: nowhere).
            on_stage: called with an :class:`~curvprune.pipeline.stages.OneShotProgress` (to
                checkpoint) after every step but the last, and with sequential calibration
                after every stage but a step's last.
            resume: continue from such a progress; ``model`` must hold the weights of that
                moment (``masks`` is then ignored).

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
        progress = progress or Progress(enabled=False)
        runner = StepRunner(self, model, data, loss_fn, masks, progress=progress)
        staged = self.schedule.staged_calibration(self.components)
        example = peek_batch(data) if wants_example(self) else None
        self.host.check_same_installs_across_ranks()
        self.plan(model, example=example, loss_fn=loss_fn).check()
        self.host.pipeline_start(self, model)
        target = self.config.prune.sparsity
        current = self.mask.achieved_sparsity(runner.masks.flat, runner.layout)
        snapshot = runner.layout.gather(model)
        gate_snapshot = runner.gate_parameters_snapshot()
        levels = list(self.schedule.levels(target, current))
        first = 0
        if resume is not None:
            levels, first = list(resume.levels), resume.level_index
            runner.resume_from(resume)
            if resume.rng is not None:  # after the set-up above drew from it
                torch.set_rng_state(resume.rng)
            generator = getattr(data, "generator", None)
            if resume.data_rng is not None and isinstance(generator, torch.Generator):
                generator.set_state(resume.data_rng)
        try:
            with progress.bar("pruning steps", len(levels)) as advance:
                for index, level in enumerate(levels):
                    if index < first:
                        advance()
                        continue
                    if on_stage is not None:
                        runner.on_stage = functools.partial(
                            _report_stage, on_stage, runner, levels, index)
                    runner.step(level)
                    if on_stage is not None and staged is None and index + 1 < len(levels):
                        on_stage(OneShotProgress(  # a step done: resumable from the next one
                            levels=levels, level_index=index + 1, stages_done=0,
                            masks=runner.masks.flat, reports=list(runner.reports),
                            rng=torch.get_rng_state(), data_rng=_data_rng(data),
                        ))
                    advance()
        except BaseException as exc:
            runner.layout.scatter_(model, snapshot)
            runner.restore_gate_parameters(gate_snapshot)
            lost = distributed.lost_peer(exc)  # a peer rank died inside a collective
            if lost is not None:
                raise lost from exc
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
            graph = StructureGraph.trace(model, heads_fallback=True)
            layout = layout.with_structures(graph.structures(layout))
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
        self.host.check_same_installs_across_ranks()
        self.plan(model).check()
        session = PruningSession(self, StepRunner(self, model, data, loss_fn, masks), optimizer)
        self.host.pipeline_start(self, model)
        return session


def _report_stage(
    on_stage: Callable[[OneShotProgress], None], runner: StepRunner, levels: list[float],
    index: int, stages_done: int, loss_before: float | None, times: dict[str, float],
) -> None:
    on_stage(OneShotProgress(
        levels=levels, level_index=index, stages_done=stages_done, masks=runner.masks.flat,
        reports=list(runner.reports), loss_before=loss_before, times=dict(times),
    ))


def _data_rng(data: Iterable[Any] | None) -> Tensor | None:
    """The state of ``data``'s own generator (a shuffling DataLoader's), if it has one."""
    generator = getattr(data, "generator", None)
    return generator.get_state() if isinstance(generator, torch.Generator) else None


def peek_batch(data: Iterable[Any] | None) -> Any:
    """The first batch of a re-iterable ``data`` (a DataLoader, a list), or None, leaving no trace.

    Iterating a shuffled DataLoader draws from its generator (or torch's global one): both are
    saved and restored, so the run that follows sees the batches it would have seen. A one-pass
    iterator is never peeked (that would consume its first batch).
    """
    if data is None or isinstance(data, Iterator):
        return None
    generator = getattr(data, "generator", None)
    saved = generator.get_state() if generator is not None else None
    global_state = torch.get_rng_state()
    try:
        return next(iter(data), None)
    finally:
        torch.set_rng_state(global_state)
        if generator is not None:
            generator.set_state(saved)
