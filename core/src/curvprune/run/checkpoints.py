"""Checkpoints of a run in progress, the partial run directory holding them, and resuming.

A run with ``[run] checkpoint_every = N`` (N > 0) keeps ``<out>/<name>.partial/`` while it runs:

* ``config.toml``: the resolved config, written before any compute; a resumed run reads its
  config from here, never from elsewhere;
* ``checkpoint.pt``: the latest checkpoint, replaced atomically (temporary file + rename) every N
  optimizer steps of a training loop that runs with a pruning session (gradual and GReg
  schedules, fine-tuning after one-shot pruning);
* ``.lock``: an advisory lock, so two processes never continue the same run.

When the run completes, its run directory ``<out>/<name>`` is written (atomically, see
:mod:`curvprune.run.execute`) and the partial folder is deleted. A run killed (SIGKILL, power loss)
or interrupted (Ctrl-C, SIGTERM) leaves the partial folder; ``curvprune run --resume
<out>/<name>.partial`` continues from its checkpoint and ends with the same masks and weights,
bit for bit on CPU, as the uninterrupted run. A run that fails with an error before writing a
checkpoint removes its partial folder (there is nothing to continue).

A checkpoint is one ``torch.save`` of a dict holding only tensors and plain values (``None``,
bool, int, float, str, lists, tuples, dicts), checked before writing, and it is read with
``torch.load(path, weights_only=True)``: a file carrying any other object is refused, never
unpickled. Keys (format ``curvprune.checkpoint/1``):

* ``format``, ``phase`` (which training loop: ``prune_and_finetune`` or ``finetune``),
  ``config_sha256`` (of ``config.toml``; a checkpoint of another config is refused),
  ``versions`` (python, torch), ``elapsed`` (seconds the phase had run);
* ``loop``: :class:`~curvprune.run.training.LoopState` (step, epoch, batch, epoch loss sum, base
  learning rates, the training loader's generator state at the start of the epoch);
* ``model``: the model's state dict; ``optimizer``: the optimizer's state dict;
* ``session``: :meth:`PruningSession.state_dict` (iteration, masks, schedule state, step
  reports). The curvature estimator has no state to keep: the pipeline re-fits it from fresh
  gradients at every pruning step, seeded by the step index;
* ``rng``: the torch CPU generator, every CUDA generator, and the generators of the loaders
  (``grad``: the gradient loader, which pruning steps draw from);
* ``extra``: what the run needs to finish its record (the one-shot steps and accuracies before
  fine-tuning).

A one-shot prune with sequential calibration (layer-wise methods) is checkpointed after every
stage when ``checkpoint_every > 0``: phase ``prune``, the model's state dict, the torch
generator and ``extra["oneshot"]`` (:class:`~curvprune.pipeline.stages.OneShotProgress`: the
levels, the step and stages done, the masks, the reports so far); no optimizer or session.
``--resume`` continues with the next stage and ends with the masks of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from curvprune._log import get_logger
from curvprune.config import unstructure_config
from curvprune.errors import CheckpointError, ConfigError, CurvpruneError, NumericalError
from curvprune.pipeline.pipeline import Pipeline
from curvprune.pipeline.stages import OneShotProgress
from curvprune.roles.reports import PruneResult, StepReport
from curvprune.run.checkpoint_files import (
    FORMAT,
    check_plain,
    load_checkpoint_file,
    read_weights_only,
    save_checkpoint,
)
from curvprune.run.partial import CHECKPOINT, PARTIAL_SUFFIX, PartialRun, sha256_of, unique_name
from curvprune.run.training import LoopState
from curvprune.structure.graph import attach_structures
from curvprune.tensors import distributed
from curvprune.tensors.masks import MaskSet

__all__ = [
    "CHECKPOINT",
    "PARTIAL_SUFFIX",
    "PartialRun",
    "FORMAT",
    "RunCheckpoints",
    "check_plain",
    "load_checkpoint_file",
    "read_weights_only",
    "save_checkpoint",
]


log = get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Checkpointing one run
# --------------------------------------------------------------------------------------------
def _flatten(raw: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(raw, dict):
        out: dict[str, Any] = {}
        for key, value in raw.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: raw}


def _config_difference(saved: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """The first dotted field where two unstructured configs differ (``run.progress`` ignored)."""
    a, b = _flatten(dict(saved)), _flatten(dict(given))
    for key in sorted(set(a) | set(b)):
        if key == "run.progress":
            continue
        if a.get(key) != b.get(key):
            return f"{key} (saved {a.get(key)!r}, given {b.get(key)!r})"
    return None


class RunCheckpoints:
    """The checkpoints of one :func:`curvprune.run.execute.execute_run` call.

    Use it as a context manager around the run. On success the partial folder is deleted (the
    run directory holds the results); on failure it is kept if it holds a checkpoint, if the run
    is a resumed one, or if the run was interrupted (KeyboardInterrupt, SystemExit), and removed
    otherwise.

    Args:
        resume: the partial folder of an interrupted run to continue, or None for a new run.
        on_save: called with the checkpoint's path after each checkpoint is written.
    """

    def __init__(
        self, resume: str | Path | None = None, on_save: Callable[[Path], None] | None = None
    ) -> None:
        # locked in start(), once torch.distributed is set up: only rank 0 holds it and writes
        self.partial: PartialRun | None = (
            PartialRun.open(resume, lock=False) if resume is not None else None
        )
        self.resumed = self.partial is not None
        self._writer = True
        self.on_save = on_save
        self.every = 0
        self._digest: str | None = None
        self._checkpoint: dict[str, Any] | None = None
        self._written = False
        self._phase_started = 0.0
        self._elapsed_before = 0.0

    # -- set-up ---------------------------------------------------------------------------------
    def source(self, given: str | Path | Mapping[str, Any] | None, host: Any = None) -> Any:
        """The config to run: ``given``, or for a resumed run its saved config.

        Raises:
            ConfigError: ``given`` differs from the interrupted run's config (naming the field).
        """
        if self.partial is None:
            return given
        if given is not None:

            saved_config = Pipeline.from_config(self.partial.config_path, host=host).config
            saved = unstructure_config(saved_config)
            other = unstructure_config(Pipeline.from_config(given, host=host).config)
            field = _config_difference(saved, other)
            if field is not None:
                raise ConfigError(
                    f"the config differs from the interrupted run's at {field}; resume without "
                    f"a config to use the saved one @ {field.split(' ', 1)[0]}"
                )
        return self.partial.config_path

    def start(
        self, every: int, out: Path, name: str, config_text: str, *, explicit: bool = False
    ) -> tuple[Path, str]:
        """Begin checkpointing (if ``every`` > 0); return the run's ``(out, name)``.

        A resumed run keeps its own folder and name and reads its checkpoint here. A generated
        ``name`` gets a suffix when taken; an ``explicit`` one (the user's) is used as given, and
        the partial folder's creation refuses it when taken.

        Raises:
            CheckpointError: the checkpoint of a resumed run is unreadable or of another config.
        """
        self.every = every
        self._writer = distributed.rank() == 0
        if self.partial is not None:
            failure: CurvpruneError | None = None
            try:  # every rank opens the checkpoint; rank 0 also takes the lock
                if self._writer:
                    self.partial.acquire()
                self._digest = sha256_of(self.partial.config_path)
                ckpt = None
                if self.partial.checkpoint_path.is_file():
                    ckpt = load_checkpoint_file(self.partial.checkpoint_path)
                    if ckpt["config_sha256"] != self._digest:
                        raise CheckpointError(
                            "checkpoint was written for another config.toml @ "
                            f"{self.partial.checkpoint_path}"
                        )
            except CurvpruneError as exc:
                failure = exc
            # agree before any rank goes on to a collective the failed one would never join
            if distributed.any_rank(failure is not None):
                raise failure or CheckpointError(
                    f"another rank could not resume {self.partial.path}; see its error"
                )
            if ckpt is not None:
                self._checkpoint = ckpt
                if ckpt.get("versions", {}).get("torch") != str(torch.__version__):
                    log.warning("checkpoint_versions_differ", saved=ckpt.get("versions"),
                                torch=torch.__version__)
            log.info("run_resumed", partial=str(self.partial.path),
                     phase=None if self._checkpoint is None else self._checkpoint["phase"])
            return self.partial.out, self.partial.name
        if every > 0 and self._writer:
            name = name if explicit else unique_name(out, name)
            self.partial = PartialRun.create(out, name, config_text)
            self._digest = sha256_of(self.partial.config_path)
            log.info("checkpointing", partial=str(self.partial.path), every=every)
        return out, name

    # -- phases ---------------------------------------------------------------------------------
    def resumes(self, phase: str) -> bool:
        """Whether the checkpoint being resumed is from training loop ``phase``."""
        return self._checkpoint is not None and self._checkpoint["phase"] == phase

    def resumed_from(self) -> dict[str, Any] | None:
        """``{"phase", "step"}`` of the checkpoint this run continued from, or None."""
        if self._checkpoint is None:
            return None
        return {"phase": self._checkpoint["phase"], "step": int(self._checkpoint["loop"]["step"])}

    def extra(self) -> dict[str, Any]:
        """The ``extra`` values of the checkpoint being resumed."""
        return dict(self._checkpoint.get("extra", {})) if self._checkpoint else {}

    @staticmethod
    def pruned_extra(
        result: PruneResult, seconds: float, accuracy: float | None, loss: float | None
    ) -> dict[str, Any]:
        """What a checkpoint of the fine-tuning after pruning keeps of the pruning itself.

        ``accuracy`` is the run's metric right after pruning (perplexity for text); the key keeps
        its name so that checkpoints written before metrics existed still resume.
        """
        return {
            "pruned": {
                "masks": result.masks.flat.detach().cpu().clone(),
                "extra_masks": {n: m.detach().cpu().clone() for n, m in result.masks.extra.items()},
                "steps": [s.to_dict() for s in result.steps],
                "seconds": float(seconds),
                "accuracy": accuracy,
                "loss": loss,
            }
        }

    def pruned(
        self, pipeline: Any, model: nn.Module
    ) -> tuple[PruneResult, float, float | None, float | None]:
        """The pruning a resumed fine-tuning followed: result, seconds, accuracy and loss.

        The saved masks are applied to ``model`` (its weights come from the checkpoint later).

        Raises:
            CheckpointError: the checkpoint has no pruning outcome, or masks of another shape.
        """
        assert self.partial is not None
        where = self.partial.checkpoint_path
        saved = self.extra().get("pruned")
        try:
            # the layout the pruning used: with channel structures when the mask prunes them
            layout = attach_structures(pipeline.mask, pipeline.select(model), model)
            masks = MaskSet(layout, saved["masks"].to(torch.bool), saved.get("extra_masks"))
            steps = [StepReport.from_dict(step) for step in saved["steps"]]
            seconds = float(saved["seconds"])
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise CheckpointError(
                f"checkpoint lacks the pruning outcome ({reason}) @ {where}"
            ) from None
        masks = masks.to(next(iter(layout.parameters(model))).device)
        masks.apply_(model)
        result = PruneResult(masks=masks, steps=steps, seconds=seconds)
        return result, seconds, saved.get("accuracy"), saved.get("loss")

    def phase(
        self,
        phase: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        session: Any,
        loaders: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[LoopState | None, Callable[[LoopState], None] | None]:
        """Restore a training loop from the checkpoint (if it is of ``phase``) and arm saving.

        Call it after building the optimizer and attaching the session, right before
        :func:`curvprune.run.training.train`, and pass what it returns as ``state`` and
        ``after_step``.

        Args:
            phase: the loop's name, stored in the checkpoint.
            model: the model being trained (its state dict is saved and restored).
            optimizer: its optimizer (state dict saved and restored).
            session: the :class:`~curvprune.pipeline.session.PruningSession` (masks, schedule state,
                step reports).
            loaders: loaders whose generators are saved (``train``: replayed per epoch through
                the loop state; others, e.g. ``grad``: saved as they are).
            extra: plain values the run needs after a resume (saved in every checkpoint).

        Raises:
            CheckpointError: the checkpoint does not fit the model or optimizer.
        """
        self._phase_started = time.perf_counter()
        self._elapsed_before = 0.0
        state = None
        if self.resumes(phase):
            state = self._restore(model, optimizer, session, loaders)
        if self.every <= 0 or (self.partial is None and self._writer):
            return state, None
        fixed = dict(extra or {})

        def after_step(loop: LoopState) -> None:
            if loop.step % self.every == 0:
                # every rank takes part in the check; only rank 0 writes
                if distributed.any_rank(not bool(torch.isfinite(loop.running))):
                    raise NumericalError(
                        f"the training loss became non-finite before optimizer step {loop.step}; "
                        "no checkpoint was written (the last one is kept); lower [finetune] lr"
                    )
                if self._writer and self.partial is not None:
                    self._save(phase, loop, model, optimizer, session, loaders, fixed)

        return state, after_step

    def oneshot(
        self, model: nn.Module
    ) -> tuple[OneShotProgress | None, Callable[[OneShotProgress], None] | None]:
        """Resume a one-shot prune interrupted between stages, and arm saving after each.

        With sequential calibration a one-shot prune runs stage by stage; with
        ``checkpoint_every > 0`` a checkpoint (phase ``prune``: the model's state dict and the
        :class:`OneShotProgress`) is written after every stage but a step's last, so
        ``--resume`` continues from the next stage with the masks an uninterrupted run gets.
        Pass what this returns as ``Pipeline.prune(resume=..., on_stage=...)``.

        Raises:
            CheckpointError: the checkpoint does not fit the model.
        """
        self._phase_started = time.perf_counter()
        self._elapsed_before = 0.0
        resume = None
        if self.resumes("prune"):
            ckpt = self._checkpoint
            assert ckpt is not None and self.partial is not None
            where = str(self.partial.checkpoint_path)
            try:
                model.load_state_dict(ckpt["model"])
                torch.set_rng_state(ckpt["rng"]["torch"])
            except (RuntimeError, KeyError, TypeError) as exc:
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                raise CheckpointError(
                    f"checkpoint does not fit this run ({reason}) @ {where}"
                ) from None
            resume = OneShotProgress.from_state_dict(ckpt["extra"]["oneshot"], where)
            self._elapsed_before = float(ckpt.get("elapsed", 0.0))
            log.info("checkpoint_restored", phase="prune", stage=resume.stages_done)
        if self.every <= 0 or self.partial is None or not self._writer:
            return resume, None

        def after_stage(progress: OneShotProgress) -> None:
            assert self.partial is not None
            state = {
                "format": FORMAT,
                "phase": "prune",
                "config_sha256": self._digest,
                "versions": {"python": platform.python_version(), "torch": str(torch.__version__)},
                "elapsed": self._elapsed_before + time.perf_counter() - self._phase_started,
                # what was done: the stages of the step in progress, or the steps before it
                "loop": {"step": int(progress.stages_done or progress.level_index),
                         "level": int(progress.level_index)},
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "rng": {"torch": torch.get_rng_state()},
                "extra": {"oneshot": progress.state_dict()},
            }
            save_checkpoint(self.partial.checkpoint_path, state)
            self._written = True
            log.info("checkpoint_saved", phase="prune", stage=progress.stages_done,
                     path=str(self.partial.checkpoint_path))
            if self.on_save is not None:
                self.on_save(self.partial.checkpoint_path)

        return resume, after_stage

    def elapsed_before(self) -> float:
        """Seconds the resumed phase had run before the interruption (0 for a new run)."""
        return self._elapsed_before

    def _restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, session: Any,
        loaders: Mapping[str, Any],
    ) -> LoopState:
        ckpt = self._checkpoint
        assert ckpt is not None and self.partial is not None
        where = self.partial.checkpoint_path
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            session.load_state_dict(ckpt["session"])
            rng = ckpt["rng"]
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            for key, gen_state in rng.get("loaders", {}).items():
                generator = getattr(loaders.get(key), "generator", None)
                if generator is not None:
                    generator.set_state(gen_state)
            loop = LoopState.from_state_dict(ckpt["loop"])
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise CheckpointError(
                f"checkpoint does not fit this run ({reason}) @ {where}"
            ) from None
        self._elapsed_before = float(ckpt.get("elapsed", 0.0))
        log.info("checkpoint_restored", phase=ckpt["phase"], step=loop.step)
        return loop

    def _save(
        self, phase: str, loop: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer,
        session: Any, loaders: Mapping[str, Any], extra: Mapping[str, Any],
    ) -> None:
        assert self.partial is not None
        generators = {
            key: loader.generator.get_state()
            for key, loader in loaders.items()
            if key != "train" and getattr(loader, "generator", None) is not None
        }
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {
            "format": FORMAT,
            "phase": phase,
            "config_sha256": self._digest,
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__)},
            "elapsed": self._elapsed_before + time.perf_counter() - self._phase_started,
            "loop": loop.state_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "session": session.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda, "loaders": generators},
            "extra": dict(extra),
        }
        save_checkpoint(self.partial.checkpoint_path, state)
        self._written = True
        log.info("checkpoint_saved", phase=phase, step=loop.step,
                 path=str(self.partial.checkpoint_path))
        if self.on_save is not None:
            self.on_save(self.partial.checkpoint_path)

    # -- the end --------------------------------------------------------------------------------
    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        partial = self.partial
        if partial is None:
            return
        if not self._writer:  # another rank's folder: rank 0 decides its fate
            return
        if kind is None:
            partial.remove()
            return
        interrupted = issubclass(kind, (KeyboardInterrupt, SystemExit))
        keep = self.resumed or self._written or interrupted or partial.checkpoint_path.is_file()
        if keep:
            partial.release()
            log.info("run_interrupted", partial=str(partial.path), resume=True)
        else:
            with contextlib.suppress(OSError):
                partial.remove()
