"""Human-readable views of run results: Markdown reports and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "plot_accuracy_vs_sparsity",
    "plot_layer_ratios",
    "plot_layer_sparsity",
    "plot_single_audit",
    "render_comparison",
    "render_report",
]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, fmt: str = ".4g") -> str:
    return "–" if value is None else format(value, fmt)


#: Row labels of the run's metric in report.md.
_METRIC_LABELS = {"accuracy": "accuracy", "perplexity": "perplexity (held out)"}


def render_report(result: Mapping[str, Any]) -> str:
    """The ``report.md`` of a run, from its ``result.json`` content."""
    metric = result.get("metric", "accuracy")  # the task's: accuracy, or perplexity for text
    score, loss, sp = result[metric], result["loss"], result["sparsity"]
    show = _pct if metric == "accuracy" else (lambda v: _num(v, ".2f"))
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
        f"| {_METRIC_LABELS.get(metric, metric)} | {show(score['dense'])} | "
        f"{show(score['pruned'])} | {show(score['finetuned'])} |",
        f"| loss | {_num(loss['dense'])} | {_num(loss['pruned'])} | {_num(loss['finetuned'])} |",
        "",
        *_sparsity_lines(result),
        *_warning_lines(result),
        "## Pruning steps",
        "",
        "Each step prunes to its target with curvature from fresh gradients; *predicted ΔL* is "
        "the scorer's estimate of the loss increase (OBS: Σ w²/(2[F⁻¹]_qq)), *measured ΔL* the "
        "loss on the fixed audit samples after the step minus before.",
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
    lines += _audit_lines(result)
    lines += _structure_lines(result)
    lines += _scorer_report_lines(result)
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
        f"Peak memory: {mem['peak_bytes'] / 2**20:.0f} MiB ({mem['measure']}), the whole run "
        f"(training included); planned for one pruning step: "
        f"{mem['planned_bytes'] / 2**20:.1f} MiB (the plan counts tensors only).",
        *_rank_lines(result),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "![sparsity per layer](layer_sparsity.png)",
        "",
    ]
    return "\n".join(lines)


def _rank_lines(result: Mapping[str, Any]) -> list[str]:
    """Per-rank seconds and peaks of a distributed prune, summed over its steps."""
    steps = [s for s in result["steps"] if s.get("ranks")]
    if not steps:
        return []
    lines = [
        "",
        "### Per rank",
        "",
        "Seconds summed over the pruning steps; peaks are each phase's high-water mark "
        "(collect: gradients, their exchange and the estimator's accumulation; answer: the "
        "estimator's factorisation and queries, scoring and the update; the resident set on "
        "CPU, which includes the interpreter).",
        "",
        "| rank | gradients | communication | curvature | scoring | collect peak | answer peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in range(len(steps[0]["ranks"])):
        rows = [s["ranks"][r] for s in steps]
        secs = [sum(float(x.get(k) or 0.0) for x in rows)
                for k in ("gradients", "communication", "curvature", "scoring")]
        peaks = [max((x.get(k) or 0) for x in rows) for k in ("collect_peak_bytes",
                                                              "answer_peak_bytes")]
        lines.append(f"| {r} | " + " | ".join(f"{v:.2f} s" for v in secs) + " | "
                     + " | ".join(f"{v / 2**20:.0f} MiB" if v else "–" for v in peaks) + " |")
    return lines


def _sparsity_lines(result: Mapping[str, Any]) -> list[str]:
    """Sparsity of the selected weights, and of the whole model in the right terms."""
    sp = result["sparsity"]
    lines = [f"Sparsity: {_pct(sp['total'])} of the selected weights (target "
             f"{_pct(sp['target'])})."]
    s = result.get("structure")
    if s:  # the smaller model has no zeros left to count: say what shrank instead
        cut = 1 - s["params_after"] / s["params_before"] if s["params_before"] else 0.0
        lines[-1] += (f" The channels were removed physically: the model has "
                      f"{_pct(cut).strip()} fewer Conv and Linear parameters (below).")
        flops = (1 - s["flops_after"] / s["flops_before"]
                 if s.get("flops_before") and s.get("flops_after") is not None else None)
        lines += ["", "| target (channel structures) | structures removed | parameters cut | "
                      "FLOPs cut |", "|---|---|---|---|",
                  f"| {_pct(sp['target'])} | {_pct(sp.get('unit', sp['total']))} | "
                  f"{_pct(cut)} | {'–' if flops is None else _pct(flops)} |"]
    else:
        lines[-1] += f" Zeros make up {_pct(sp['overall']).strip()} of all parameters."
    return [*lines, ""]


def _warning_lines(result: Mapping[str, Any]) -> list[str]:
    """The run's warnings (sample reuse, unstable rankings, ...), each on one line."""
    warned = result.get("warnings") or []
    if not warned:
        return []
    return ["**Warnings** (the run went on):", "", *(f"* {w}" for w in warned), ""]


