"""``curvprune compare``: several configs on the same trained model and data, one table and plot.

Every config must agree on what determines the dense model: ``[model]``, ``[data]``, ``[train]``
and ``[run] seed``/``device``. The first disagreeing field is named in the error, before any
compute. The dense model is trained once per seed and cached by content hash under
``<out>/cache`` (``result.json``'s ``dense.source`` says ``trained`` or ``cache``), and every
config prunes a fresh copy of it.

``sparsities`` sweeps every config over several targets; ``seeds`` repeats each cell with seeds
``seed, seed + 1, ...`` (each seed has its own dense model and gradient draws) and the table
reports mean ± sample standard deviation. A run that fails is recorded as failed, with its
one-line reason, and the others still run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from curvprune._log import get_logger
from curvprune.config import load_raw_config, unstructure_config
from curvprune.errors import ConfigError
from curvprune.run.execute import execute_run, method_labels, prepare
from curvprune.run.files import atomic_directory
from curvprune.run.render import plot_accuracy_vs_sparsity, render_comparison

__all__ = ["SCHEMA", "compare", "summarize"]

SCHEMA = "curvprune.compare/1"
#: What determines the dense model; every config of a comparison must agree on these.
_SHARED = ("model", "data", "train", "run.seed", "run.device")
#: Per-run numbers averaged over seeds in the summary.
_AVERAGED = (
    "sparsity", "flops_fraction", "accuracy_dense", "accuracy_pruned", "accuracy_finetuned",
    "perplexity_dense", "perplexity_pruned", "perplexity_finetuned", "prune_seconds",
    "peak_bytes", "loss_predicted", "loss_measured", "single_spearman",
)
log = get_logger(__name__)


def _lookup(raw: Mapping[str, Any], path: str) -> Any:
    value: Any = raw
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """The dotted path of the first field where ``a`` and ``b`` differ (None: equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if a == b else path


def check_shared(sources: Sequence[str], configs: Sequence[Mapping[str, Any]]) -> None:
    """Raise if the configs disagree on anything that determines the dense model.

    Raises:
        ConfigError: ``compare needs the same [model] in every config: model.name is ... @ path``.
    """
    first = configs[0]
    for source, other in zip(sources[1:], configs[1:], strict=True):
        for path in _SHARED:
            field = _first_difference(_lookup(first, path), _lookup(other, path), path)
            if field:
                table = path.split(".")[0]
                raise ConfigError(
                    f"compare needs the same [{table}] in every config: {field} is "
                    f"{_lookup(other, field)!r} in {source} but {_lookup(first, field)!r} in "
                    f"{sources[0]} @ {field}"
                )


def compare(
    sources: Sequence[str | Path | Mapping[str, Any]],
    *,
    out: str | Path = "runs",
    sparsities: Sequence[float] | None = None,
    seeds: int = 1,
    quiet: bool = False,
) -> Path:
    """Run every config (paths or dicts; at every sparsity, for every seed); write table and plot.

    Writes ``<out>/compare-<timestamp>/`` with ``comparison.json`` (schema
    ``curvprune.compare/1``: every run and the per-method summary), ``comparison.md`` and
    ``accuracy_vs_sparsity.png``, and each run directory under ``runs/``.

    Returns:
        The comparison directory.

    Raises:
        ConfigError: no config, an invalid config, configs that disagree on the dense model,
            or ``seeds`` < 1, all before any compute.
    """
    if not sources:
        raise ConfigError("compare needs at least one config file")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds} @ seeds")
    for value in sparsities or ():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"sparsities must be in [0, 1), got {value} @ sparsities")
    raws = [load_raw_config(s) for s in sources]
    pipelines = [prepare(raw) for raw in raws]
    names = [str(s) if isinstance(s, (str, Path)) else f"config #{i + 1}"
             for i, s in enumerate(sources)]
    check_shared(names, [unstructure_config(p.config) for p in pipelines])
    labels = _unique_labels(method_labels([p.config for p in pipelines]))
    base_seed = pipelines[0].config.run.seed
    seed_list = [base_seed + i for i in range(seeds)]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    final = Path(out) / f"compare-{stamp}"
    rows: list[dict[str, Any]] = []
    with atomic_directory(final, "comparison folder") as staging:
        for source, raw, label, pipe in zip(names, raws, labels, pipelines, strict=True):
            targets = list(sparsities) if sparsities else [pipe.config.prune.sparsity]
            for target in targets:
                for seed in seed_list:
                    rows.append(_one_run(source, raw, label, target, seed, staging, Path(out),
                                         quiet))
        summary = summarize(rows)
        payload = {
            "schema": SCHEMA,
            "configs": names,
            "labels": labels,
            "seeds": seed_list,
            "sparsities": list(sparsities) if sparsities else None,
            "runs": rows,
            "summary": summary,
        }
        (staging / "comparison.json").write_text(json.dumps(payload, indent=2))
        (staging / "comparison.md").write_text(render_comparison(summary, seeds=len(seed_list)))
        plot_accuracy_vs_sparsity(summary, staging / "accuracy_vs_sparsity.png")
    return final


