"""Whole runs: train (or load) a dense model, prune, fine-tune, and write a run directory.

A run directory holds ``config.toml`` (the resolved config), ``result.json`` (schema
``curvprune.result/1``, documented in docs/results.md), ``report.md``, ``layer_sparsity.png``,
``masks.safetensors`` and ``model.safetensors`` (the pruned model's state dict). It is written in
a hidden sibling folder and renamed into place only when complete, so an interrupted or failed run
leaves no half-written output.

The run measures its model by the metric of its data's task (``DataBundle.metric``): top-1
accuracy for classification, held-out perplexity for text and causal language models.

Dense models trained from scratch are cached under ``<out>/cache`` by a hash of what determines
them (model, data, training settings, seed, torch version), so ``compare`` trains once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from curvprune._log import get_logger
from curvprune._progress import Progress
from curvprune.config import PipelineConfig, dump_config, load_raw_config, unstructure_config
from curvprune.errors import CheckpointError, ConfigError, CurvpruneError
from curvprune.pipeline.pipeline import Pipeline, peek_batch
from curvprune.pipeline.planning import wants_example
from curvprune.plugin.manager import PluginHost, get_plugin_manager
from curvprune.run.checkpoint_files import (
    check_state_fits,
    read_safetensors,
    safetensors_state,
)
from curvprune.run.checkpoints import RunCheckpoints, read_weights_only
from curvprune.run.checks import static_checks
from curvprune.run.data import build_data, make_loaders
from curvprune.run.defaults import default_config
from curvprune.run.files import SCHEMA, atomic_directory, write_atomic
from curvprune.run.measure import collect_warnings, peak_memory, reset_peak_rss, versions
from curvprune.run.models import build_model, count_parameters
from curvprune.run.partial import unique_name
from curvprune.run.prune_phase import run_prune_phase
from curvprune.run.removal import removal_requested, remove_for_run, write_structure_files
from curvprune.run.render import plot_layer_sparsity, plot_single_audit, render_report
from curvprune.run.training import METRICS, evaluate, make_optimizer, train
from curvprune.tensors import distributed

__all__ = [
    "RunOutcome",
    "load_checkpoint",
    "resolve_device",
    "execute_run",
]

log = get_logger(__name__)


@attrs.frozen
class RunOutcome:
    """Where a run wrote its results, and the ``result.json`` content."""

    run_dir: Path
    result: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Devices and dense checkpoints
# --------------------------------------------------------------------------------------------
def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is checked."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N) @ run.device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available @ run.device")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {spec!r} (use auto, cpu, cuda or cuda:N) @ run.device")
    return device


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a state dict from ``.safetensors`` or a weights-only torch file into ``model``.

    Raises:
        CheckpointError: a missing, unreadable or unsafe file, or one that holds no state dict.
        ConfigError: weights of other keys or shapes than ``model``'s (``model`` untouched).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state: Any = read_safetensors(path, "model checkpoint")
    else:
        state = read_weights_only(path, "model checkpoint")  # never unpickles arbitrary objects
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model checkpoint holds no state dict of tensors @ {path}")
    check_state_fits(model, state, path)
    model.load_state_dict(state)


def _save_state(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save

    write_atomic(path, save(safetensors_state(model.state_dict())))


def _dense_key(config: PipelineConfig) -> str:
    raw = unstructure_config(config)
    key = {k: raw.get(k) for k in ("model", "data", "train")}
    key["seed"] = config.run.seed
    key["torch"] = torch.__version__
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _run_name(config: PipelineConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    est = config.estimator.name if config.estimator else "none"
    return f"{stamp}-{config.scorer.name}-{est}-s{config.prune.sparsity:.2f}"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def prepare(
    source: str | Path | Mapping[str, Any] | None, *, host: PluginHost | None = None
) -> Pipeline:
    """Read and validate a run config (None: the embedded default); nothing is computed."""
    if source is None:
        host = host or get_plugin_manager()
        raw = default_config(host.registry)
    else:
        raw = load_raw_config(source)
    pipeline = Pipeline.from_config(raw, host=host)
    cfg = pipeline.config
    # A schedule with its own prune phase (GReg) prunes before [finetune], which may be empty.
    in_finetune = pipeline.schedule.during_training and not pipeline.schedule.prune_phase
    if in_finetune and cfg.finetune.epochs == 0:
        raise ConfigError(
            f"schedule {cfg.schedule.name!r} prunes during training but [finetune] epochs = 0; "
            "set [finetune] epochs @ finetune.epochs"
        )
    resolve_device(cfg.run.device)
    return pipeline


def execute_run(
    source: str | Path | Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    name: str | None = None,
    quiet: bool = False,
    host: PluginHost | None = None,
    cache: str | Path | None = None,
    resume: str | Path | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> RunOutcome:
    """Run a config end to end and write its run directory.

    Args:
        source: a config path or dict; None runs the embedded default (or, with ``resume``,
            the interrupted run's saved config; a given config must equal it).
        out: folder for run directories (default: ``[run] out``).
        name: run directory name (default: ``[run] name`` or a timestamped one).
        quiet: no progress bars.
        host: plugin host (default: a fresh one honouring ``[plugins] disable``).
        cache: folder of cached dense models (default: ``<out>/cache``).
        resume: the ``<out>/<name>.partial`` folder of an interrupted run to continue (see
            :mod:`curvprune.run.checkpoints`); it ends in ``<out>/<name>``.
        on_checkpoint: called with the checkpoint's path after each checkpoint is written.

    Raises:
        CurvpruneError: any configuration, data, numerical or memory problem; nothing is
            written then (a run with checkpoints keeps its partial folder for ``resume``).
    """
    with RunCheckpoints(resume, on_save=on_checkpoint) as checkpoints:
        if checkpoints.partial is not None:
            source = checkpoints.source(source, host)
            for given, own, what in ((out, checkpoints.partial.out, "--out"),
                                     (name, checkpoints.partial.name, "--name")):
                if given is not None and str(given) != str(own) and Path(given) != Path(own):
                    raise ConfigError(
                        f"a resumed run keeps its own folder and name ({own}); drop {what} @ resume"
                    )
        with collect_warnings() as warned:
            return _execute_run(
                source, out=out, name=name, quiet=quiet, host=host, cache=cache,
                checkpoints=checkpoints, warned=warned,
            )


def _execute_run(
    source: str | Path | Mapping[str, Any] | None,
    *,
    out: str | Path | None,
    name: str | None,
    quiet: bool,
    host: PluginHost | None,
    cache: str | Path | None,
    checkpoints: RunCheckpoints,
    warned: list[str],
) -> RunOutcome:
    """:func:`execute_run` within its checkpoint handling; ``warned`` fills as warnings come."""
    started = time.perf_counter()
    pipeline = prepare(source, host=host)
    cfg = pipeline.config
    static_checks(pipeline, out=out, name=name, cache=cache)  # before any data or training
    # under torchrun: join the process group; each rank builds the same model and data
    device = distributed.init_from_env(resolve_device(cfg.run.device))
    pipeline.host.check_same_installs_across_ranks()  # before any data or training
    torch.manual_seed(cfg.run.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type == "cpu" and reset_peak_rss()
    out_dir = Path(out if out is not None else cfg.run.out)
    bundle = build_data(cfg.data, seed=cfg.run.seed, model=cfg.model.name)
    train_loader, grad_loader, test_loader = make_loaders(bundle, cfg.data, seed=cfg.run.seed)
    metric = bundle.metric  # what the task is measured by: accuracy, or perplexity for text
    in_finetune = pipeline.schedule.during_training and not pipeline.schedule.prune_phase
    if in_finetune:
        steps = cfg.finetune.epochs * len(train_loader)
        if not pipeline.schedule.finished(steps - 1):
            raise ConfigError(
                f"schedule {cfg.schedule.name!r} has not finished after the {steps} optimizer steps "
                f"of [finetune] ({cfg.finetune.epochs} epochs × {len(train_loader)} batches); end "
                "it earlier or fine-tune longer @ schedule"
            )
    model = build_model(
        cfg.model.name, num_classes=cfg.model.num_classes or bundle.num_classes, **cfg.model.kwargs
    )
    _check_model_runs(model, test_loader, cfg)
    model.to(device)
    explicit = name or cfg.run.name  # the user's name is used as given, never suffixed
    out_dir, run_name = checkpoints.start(
        cfg.run.checkpoint_every, out_dir, explicit or _run_name(cfg), dump_config(cfg),
        explicit=bool(explicit),
    )
    times: dict[str, float] = {}
    removal = structure = None  # physical channel removal ([mask] remove = true)
    with Progress(enabled=cfg.run.progress and not quiet and distributed.rank() == 0) as progress:
        tick = time.perf_counter()
        dense_source = _dense_model(
            model, cfg, Path(cache) if cache is not None else out_dir / "cache", train_loader,
            device, progress,
        )
        distributed.broadcast_module_(model)  # every rank prunes the very same weights
        times["train"] = time.perf_counter() - tick
        # What follows must not depend on whether the dense model was trained just now, cached
        # or loaded (training draws from the loaders' and torch's generators): start afresh.
        torch.manual_seed(cfg.run.seed)
        train_loader, grad_loader, test_loader = make_loaders(bundle, cfg.data, seed=cfg.run.seed)
        plan = pipeline.plan(model, device=device,
                             example=peek_batch(grad_loader) if wants_example(pipeline) else None)
        plan.check()
        score_dense, loss_dense = evaluate(model, test_loader, device=device, metric=metric)
        tick = time.perf_counter()
        score_pruned = loss_pruned = None
        if in_finetune:
            optimizer = make_optimizer(model, cfg.finetune)
            session = pipeline.attach(model, optimizer, data=grad_loader)
            advance = progress.task("prune + fine-tune", cfg.finetune.epochs * len(train_loader))
            loop, after_step = checkpoints.phase(
                "prune_and_finetune", model=model, optimizer=optimizer, session=session,
                loaders={"train": train_loader, "grad": grad_loader},
            )
            train(model, train_loader, cfg.finetune, device=device, optimizer=optimizer,
                  session=session, on_step=advance, state=loop, after_step=after_step)
            result = session.close()
            if removal_requested(pipeline):  # pruned during training: remove at the end
                example = _example(test_loader, device)
                removal, structure = remove_for_run(pipeline, model, result, example)
            times["prune_and_finetune"] = (
                time.perf_counter() - tick + checkpoints.elapsed_before()
            )
        else:
            resumed = checkpoints.resumes("finetune")  # it pruned before the interruption
            if resumed:
                result, times["prune"], score_pruned, loss_pruned = checkpoints.pruned(
                    pipeline, model)
            elif pipeline.schedule.prune_phase:  # trains until the schedule has pruned (GReg)
                advance = progress.task("prune phase (at most)", pipeline.schedule.max_steps())
                result = run_prune_phase(pipeline, model, train_loader, device=device,
                                         data=grad_loader, on_step=advance,
                                         checkpoints=checkpoints)
            else:  # one-shot; with sequential calibration checkpointed between stages
                resume, after_stage = checkpoints.oneshot(model)
                result = pipeline.prune(model, grad_loader, progress=progress,
                                        on_stage=after_stage, resume=resume)
            if not resumed:
                times["prune"] = time.perf_counter() - tick + checkpoints.elapsed_before()
                score_pruned, loss_pruned = evaluate(model, test_loader, device=device,
                                                     metric=metric)
            if removal_requested(pipeline):  # before fine-tuning: it trains the smaller model
                example = _example(test_loader, device)
                removal, structure = remove_for_run(pipeline, model, result, example)
            if cfg.finetune.epochs:
                tick = time.perf_counter()
                optimizer = make_optimizer(model, cfg.finetune)
                session = pipeline.attach(model, optimizer,
                                          masks=None if removal else result.masks)
                advance = progress.task("fine-tune", cfg.finetune.epochs * len(train_loader))
                loop, after_step = checkpoints.phase(
                    "finetune", model=model, optimizer=optimizer, session=session,
                    loaders={"train": train_loader, "grad": grad_loader},
                    extra=checkpoints.pruned_extra(result, times["prune"], score_pruned,
                                                   loss_pruned),
                )
                train(model, train_loader, cfg.finetune, device=device, optimizer=optimizer,
                      session=session, on_step=advance, state=loop, after_step=after_step)
                session.close()
                times["finetune"] = time.perf_counter() - tick + checkpoints.elapsed_before()
    score_tuned = loss_tuned = None
    if cfg.finetune.epochs:
        score_tuned, loss_tuned = evaluate(model, test_loader, device=device, metric=metric)
    scores = {"dense": score_dense, "pruned": score_pruned, "finetuned": score_tuned}
    times["total"] = time.perf_counter() - started
    peak, measure = peak_memory(device, rss_reset)
    total_params = count_parameters(model)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    predicted = [s.predicted_loss_change for s in result.steps]
    measured = [s.measured_loss_change for s in result.steps]
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "run": {
            "name": run_name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seed": cfg.run.seed,
            "device": str(device),
            "world_size": distributed.world_size(),
            "resumed": checkpoints.resumed_from(),
        },
        "versions": versions(pipeline.host),
        "model": {
            "name": cfg.model.name,
            "num_classes": cfg.model.num_classes or bundle.num_classes,
            "kwargs": dict(cfg.model.kwargs),
            "parameters": total_params,
            "selected": plan.layout.d,
        },
        "data": {"name": cfg.data.name, "train": len(bundle.train), "test": len(bundle.test)},
        "methods": {
            "estimator": cfg.estimator.name if cfg.estimator else None,
            "scorer": cfg.scorer.name,
            "schedule": cfg.schedule.name,
            "mask": cfg.mask.name,
        },
        "dense": {"source": dense_source, "key": _dense_key(cfg)},
        "metric": metric,
        # every metric's object is there, null but for the task's metric
        **{m: scores if m == metric else dict.fromkeys(scores) for m in METRICS},
        "loss": {"dense": loss_dense, "pruned": loss_pruned, "finetuned": loss_tuned},
        "sparsity": {
            "target": cfg.prune.sparsity,
            "total": result.sparsity,
            "unit": pipeline.mask.achieved_sparsity(result.masks.flat, result.masks.layout),
            "overall": zeros / max(total_params, 1),
            "per_layer": result.per_layer,
        },
        "loss_change": {
            "predicted": None if any(p is None for p in predicted) else sum(predicted),
            "measured": None if any(m is None for m in measured) else sum(measured),
            "single": [
                {k: s.single_audit.get(k) for k in
                 ("step", "samples", "spearman", "pearson", "spearman_curvature",
                  "spearman_first_order")}
                for s in result.steps if s.single_audit
            ],
        },
        "steps": [s.to_dict() for s in result.steps],
        "structure": structure,
        "scorer_report": pipeline.scorer.report(),
        "time": times,
        "memory": {"peak_bytes": peak, "measure": measure, "planned_bytes": plan.total_bytes},
        "plan": plan.to_dict(),
        "warnings": warned,
    }
    run_dir = out_dir / run_name
    if not (explicit or checkpoints.partial is not None):  # a generated name: first free one
        # rank 0 names it, every rank agrees
        run_dir = distributed.broadcast_object(out_dir / unique_name(out_dir, run_name))
    _write_on_rank_0(lambda: _write_run_dir(run_dir, pipeline, model, result, record, removal))
    log.info("run_completed", run_dir=str(run_dir), metric=metric, dense=score_dense,
             pruned=score_pruned)
    return RunOutcome(run_dir, record)


def _example(loader: Any, device: torch.device) -> torch.Tensor:
    """Two inputs of the first batch: for FLOP counts and the removal check."""
    x = next(iter(loader))[0]
    return x[:2].to(device)


def _check_model_runs(model: nn.Module, loader: Any, cfg: PipelineConfig) -> None:
    x, _ = next(iter(loader))
    model.eval()
    try:
        with torch.no_grad():
            model(x[:2])
    except Exception as exc:
        raise ConfigError(
            f"model {cfg.model.name!r} cannot run on data {cfg.data.name!r} inputs of shape "
            f"{list(x.shape[1:])}: {type(exc).__name__}: {exc} @ model.name"
        ) from None


def _dense_model(
    model: nn.Module, cfg: PipelineConfig, cache_dir: Path, loader: Any, device: torch.device,
    progress: Progress,
) -> str:
    """Load or train the dense model; return where it came from.

    ``checkpoint`` (``[model] checkpoint``), ``pretrained`` (an ``hf:`` model comes with its
    trained weights: ``[train]`` does not run), ``cache`` or ``trained``.
    """
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
        model.to(device)
        return "checkpoint"
    if cfg.model.name.startswith("hf:"):
        return "pretrained"
    cache = cache_dir / f"dense-{_dense_key(cfg)}.safetensors"
    if not distributed.any_rank(not cache.is_file()):  # every rank decides alike
        load_checkpoint(model, cache)
        model.to(device)
        return "cache"
    advance = progress.task("train dense", cfg.train.epochs * len(loader))
    train(model, loader, cfg.train, device=device, on_step=advance)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_on_rank_0(lambda: _save_state(model, cache))
    return "trained"


def _write_on_rank_0(write: Callable[[], None]) -> None:
    """Run ``write`` on rank 0 only (everything when not distributed); the other ranks wait,
    and raise if rank 0 failed, so no rank returns before the files exist."""
    failure: Exception | None = None
    if distributed.rank() == 0:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the others
            failure = exc
    if distributed.any_rank(failure is not None):
        raise failure or CurvpruneError("rank 0 failed to write its files; see its error")


def _write_run_dir(
    run_dir: Path, pipeline: Pipeline, model: nn.Module, result: Any, record: dict[str, Any],
    removal: Any = None,
) -> None:
    from safetensors.torch import save

    with atomic_directory(run_dir) as staging:
        (staging / "config.toml").write_text(dump_config(pipeline.config))
        masks = {k: v.to(torch.uint8).cpu().contiguous() for k, v in result.mask_tensors().items()}
        (staging / "masks.safetensors").write_bytes(save(masks))
        (staging / "model.safetensors").write_bytes(save(safetensors_state(model.state_dict())))
        plot_layer_sparsity(record, staging / "layer_sparsity.png")
        if removal is not None:
            write_structure_files(staging, record, removal)
        if record["loss_change"]["single"]:
            plot_single_audit(record, staging / "single_weight_audit.png")
        figures = pipeline.scorer.write_figures(staging)
        if figures and isinstance(record.get("scorer_report"), dict):
            record["scorer_report"]["figures"] = list(figures)
        (staging / "report.md").write_text(render_report(record))
        (staging / "result.json").write_text(json.dumps(record, indent=2))



def method_labels(configs: Sequence[PipelineConfig]) -> list[str]:
    """Short labels telling the configs of a comparison apart."""
    labels = []
    for c in configs:
        parts = [c.scorer.name]
        if c.estimator:
            algo = getattr(c.estimator.config, "algorithm", None)
            parts.append(c.estimator.name + (f"-{algo}" if algo and algo != "auto" else ""))
        steps = getattr(c.schedule.config, "steps", None)
        parts.append(c.schedule.name + (f"x{steps}" if steps and steps > 1 else ""))
        parts.append(c.mask.name)
        labels.append("/".join(parts))
    return labels
