"""Human-readable views of run results: Markdown reports and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "plot_accuracy_vs_sparsity",
    "plot_layer_sparsity",
    "render_comparison",
    "render_report",
]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, fmt: str = ".4g") -> str:
    return "–" if value is None else format(value, fmt)


def render_report(result: Mapping[str, Any]) -> str:
    """The ``report.md`` of a run, from its ``result.json`` content."""
    acc, loss, sp = result["accuracy"], result["loss"], result["sparsity"]
    methods = result["methods"]
    lines = [
        f"# curvprune run `{result['run']['name']}`",
        "",
        f"Model `{result['model']['name']}` ({result['model']['parameters']:,} parameters, "
        f"{result['model']['selected']:,} selected for pruning) on `{result['data']['name']}`, "
        f"device `{result['run']['device']}`, seed {result['run']['seed']}.",
        "",
        "Methods: " + ", ".join(f"{k} `{v}`" for k, v in methods.items() if v) + ".",
        "",
        "| | dense | pruned | fine-tuned |",
        "|---|---|---|---|",
        f"| accuracy | {_pct(acc['dense'])} | {_pct(acc['pruned'])} | {_pct(acc['finetuned'])} |",
        f"| loss | {_num(loss['dense'])} | {_num(loss['pruned'])} | {_num(loss['finetuned'])} |",
        "",
        f"Sparsity: {_pct(sp['total'])} of the selected weights (target {_pct(sp['target'])}), "
        f"{_pct(sp['overall'])} of all parameters.",
        "",
        "## Pruning steps",
        "",
        "| step | target | reached | pruned | predicted ΔL | measured ΔL | gradients | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['step']} | {_pct(s['target_sparsity'])} | {_pct(s['sparsity'])} | "
            f"{s['num_pruned']:,} | {_num(s['predicted_loss_change'])} | "
            f"{_num(s['measured_loss_change'])} | {s['num_grads']} | {s['times'].get('total', 0):.2f} |"
        )
    lines += ["", "## Sparsity per layer", "", "| parameter | shape | sparsity |", "|---|---|---|"]
    shapes = {layer["name"]: layer["shape"] for layer in result["plan"]["layers"]}
    for name, value in sp["per_layer"].items():
        lines.append(f"| `{name}` | {'×'.join(map(str, shapes.get(name, [])))} | {_pct(value)} |")
    t, mem = result["time"], result["memory"]
    lines += [
        "",
        "## Time and memory",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in t.items()),
        "",
        f"Peak memory: {mem['peak_bytes'] / 2**20:.0f} MiB ({mem['measure']}); "
        f"planned for pruning: {mem['planned_bytes'] / 2**20:.1f} MiB.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "![sparsity per layer](layer_sparsity.png)",
        "",
    ]
    return "\n".join(lines)


def plot_layer_sparsity(result: Mapping[str, Any], path: Path) -> None:
    """A horizontal bar chart of the sparsity of each selected parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer = result["sparsity"]["per_layer"]
    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), [100 * per_layer[n] for n in names], color="#4c72b0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    ax.axvline(100 * result["sparsity"]["total"], color="k", lw=1, ls="--", label="total")
    ax.set_title(f"Sparsity per layer — {result['run']['name']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_sparsity(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Accuracy against sparsity, one line per method, pruned (solid) and fine-tuned (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    for i, (label, points) in enumerate(sorted(by_label.items())):
        points = sorted(points, key=lambda r: r["sparsity"])
        xs = [100 * p["sparsity"] for p in points]
        color = f"C{i % 10}"
        pruned = [(x, p["accuracy_pruned"]) for x, p in zip(xs, points, strict=True) if p["accuracy_pruned"] is not None]
        if pruned:
            ax.plot(*zip(*[(x, 100 * a) for x, a in pruned], strict=True), "o-", color=color, label=f"{label} (pruned)")
        tuned = [(x, p["accuracy_finetuned"]) for x, p in zip(xs, points, strict=True) if p["accuracy_finetuned"] is not None]
        if tuned:
            ax.plot(*zip(*[(x, 100 * a) for x, a in tuned], strict=True), "s--", color=color, alpha=0.7,
                    label=f"{label} (fine-tuned)")
    dense = [r["accuracy_dense"] for r in rows if r.get("accuracy_dense") is not None]
    if dense:
        ax.axhline(100 * dense[0], color="k", lw=1, ls=":", label="dense")
    ax.set_xlabel("sparsity of the selected weights (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table of ``curvprune compare``."""
    lines = [
        "# curvprune compare",
        "",
        "| method | sparsity | dense | pruned | fine-tuned | prune seconds | peak MiB | run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_pct(r['sparsity'])} | {_pct(r['accuracy_dense'])} | "
            f"{_pct(r['accuracy_pruned'])} | {_pct(r['accuracy_finetuned'])} | "
            f"{r['prune_seconds']:.2f} | {r['peak_bytes'] / 2**20:.0f} | `{r['run']}` |"
        )
    lines += ["", "![accuracy vs sparsity](accuracy_vs_sparsity.png)", ""]
    return "\n".join(lines)
