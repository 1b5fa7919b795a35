"""The ``curvprune`` command line.

Every command prints one clear line and exits non-zero on bad input (2 for a usage or config
problem, 1 for a failure during compute), with no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from curvprune.errors import (
    ConfigError,
    CurvpruneError,
    MemoryPlanError,
    NumericalError,
    PluginHookError,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvprune",
        description="Second-order neural-network pruning with composable plugins.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="write structlog events (plugin_loaded, prune_step_completed, ...) as JSON lines to stderr",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="prune (and fine-tune) as a config says; write a run directory")
    p.add_argument("config", nargs="?", help="TOML/JSON config (default: the embedded digits run)")
    p.add_argument("--out", help="folder for run directories (default: [run] out)")
    p.add_argument("--name", help="run directory name")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint (<out>/<name>.partial; see "
             "[run] checkpoint_every); its saved config is used, a given CONFIG must equal it",
    )

    p = sub.add_parser("plugins", help="installed plugins, their components and config fields")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("validate", help="check a config (structure and combination), no compute")
    p.add_argument("config")

    p = sub.add_parser("plan", help="parameters, blocks and memory a run needs, before compute")
    p.add_argument("config", nargs="?", help="config (default: the embedded digits run)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="plan one rank of a torchrun run with N processes (memory per rank)")

    p = sub.add_parser("compare", help="several configs on the same model: one table, one plot")
    p.add_argument("configs", nargs="+")
    p.add_argument("--out", default="runs")
    p.add_argument("--sparsities", help="comma-separated sparsities to sweep, e.g. 0.5,0.7,0.9")
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat every cell with N seeds and report mean ± std (default 1)")
    p.add_argument("--quiet", "-q", action="store_true")

    p = sub.add_parser("export", help="a run's pruned model and masks as safetensors")
    p.add_argument("run_dir")
    p.add_argument("--out", help="export folder (default: RUN_DIR/export)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx, checked against PyTorch (the onnx extra)")

    p = sub.add_parser("report", help="print (and re-render) a run's report")
    p.add_argument("run_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvprune`` script; returns the exit code."""
    args = _parser().parse_args(argv)
    _exit_cleanly_on_sigterm()
    if args.log_json:
        _configure_json_logging()
    from curvprune.tensors import distributed

    succeeded = False
    try:
        code = _COMMANDS[args.command](args)
        succeeded = code == 0
        return code
    except (NumericalError, MemoryPlanError, PluginHookError) as exc:
        if args.debug:
            raise
        print(f"curvprune {args.command}{distributed.rank_tag()}: error: {_brief(exc)}",
              file=sys.stderr)
        return 1
    except CurvpruneError as exc:
        if args.debug:
            raise
        print(f"curvprune {args.command}{distributed.rank_tag()}: error: {_brief(exc)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"curvprune {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: still one line unless --debug
        if args.debug:
            raise
        print(
            f"curvprune {args.command}{distributed.rank_tag()}: internal error: "
            f"{_brief(f'{type(exc).__name__}: {exc}')} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        # the process group `run` joined under torchrun, if any
        distributed.shutdown(synchronize=succeeded)


#: The most characters of one error line's message (its ``@ where`` part aside).
_MESSAGE_LIMIT = 200


def _brief(error: object) -> str:
    """Each line of an error, its message cut to :data:`_MESSAGE_LIMIT` characters.

    A config error has one line per problem; any other error is one line. A cut message ends in
    ``… (--debug shows it whole)``; the ``@ where`` part is always kept.
    """
    lines = []
    for line in str(error).splitlines() or [type(error).__name__]:
        message, at, where = line.partition(" @ ")
        message = " ".join(message.split())
        if len(message) > _MESSAGE_LIMIT:
            tail = "… (--debug shows it whole)"
            message = message[: _MESSAGE_LIMIT - len(tail)] + tail
        lines.append(message + at + where)
    return "\n".join(lines)


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that staging folders and temporary files are removed."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _configure_json_logging() -> None:
    """The CLI is an application, so it may configure logging: JSON lines on stderr."""
    import logging

    import structlog

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(),
            foreign_pre_chain=[
                _add_rank,
                structlog.stdlib.add_log_level,
                structlog.stdlib.ExtraAdder(),
                structlog.processors.TimeStamper(fmt="iso"),
            ],
        )
    )
    logger = logging.getLogger("curvprune")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _add_rank(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Tag every event with the process's rank under torch.distributed."""
    from curvprune.tensors import distributed

    if distributed.is_distributed():
        event["rank"] = distributed.rank()
    return event


# --------------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    from curvprune.run.execute import execute_run

    from curvprune.tensors import distributed

    saved: list[Path] = []
    try:
        outcome = execute_run(args.config, out=args.out, name=args.name, quiet=args.quiet,
                              resume=args.resume, on_checkpoint=saved.append)
    except (RuntimeError, OSError) as exc:  # a rank died inside a collective (RankLostError)?
        where = saved[-1].parent if saved else args.resume
        hint = (f"resume with: curvprune run --resume {where}" if where else
                "resume the run's .partial folder with curvprune run --resume")
        lost = distributed.lost_peer(exc, resume_hint=hint)
        if lost is None:
            raise
        raise lost from exc
    except (KeyboardInterrupt, SystemExit) as exc:
        if not saved and not args.resume:
            raise
        partial = saved[-1].parent if saved else args.resume
        print(f"curvprune run: interrupted; continue with: curvprune run --resume {partial}",
              file=sys.stderr)
        if isinstance(exc, SystemExit):  # SIGTERM: keep its exit status
            raise
        return 130
    if distributed.rank() != 0:  # rank 0 wrote the run directory and prints the summary
        return 0
    r = outcome.result
    metric = r.get("metric", "accuracy")
    score = r[metric]
    show = _pct if metric == "accuracy" else (lambda v: f"{v:8.3f}")
    methods = ", ".join(f"{k}={v}" for k, v in r["methods"].items() if v)
    print(f"curvprune run: {r['model']['name']} on {r['data']['name']} ({methods})")
    print(f"  {'dense ' + metric:<19} {show(score['dense'])}")
    for when, label in (("pruned", "pruned "), ("finetuned", "fine-tuned ")):
        if score[when] is not None:
            print(f"  {label + metric:<19} {show(score[when])}  at "
                  f"{_pct(r['sparsity']['total'])} sparsity")
    lc = r["loss_change"]
    if lc["predicted"] is not None:
        print(f"  loss change         predicted {lc['predicted']:.4g}, measured {lc['measured']:.4g}")
    print(f"  report              {outcome.run_dir / 'report.md'}")
    return 0


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:6.2f} %"


def _cmd_plugins(args: argparse.Namespace) -> int:
    from curvprune.api import plugins

    infos = plugins()
    if args.json:
        payload = [
            {
                "plugin": i.name,
                "distribution": i.distribution,
                "version": i.version,
                "hooks": list(i.hooks),
                "components": [
                    {
                        "kind": c.kind,
                        "name": c.name,
                        "config": [
                            {"name": n, "type": t, "default": _jsonable(d)}
                            for n, t, d in c.config_fields()
                        ],
                    }
                    for c in i.components
                ],
            }
            for i in infos
        ]
        print(json.dumps(payload, indent=2))
        return 0
    for info in infos:
        dist = f"{info.distribution} {info.version}" if info.distribution else "in-process"
        print(f"{info.name}  ({dist})")
        for comp in info.components:
            fields = ", ".join(
                f"{n}={_show(d)}" if d is not attrs.NOTHING else f"{n} (required)"
                for n, _, d in comp.config_fields()
            )
            print(f"  {comp.kind:<9} {comp.name:<12} {fields or '(no options)'}")
    return 0


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return repr(list(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _jsonable(value: Any) -> Any:
    if value is attrs.NOTHING:
        return None
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
        return value
    return repr(value)


def _cmd_validate(args: argparse.Namespace) -> int:
    from curvprune.run.checks import static_checks
    from curvprune.run.execute import prepare

    pipeline = prepare(args.config)
    cfg = pipeline.config
    _announce_imports(cfg.model.name)
    static_checks(pipeline)
    print(
        f"{args.config}: ok (estimator={cfg.estimator.name if cfg.estimator else None}, "
        f"scorer={cfg.scorer.name}, schedule={cfg.schedule.name}, mask={cfg.mask.name})"
    )
    for warning in pipeline.warnings():
        print(f"  warning: {warning}")
    return 0


def _announce_imports(model_name: str) -> None:
    """Name the user modules a config will import (and so run) before importing them."""
    from curvprune.run.checks import modules_to_import

    for module in modules_to_import(model_name):
        print(f"note: [model] name imports and runs the module {module!r} (a config is as "
              "trusted as a script)", file=sys.stderr)


def _cmd_plan(args: argparse.Namespace) -> int:
    from curvprune.pipeline.planning import wants_example
    from curvprune.run.checks import static_checks
    from curvprune.run.data import build_data, check_data
    from curvprune.run.execute import prepare, resolve_device

    pipeline = prepare(args.config)
    cfg = pipeline.config
    _announce_imports(cfg.model.name)
    num_classes = cfg.model.num_classes
    hf = cfg.model.name.startswith("hf:")  # its folder's config sets the heads: no look needed
    if num_classes is None and check_data(cfg.data, model=cfg.model.name) is None and not hf:
        num_classes = build_data(cfg.data).num_classes  # a data set whose classes need a look
    checked = static_checks(pipeline, num_classes=num_classes)
    model = checked.model
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc} @ --nproc")
    example = None
    if wants_example(pipeline):
        # one batch lets the plan count the cached block inputs and one block's activations
        # (sequential calibration), the fit's samples and passes (K-FAC), or one gradient
        # chunk's forward and backward pass (curvprune run does the same)
        from curvprune.pipeline.pipeline import peek_batch
        from curvprune.run.data import make_loaders

        bundle = build_data(cfg.data, seed=cfg.run.seed, model=cfg.model.name)
        _, grad_loader, _ = make_loaders(bundle, cfg.data, seed=cfg.run.seed)
        example = peek_batch(grad_loader)
    plan = pipeline.plan(model, device=resolve_device(cfg.run.device), world_size=args.nproc,
                         example=example)
    groups = _channel_groups(checked.layout)
    if args.json:
        print(json.dumps({**plan.to_dict(), "channel_groups": groups}, indent=2))
        return 0 if plan.fits else 1
    print(f"plan for {cfg.model.name}: {plan.layout.d:,} weights selected in {len(plan.layout)} parameters")
    if groups is not None:
        _print_channel_groups(groups)
    width = max(len(n) for n in plan.layout.names)
    for name, shape, size in zip(plan.layout.names, plan.layout.shapes, plan.layout.sizes, strict=True):
        print(f"  {name:<{width}}  {'×'.join(map(str, shape)):>16}  {size:>12,}")
    if plan.estimator:
        print(f"estimator {plan.estimator}: {plan.n_blocks:,} blocks of width ≤ {plan.block_width}")
    for part, value in plan.memory.items():
        print(f"  memory {part:<10} {value / 2**20:12.2f} MiB")
    print(f"  memory total      {plan.total_bytes / 2**20:12.2f} MiB of {plan.limit / 2**30:.1f} GiB "
          f"({plan.limit_source})")
    if plan.total_bytes < sum(plan.memory.values()):
        print("  (the total is less than the parts: gradients stream while the estimator "
              "accumulates, and are freed before it answers; the peak is the larger phase)")
    if plan.world_size > 1:
        print(f"  memory is per rank: each of the {plan.world_size} ranks holds the whole estimator "
              "state (not sharded)")
    if plan.seconds is None:
        print("time: unknown (the estimator gives no flop estimate)")
    else:
        print(f"time: at least ~{plan.seconds:.3g} s per pruning step ({plan.time_class}): "
              f"{plan.flops:.3g} flop at this machine's measured "
              f"{plan.flops_per_second / 1e9:.3g} GFLOP/s matrix-multiply rate")
    if not plan.fits:
        plan.check()
    return 0


def _channel_groups(layout: Any) -> list[dict[str, Any]] | None:
    """Every traced channel group, prunable or not and why (None without a channel mask)."""
    from curvprune.structure.hf_mlp import MlpGroup

    structures = layout.structures
    if structures is None:
        return None
    selected = set(layout.names)
    chosen = {g.name for g in structures.groups}
    out = []
    for g in structures.graph.groups:
        if g.name in chosen:
            status = "prunable"
        elif not all(w in selected for w in g.weights()):
            status = "not selected ([prune] targets/ignore)"
        else:
            status = f"not prunable: {g.reason}"
        # attention head groups count heads, Hugging Face MLP groups hidden units
        unit = ("heads" if getattr(g, "head_dim", 0)
                else "units" if isinstance(g, MlpGroup) else "channels")
        out.append({"name": g.name, "size": g.size, "producers": list(g.producers),
                    "consumers": [c for c, _ in g.consumers], "status": status, "unit": unit})
    return out


def _print_channel_groups(groups: list[dict[str, Any]]) -> None:
    prunable = sum(g["status"] == "prunable" for g in groups)
    print(f"channel groups (torch.fx trace): {prunable} of {len(groups)} prunable")
    width = max(len(g["name"]) for g in groups)
    for g in groups:
        coupled = f" + {len(g['producers']) - 1} coupled" if len(g["producers"]) > 1 else ""
        unit = g.get("unit", "channels")
        print(f"  {g['name']:<{width}}  {g['size']:>6} {unit:<8}{coupled:<14}  {g['status']}")


def _cmd_compare(args: argparse.Namespace) -> int:
    from curvprune.run.compare import compare

    sparsities = None
    if args.sparsities:
        try:
            sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}") from None
    folder = compare(args.configs, out=args.out, sparsities=sparsities, seeds=args.seeds,
                     quiet=args.quiet)
    print((folder / "comparison.md").read_text())
    print(f"comparison written to {folder}")
    runs = json.loads((folder / "comparison.json").read_text())["runs"]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        print(f"curvprune compare: {len(failed)} of {len(runs)} runs failed (marked in the table); "
              f"first: {failed[0]['label']}: {failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from curvprune.run.export import export_run

    folder = export_run(args.run_dir, args.out, onnx=args.onnx)
    print(f"exported to {folder} ({', '.join(sorted(f.name for f in folder.iterdir()))})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from curvprune.run.files import read_result, write_atomic
    from curvprune.run.render import plot_layer_sparsity, plot_single_audit, render_report

    record = read_result(args.run_dir)
    text = render_report(record)
    write_atomic(Path(args.run_dir) / "report.md", text)
    plot_layer_sparsity(record, Path(args.run_dir) / "layer_sparsity.png")
    if record.get("loss_change", {}).get("single"):
        plot_single_audit(record, Path(args.run_dir) / "single_weight_audit.png")
    print(text)
    return 0


_COMMANDS = {
    "run": _cmd_run,
    "plugins": _cmd_plugins,
    "validate": _cmd_validate,
    "plan": _cmd_plan,
    "compare": _cmd_compare,
    "export": _cmd_export,
    "report": _cmd_report,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