def _ratio_meaning(ratio: float) -> str:
    """One line saying how to read measured / predicted for a summed loss change."""
    if ratio < 0:
        return ("The loss moved the other way than predicted: the quadratic model does not "
                "describe this step (far from a minimum, or too large a step).")
    if ratio < 0.5:
        return ("The measured change is well below the prediction: pruning cost less than the "
                "quadratic model says (the compensating update helped more, or the curvature "
                "overestimates).")
    if ratio <= 2:
        return "The quadratic model predicted the loss change to within a factor of 2."
    return (f"The measured change is {ratio:.3g}× the prediction: the steps left the region "
            "where the local quadratic model holds (more steps, i.e. a smaller sparsity "
            "increase per step, or more gradients bring them closer).")


def _scorer_report_lines(result: Mapping[str, Any]) -> list[str]:
    """The scorer's own report section (e.g. SOSP's bottlenecks), when it wrote one."""
    markdown = (result.get("scorer_report") or {}).get("markdown")
    return ["", "## Scorer report", "", markdown.rstrip()] if markdown else []


def _structure_lines(result: Mapping[str, Any]) -> list[str]:
    """Physical channel removal: parameters and FLOPs before and after, kept channels."""
    s = result.get("structure")
    if not s:
        return []

    def ratio(before: float | None, after: float | None) -> str:
        return f"{before / after:.2f}×" if before and after else "–"

    lines = [
        "", "## Channels removed", "",
        "| | before | after | reduction |", "|---|---|---|---|",
        f"| parameters (Conv, Linear) | {s['params_before']:,} | {s['params_after']:,} | "
        f"{ratio(s['params_before'], s['params_after'])} |",
    ]
    if s.get("flops_before") is not None:
        lines.append(f"| FLOPs per sample | {s['flops_before']:,} | {s['flops_after']:,} | "
                     f"{ratio(s['flops_before'], s['flops_after'])} |")
    latency = s.get("latency")
    if latency:
        lines += [
            "", f"Measured inference latency ({latency['device']}, {latency['threads']} threads, "
            f"median over {latency['rounds']} alternating rounds):", "",
            "| batch | dense (ms) | pruned (ms) | speed-up |", "|---|---|---|---|",
            *(f"| {b} | {v['dense_ms']:.3f} | {v['pruned_ms']:.3f} | "
              f"{v['speedup']:.2f}× |" for b, v in latency["batch_sizes"].items()),
        ]
    lines += [
        "",
        "Largest output difference between the masked and the smaller model on one batch: "
        f"{_num(s.get('max_output_difference'))}.",
        "", "| channel group | kept | of |", "|---|---|---|",
        *(f"| `{name}` | {kept} | {size} |" for name, (kept, size) in s["kept"].items()),
        "", "![channels removed per layer](layer_ratios.png)",
    ]
    return lines


def plot_layer_ratios(result: Mapping[str, Any], path: Path) -> None:
    """A horizontal bar chart of the fraction of output channels removed per layer."""
    _percent_bars(
        result["structure"]["layer_ratios"], path, color="#c44e52",
        xlabel="output channels removed (%)",
        title=f"Channels removed per layer — {result['run']['name']}",
    )


def _audit_lines(result: Mapping[str, Any]) -> list[str]:
    """The loss-change audit: summed prediction against measurement, and the single-weight audit."""
    change = result.get("loss_change", {})
    predicted, measured = change.get("predicted"), change.get("measured")
    if predicted is None and not change.get("single"):
        return []
    lines = ["", "## Loss-change audit", ""]
    if predicted is not None:
        ratio = (f" (measured / predicted = {measured / predicted:.3g})"
                 if measured is not None and predicted else "")
        lines.append(
            f"Predicted loss change summed over the steps: {_num(predicted)}; measured on the "
            f"audit samples: {_num(measured)}{ratio}. Per step in the table above."
        )
        if measured is not None and predicted:
            lines += ["", _ratio_meaning(measured / predicted)]
    single = change.get("single") or []
    if single:
        lines += [
            "",
            f"Single-weight audit ({single[0]['samples']} weights sampled before each step; the "
            "predicted change of removing each alone, with the scorer's compensation, against "
            "the measured change. For OBS-type predictions ½δwᵀ(F₀ + λI)δw, *curvature* compares "
            "the undamped part ½δwᵀF₀δw with the measured change less its exact first-order "
            "part ∇Lᵀδw on the audit samples, and *first order only* ranks by ∇Lᵀδw alone):",
            "",
            "| step | samples | Spearman ρ | Pearson r | Spearman ρ, curvature | Spearman ρ, first order only |",
            "|---|---|---|---|---|---|",
            *(f"| {a['step']} | {a['samples']} | {_num(a['spearman'], '.3f')} | "
              f"{_num(a['pearson'], '.3f')} | {_num(a.get('spearman_curvature'), '.3f')} | "
              f"{_num(a.get('spearman_first_order'), '.3f')} |" for a in single),
            "",
            "![single-weight audit](single_weight_audit.png)",
        ]
    return lines


