"""``curvprune compare``: several configs on the same trained model and data, one table and plot.

Every config must agree on ``[model]``, ``[data]`` and ``[train]`` (what determines the dense
model); the dense model is trained once (the run cache) and each config prunes a fresh copy of it.
``sparsities`` sweeps every config over several targets for accuracy-vs-sparsity curves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from curvprune.config import load_raw_config, unstructure_config
from curvprune.errors import ConfigError
from curvprune.render import plot_accuracy_vs_sparsity, render_comparison
from curvprune.runs import atomic_directory, execute_run, method_labels, prepare

__all__ = ["compare"]

_SHARED = ("model", "data", "train")


def compare(
    sources: Sequence[str | Path],
    *,
    out: str | Path = "runs",
    sparsities: Sequence[float] | None = None,
    quiet: bool = False,
) -> Path:
    """Run every config (at every sparsity) and write ``comparison.{md,json}`` and a plot.

    Returns:
        The comparison directory (its ``runs/`` holds each run directory).

    Raises:
        ConfigError: a config is invalid, or the configs disagree on model, data or training.
    """
    if not sources:
        raise ConfigError("compare needs at least one config file")
    raws = [load_raw_config(s) for s in sources]
    pipelines = [prepare(raw) for raw in raws]
    first = unstructure_config(pipelines[0].config)
    for source, pipe in zip(sources[1:], pipelines[1:], strict=True):
        other = unstructure_config(pipe.config)
        for table in _SHARED:
            if other.get(table) != first.get(table):
                raise ConfigError(
                    f"compare needs the same [{table}] in every config; it differs from "
                    f"{sources[0]} @ {source}"
                )
    labels = method_labels([p.config for p in pipelines])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    final = Path(out) / f"compare-{stamp}"
    rows: list[dict[str, Any]] = []
    with atomic_directory(final) as staging:
        for raw, label, pipe in zip(raws, labels, pipelines, strict=True):
            targets = list(sparsities) if sparsities else [pipe.config.prune.sparsity]
            for target in targets:
                variant = {**raw, "prune": {**raw.get("prune", {}), "sparsity": target}}
                outcome = execute_run(variant, out=staging / "runs", quiet=quiet,
                                      name=f"{label.replace('/', '_')}-s{target:.2f}")
                r = outcome.result
                rows.append({
                    "label": label,
                    "config": str(raw.get("__source__", "")) or None,
                    "sparsity": r["sparsity"]["total"],
                    "target": target,
                    "accuracy_dense": r["accuracy"]["dense"],
                    "accuracy_pruned": r["accuracy"]["pruned"],
                    "accuracy_finetuned": r["accuracy"]["finetuned"],
                    "prune_seconds": r["time"].get("prune", r["time"].get("prune_and_finetune", 0.0)),
                    "peak_bytes": r["memory"]["peak_bytes"],
                    "run": f"runs/{outcome.run_dir.name}",
                })
        (staging / "comparison.json").write_text(json.dumps(rows, indent=2))
        (staging / "comparison.md").write_text(render_comparison(rows))
        plot_accuracy_vs_sparsity(rows, staging / "accuracy_vs_sparsity.png")
    return final