def _unique_labels(labels: list[str]) -> list[str]:
    """Number repeated labels (two configs differing only in options) so rows stay apart."""
    out, seen = [], {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _one_run(
    source: str, raw: Mapping[str, Any], label: str, target: float, seed: int,
    staging: Path, out: Path, quiet: bool,
) -> dict[str, Any]:
    """Run one cell; a failure becomes a row with ``status = "failed"`` and its reason."""
    variant = {
        **raw,
        "prune": {**raw.get("prune", {}), "sparsity": target},
        "run": {**raw.get("run", {}), "seed": seed},
    }
    name = f"{label.replace('/', '_')}-s{target:.2f}-seed{seed}"
    row: dict[str, Any] = {"label": label, "config": source, "target": target, "seed": seed}
    try:
        outcome = execute_run(variant, out=staging / "runs", quiet=quiet, name=name,
                              cache=out / "cache")
    except Exception as exc:  # noqa: BLE001 - recorded; the other runs go on
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("compare_run_failed", label=label, target=target, seed=seed, reason=reason)
        return {**row, "status": "failed", "error": f"{type(exc).__name__}: {reason}"}
    r = outcome.result
    structure = r.get("structure") or {}
    flops_after, flops_before = structure.get("flops_after"), structure.get("flops_before")
    audit = r.get("loss_change", {}).get("single") or []
    spearman = [a["spearman"] for a in audit if a.get("spearman") is not None]
    return {
        **row,
        "status": "ok",
        "error": None,
        "sparsity": r["sparsity"]["total"],
        "flops_after": flops_after,
        "flops_fraction": (flops_after / flops_before) if flops_after and flops_before else None,
        "metric": r.get("metric", "accuracy"),
        **{f"{metric}_{when}": (r.get(metric) or {}).get(when)
           for metric in ("accuracy", "perplexity") for when in ("dense", "pruned", "finetuned")},
        "prune_seconds": r["time"].get("prune", r["time"].get("prune_and_finetune", 0.0)),
        "peak_bytes": r["memory"]["peak_bytes"],
        "planned_bytes": r["memory"]["planned_bytes"],
        "loss_predicted": r["loss_change"]["predicted"],
        "loss_measured": r["loss_change"]["measured"],
        "single_spearman": spearman[-1] if spearman else None,
        "dense_source": r.get("dense", {}).get("source"),
        "run": f"runs/{outcome.run_dir.name}",
    }


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target sparsity): mean and std over the seeds that succeeded."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["target"]), []).append(row)
    summary = []
    for (label, target), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        entry: dict[str, Any] = {
            "label": label,
            "target": target,
            "runs": len(group),
            "failed": len(group) - len(ok),
            "errors": sorted({r["error"] for r in group if r["status"] != "ok"}),
            "metric": next((r["metric"] for r in ok if r.get("metric")), "accuracy"),
        }
        for key in _AVERAGED:
            values = [float(r[key]) for r in ok if r.get(key) is not None]
            entry[key], entry[f"{key}_std"] = _mean_std(values)
        summary.append(entry)
    return summary