def plot_single_audit(result: Mapping[str, Any], path: Path) -> None:
    """Scatter of predicted against measured single-weight loss change, one colour per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["single_audit"] for s in result["steps"] if s.get("single_audit")]
    with_model = any(a.get("first_order") is not None for a in steps)  # the second panel
    fig, axes = plt.subplots(1, 2 if with_model else 1, figsize=(11 if with_model else 5.5, 5),
                             squeeze=False)
    _audit_scatter(axes[0][0], steps, curvature=False)
    if with_model:
        _audit_scatter(axes[0][1], steps, curvature=True)
    fig.suptitle(f"Single-weight removals — {result['run']['name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _audit_scatter(ax: Any, steps: list[Mapping[str, Any]], *, curvature: bool) -> None:
    """One panel of :func:`plot_single_audit`: measured against predicted, or their parts.

    With ``curvature``: measured − ∇Lᵀδw against predicted − ½λ‖δw‖² (see
    :mod:`curvprune.pipeline.audit`).
    """
    lo, hi = float("inf"), float("-inf")
    for i, audit in enumerate(steps):
        if curvature:
            if audit.get("first_order") is None:
                continue
            xs = [p - h for p, h in zip(audit["predicted"], audit["damping_part"], strict=True)]
            ys = [m - g for m, g in zip(audit["measured"], audit["first_order"], strict=True)]
            rho = audit.get("spearman_curvature")
        else:
            xs, ys, rho = audit["predicted"], audit["measured"], audit["spearman"]
        ax.scatter(xs, ys, s=9, alpha=0.6, color=f"C{i % 10}",
                   label=f"step {audit['step']}: Spearman {_num(rho, '.3f')}")
        magnitudes = [abs(v) for v in (*xs, *ys) if v != 0]
        if magnitudes:
            lo, hi = min(lo, *magnitudes), max(hi, *magnitudes)
    lo = max(lo, hi * 1e-7)  # round-off-sized values (1e-17 differences) sit in the linear part
    if lo < hi:
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls=":", label="measured = predicted")
        ax.set_xscale("symlog", linthresh=lo)
        ax.set_yscale("symlog", linthresh=lo)
    ax.set_xlabel("predicted − ½λ‖δw‖²" if curvature else "predicted loss change")
    ax.set_ylabel("measured − ∇Lᵀδw" if curvature else "measured loss change")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def plot_layer_sparsity(result: Mapping[str, Any], path: Path) -> None:
    """A horizontal bar chart of the sparsity of each selected parameter."""
    _percent_bars(
        result["sparsity"]["per_layer"], path, color="#4c72b0", xlabel="sparsity (%)",
        title=f"Sparsity per layer — {result['run']['name']}", total=result["sparsity"]["total"],
    )


def _percent_bars(
    values: Mapping[str, float], path: Path, *, color: str, xlabel: str, title: str,
    total: float | None = None,
) -> None:
    """One horizontal bar per name, fractions drawn as percentages; ``total`` as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), [100 * values[n] for n in names], color=color)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(xlabel)
    if total is not None:
        ax.axvline(100 * total, color="k", lw=1, ls="--", label="total")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(mean: float | None, std: float | None, seeds: int, fmt: str = ".2f", scale: float = 100.0,
        unit: str = " %") -> str:
    """``mean ± std`` (just ``mean`` for one seed); ``–`` when missing."""
    if mean is None:
        return "–"
    text = format(scale * mean, fmt)
    if seeds > 1 and std is not None:
        text += " ± " + format(scale * std, fmt)
    return text + unit


