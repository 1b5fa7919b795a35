"""Checkpoints of a run in progress, the partial run directory holding them, and resuming.

A run with ``[run] checkpoint_every = N`` (N > 0) keeps ``<out>/<name>.partial/`` while it runs:

* ``config.toml``: the resolved config, written before any compute; a resumed run reads its
  config from here, never from elsewhere;
* ``checkpoint.pt``: the latest checkpoint, replaced atomically (temporary file + rename) every N
  optimizer steps of a training loop that runs with a pruning session (gradual and GReg
  schedules, fine-tuning after one-shot pruning);
* ``.lock``: an advisory lock, so two processes never continue the same run.

When the run completes, its run directory ``<out>/<name>`` is written (atomically, see
:mod:`curvprune.runs`) and the partial folder is deleted. A run killed (SIGKILL, power loss)
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
* ``loop``: :class:`~curvprune.training.LoopState` (step, epoch, batch, epoch loss sum, base
  learning rates, the training loader's generator state at the start of the epoch);
* ``model``: the model's state dict; ``optimizer``: the optimizer's state dict;
* ``session``: :meth:`PruningSession.state_dict` (iteration, masks, schedule state, step
  reports). The curvature estimator has no state to keep: the pipeline re-fits it from fresh
  gradients at every pruning step, seeded by the step index;
* ``rng``: the torch CPU generator, every CUDA generator, and the generators of the loaders
  (``grad``: the gradient loader, which pruning steps draw from);
* ``extra``: what the run needs to finish its record (the one-shot steps and accuracies before
  fine-tuning).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from curvprune import distributed
from curvprune._log import get_logger
from curvprune.errors import CheckpointError, ConfigError, CurvpruneError, NumericalError
from curvprune.masking import MaskSet
from curvprune.report import PruneResult, StepReport
from curvprune.structures import attach_structures
from curvprune.training import LoopState

__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "PARTIAL_SUFFIX",
    "PartialRun",
    "RunCheckpoints",
    "check_plain",
    "load_checkpoint_file",
    "read_weights_only",
    "save_checkpoint",
]

FORMAT = "curvprune.checkpoint/1"
CHECKPOINT = "checkpoint.pt"
PARTIAL_SUFFIX = ".partial"
_REQUIRED = ("format", "phase", "config_sha256", "loop", "model", "optimizer", "session", "rng")

log = get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back.

    Raises:
        TypeError: naming the key path of the first offending value.
    """
    # exact types: a str or int subclass (torch.__version__ is one) is pickled as its class
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, Tensor):
        return
    if type(obj) in (list, tuple):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if type(obj) is dict:
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"key {key!r} of {where} is not a string or an integer")
            check_plain(value, f"{where}.{key}")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}, not a tensor or a plain value")


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` through a temporary file and an atomic rename.

    The previous file at ``path`` stays whole until the new one is complete.

    Raises:
        TypeError: ``state`` holds something other than tensors and plain values.
    """
    from curvprune.runs import write_atomic

    state = dict(state)
    check_plain(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(Path(path), buffer.getvalue())


def read_weights_only(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or one carrying objects that
            weights-only loading refuses (they are never unpickled).
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found @ {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [
            ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln
        ]
        what = lines[0] if lines else " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint holds objects that weights-only loading refuses ({what}); it was not "
            f"loaded @ {path}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"checkpoint is truncated or corrupt ({reason}) @ {path}") from None


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read and check a run checkpoint written by :class:`RunCheckpoints`.

    Raises:
        CheckpointError: unreadable, unsafe, of another format, or missing keys.
    """
    state = read_weights_only(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"not a curvprune run checkpoint (format {got!r}, want {FORMAT!r}) @ {path}"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint lacks {', '.join(map(repr, missing))} @ {path}")
    return state


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# The partial run directory
# --------------------------------------------------------------------------------------------
class PartialRun:
    """``<out>/<name>.partial/``: the config and latest checkpoint of a run in progress.

    Create one with :meth:`create` (a new run) or :meth:`open` (to resume); both take the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name[: -len(PARTIAL_SUFFIX)]
        self.out = path.parent
        self._lock: Any = None

    @property
    def config_path(self) -> Path:
        """The resolved config of the run."""
        return self.path / "config.toml"

    @property
    def checkpoint_path(self) -> Path:
        """The latest checkpoint (may not exist yet)."""
        return self.path / CHECKPOINT

    @property
    def final(self) -> Path:
        """The run directory the run writes when it completes."""
        return self.out / self.name

    @classmethod
    def create(cls, out: Path, name: str, config_text: str) -> PartialRun:
        """Make ``<out>/<name>.partial`` with ``config.toml``.

        Raises:
            ConfigError: the folder exists already.
        """
        from curvprune.runs import write_atomic

        path = Path(out) / f"{name}{PARTIAL_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise ConfigError(
                f"an interrupted run of that name exists; resume it @ {path}"
            ) from None
        partial = cls(path)
        try:
            partial.acquire()
            write_atomic(partial.config_path, config_text)
        except BaseException:
            partial.release()
            shutil.rmtree(path, ignore_errors=True)
            raise
        return partial

    @classmethod
    def open(cls, path: str | Path, *, lock: bool = True) -> PartialRun:
        """The interrupted run at ``path``: ``<name>.partial`` (or ``<name>``, if only that exists).

        Args:
            path: the partial folder, or the run directory it will become.
            lock: take the lock now (else call :meth:`acquire` later).

        Raises:
            CheckpointError: not an interrupted run, a completed run, or one that is running.
        """
        path = Path(path)
        if (path / "result.json").is_file():
            raise CheckpointError(
                f"this run is complete (it has a result.json); there is nothing to resume @ {path}"
            )
        if not path.name.endswith(PARTIAL_SUFFIX):
            sibling = path.with_name(path.name + PARTIAL_SUFFIX)
            if not sibling.is_dir():
                raise CheckpointError(
                    f"no interrupted run here (expected a '<name>{PARTIAL_SUFFIX}' folder) @ {path}"
                )
            path = sibling
        if not path.is_dir():
            raise CheckpointError(f"no interrupted run here (no such folder) @ {path}")
        partial = cls(path)
        if not partial.config_path.is_file():
            raise CheckpointError(f"not a partial run directory (no config.toml) @ {path}")
        if (partial.final / "result.json").is_file():
            raise CheckpointError(
                f"this run completed already (its run directory {partial.final} exists); delete "
                f"the partial folder @ {path}"
            )
        if lock:
            partial.acquire()
        return partial

    def acquire(self) -> None:
        """Take the advisory lock (released by :meth:`release`, or when the process dies).

        Raises:
            CheckpointError: another process holds it.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        handle = open(self.path / ".lock", "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise CheckpointError(f"another process is running this run @ {self.path}") from None
        self._lock = handle

    def release(self) -> None:
        """Release the lock (the folder stays)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove(self) -> None:
        """Delete the folder (the run completed, or failed with nothing to resume)."""
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)


def _unique_name(out: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... so neither the run nor its partial folder exists."""
    candidate, n = name, 2
    while (out / candidate).exists() or (out / f"{candidate}{PARTIAL_SUFFIX}").exists():
        candidate = f"{name}-{n}"
        n += 1
    return candidate


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
    """The checkpoints of one :func:`curvprune.runs.execute_run` call.

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
            from curvprune.config import unstructure_config
            from curvprune.pipeline import Pipeline

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

    def start(self, every: int, out: Path, name: str, config_text: str) -> tuple[Path, str]:
        """Begin checkpointing (if ``every`` > 0); return the run's ``(out, name)``.

        A resumed run keeps its own folder and name and reads its checkpoint here.

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
                self._digest = _sha256(self.partial.config_path)
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
            name = _unique_name(out, name)
            self.partial = PartialRun.create(out, name, config_text)
            self._digest = _sha256(self.partial.config_path)
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
        """What a checkpoint of the fine-tuning after pruning keeps of the pruning itself."""
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
        :func:`curvprune.training.train`, and pass what it returns as ``state`` and
        ``after_step``.

        Args:
            phase: the loop's name, stored in the checkpoint.
            model: the model being trained (its state dict is saved and restored).
            optimizer: its optimizer (state dict saved and restored).
            session: the :class:`~curvprune.pipeline.PruningSession` (masks, schedule state,
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