def _x_axis(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """Plot against remaining FLOPs when every successful row has them (structured runs)."""
    done = [r for r in rows if r.get("failed", 0) < r.get("runs", 1)]
    if done and all(r.get("flops_fraction") is not None for r in done):
        return "flops_fraction", "FLOPs left after pruning (% of dense)"
    return "sparsity", "sparsity of the selected weights (%)"


def _metric(rows: Sequence[Mapping[str, Any]]) -> tuple[str, float, str]:
    """The rows' metric (one data set per comparison: one metric), its scale and its unit."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")
    return (metric, 100.0, " %") if metric == "accuracy" else (metric, 1.0, "")


def plot_accuracy_vs_sparsity(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The task's metric against sparsity (or remaining FLOPs), one colour per method.

    The metric is accuracy, or held-out perplexity for text. ``rows`` are
    :func:`curvprune.run.compare.summarize` rows: pruned solid, fine-tuned dashed, error bars one
    standard deviation over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, xlabel = _x_axis(rows)
    metric, scale, _ = _metric(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get(key) is not None:
            by_label.setdefault(row["label"], []).append(row)
    for i, (label, points) in enumerate(sorted(by_label.items())):
        points = sorted(points, key=lambda r: r[key])
        color = f"C{i % 10}"
        for field, style, suffix in ((f"{metric}_pruned", "o-", "pruned"),
                                     (f"{metric}_finetuned", "s--", "fine-tuned")):
            pts = [p for p in points if p.get(field) is not None]
            if not pts:
                continue
            ax.errorbar([100 * p[key] for p in pts], [scale * p[field] for p in pts],
                        yerr=[scale * (p.get(f"{field}_std") or 0.0) for p in pts], fmt=style,
                        color=color, capsize=3, alpha=1.0 if suffix == "pruned" else 0.7,
                        label=f"{label} ({suffix})")
    dense = [r[f"{metric}_dense"] for r in rows if r.get(f"{metric}_dense") is not None]
    if dense:
        ax.axhline(scale * dense[0], color="k", lw=1, ls=":", label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else "held-out perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_comparison(rows: Sequence[Mapping[str, Any]], *, seeds: int = 1) -> str:
    """The Markdown of ``curvprune compare`` from :func:`curvprune.run.compare.summarize` rows.

    One row per method and target (mean ± std over ``seeds``), failed cells with their reason,
    then the task's metric (accuracy, or perplexity for text) against sparsity as one table
    (methods as columns).
    """
    key, _ = _x_axis(rows)
    metric, scale, unit = _metric(rows)

    def pm(r: Mapping[str, Any], when: str) -> str:
        field = f"{metric}_{when}"
        return _pm(r.get(field), r.get(f"{field}_std"), seeds, scale=scale, unit=unit)

    flops = key == "flops_fraction"
    lines = [
        "# curvprune compare",
        "",
        f"{seeds} seed{'s' if seeds > 1 else ''} per cell"
        + (" (mean ± standard deviation)" if seeds > 1 else "") + "; dense, pruned and "
        f"fine-tuned are the test {metric}.",
        "",
        "| method | target | sparsity |" + (" FLOPs left |" if flops else "")
        + " dense | pruned | fine-tuned | prune seconds | peak MiB | runs |",
        "|---|---|---|" + ("---|" if flops else "") + "---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['label']} | {_pct(r['target'])} |"
        if r["failed"] == r["runs"]:
            reason = "; ".join(r["errors"]).replace("|", "\\|")
            lines.append(head + " failed: " + reason + " |" + " |" * (7 if flops else 6))
            continue
        cells = [
            _pm(r["sparsity"], r["sparsity_std"], seeds),
            *([_pm(r["flops_fraction"], r["flops_fraction_std"], seeds)] if flops else []),
            pm(r, "dense"),
            pm(r, "pruned"),
            pm(r, "finetuned"),
            _pm(r["prune_seconds"], r["prune_seconds_std"], seeds, scale=1.0, unit=""),
            _pm(r["peak_bytes"], r["peak_bytes_std"], seeds, fmt=".0f", scale=2**-20, unit=""),
            f"{r['runs'] - r['failed']}/{r['runs']}"
            + (f" ({'; '.join(r['errors'])})".replace("|", "\\|") if r["failed"] else ""),
        ]
        lines.append(head + " " + " | ".join(cells) + " |")
    labels = list(dict.fromkeys(r["label"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    cell = {(r["label"], r["target"]): r for r in rows}
    lines += [
        "",
        f"## {metric.capitalize()} vs sparsity",
        "",
        ("Test accuracy" if metric == "accuracy" else "Held-out perplexity")
        + " right after pruning (after fine-tuning in brackets, where run).",
        "",
        "| target | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for target in targets:
        parts = []
        for label in labels:
            r = cell.get((label, target))
            if r is None:
                parts.append("")
            elif r["failed"] == r["runs"]:
                parts.append("failed")
            else:
                text = pm(r, "pruned")
                if r.get(f"{metric}_finetuned") is not None:
                    text += f" ({pm(r, 'finetuned')})"
                parts.append(text)
        lines.append(f"| {_pct(target)} | " + " | ".join(parts) + " |")
    lines += ["", "![accuracy vs sparsity](accuracy_vs_sparsity.png)", ""]
    return "\n".join(lines)
