"""Architectural bottlenecks: channel groups the global ranking keeps almost whole.

SOSP ranks all structures of all layers on one scale (estimated loss change), so the per-group
fraction it keeps is an output of the method. The paper's expand-pruning (Fig. 3, memo §4.6)
reads these ratios after a "train → prune" run: groups (VGG layers, ResNet blocks) with low
pruning ratios are the bottlenecks, widened by a factor of 2 before training and pruning again.

:func:`bottleneck_report` flags every group keeping at least ``threshold`` of its structures
and suggests its widened width; :func:`plot_bottlenecks` draws the kept fraction per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

__all__ = [
    "BottleneckReport",
    "GroupRatio",
    "bottleneck_report",
    "plot_bottlenecks",
    "plot_bottlenecks_from_run",
]


@attrs.frozen(kw_only=True)
class GroupRatio:
    """One channel group after pruning.

    Attributes:
        name: the group's name (its first producer's module name).
        size: structures before pruning.
        kept: structures kept.
        bottleneck: whether ``kept / size`` reaches the report's threshold.
        suggested_width: ``ceil(size · width_multiplier)`` for a bottleneck, else ``size``.

    """

    name: str
    size: int
    kept: int
    bottleneck: bool
    suggested_width: int

    @property
    def kept_fraction(self) -> float:
        """Fraction of the group's structures kept."""
        return self.kept / self.size if self.size else 1.0

    @property
    def pruning_ratio(self) -> float:
        """Fraction of the group's structures removed."""
        return 1.0 - self.kept_fraction


@attrs.frozen(kw_only=True)
class BottleneckReport:
    """Kept fraction per channel group and the bottlenecks among them.

    Attributes:
        groups: one :class:`GroupRatio` per group, in layout order.
        threshold: the kept fraction from which a group is a bottleneck.
        width_multiplier: the widening suggested for bottlenecks.

    """

    groups: tuple[GroupRatio, ...]
    threshold: float
    width_multiplier: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BottleneckReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a run's ``result.json``)."""
        groups = tuple(
            GroupRatio(**{k: v for k, v in g.items() if k != "kept_fraction"})
            for g in data["groups"]
        )
        return cls(groups=groups, threshold=float(data["threshold"]),
                   width_multiplier=float(data["width_multiplier"]))

    @property
    def bottlenecks(self) -> tuple[GroupRatio, ...]:
        """The flagged groups."""
        return tuple(g for g in self.groups if g.bottleneck)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "threshold": self.threshold,
            "width_multiplier": self.width_multiplier,
            "groups": [
                {**attrs.asdict(g), "kept_fraction": g.kept_fraction} for g in self.groups
            ],
            "bottlenecks": [g.name for g in self.bottlenecks],
        }

    def to_markdown(self) -> str:
        """Render a Markdown table: group, width, kept, kept fraction, bottleneck, new width."""
        lines = [
            f"Bottlenecks (kept ≥ {self.threshold:.0%} of a group; suggested width ×"
            f"{self.width_multiplier:g}):",
            "",
            "| group | width | kept | kept fraction | bottleneck | suggested width |",
            "|---|---:|---:|---:|:---:|---:|",
        ]
        for g in self.groups:
            mark = "yes" if g.bottleneck else ""
            lines.append(
                f"| {g.name} | {g.size} | {g.kept} | {g.kept_fraction:.0%} | {mark} | "
                f"{g.suggested_width} |"
            )
        return "\n".join(lines) + "\n"


def bottleneck_report(
    names: Sequence[str],
    group: Tensor,
    alive: Tensor,
    *,
    threshold: float = 0.9,
    width_multiplier: float = 2.0,
) -> BottleneckReport:
    """Flag the groups keeping at least ``threshold`` of their structures.

    Args:
        names: the name of every group.
        group: long ``[S]``, the group of every structure.
        alive: bool ``[S]``, the structures kept after pruning.
        threshold: kept fraction from which a group is a bottleneck, in [0, 1].
        width_multiplier: widening suggested for a bottleneck (> 0).

    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
    n = len(names)
    group = group.long().cpu()
    sizes = torch.bincount(group, minlength=n).tolist()
    kept = torch.bincount(group, weights=alive.cpu().double(), minlength=n).round().long().tolist()
    rows = []
    for name, size, k in zip(names, sizes, kept, strict=True):
        flag = size > 0 and k >= threshold * size - 1e-9
        width = math.ceil(size * width_multiplier - 1e-9) if flag else size
        rows.append(GroupRatio(name=name, size=size, kept=k, bottleneck=flag,
                               suggested_width=width))
    return BottleneckReport(groups=tuple(rows), threshold=threshold,
                            width_multiplier=width_multiplier)


def plot_bottlenecks(report: BottleneckReport, path: str | Path) -> None:
    """Bar chart of the kept fraction per group, bottlenecks highlighted, threshold dashed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [g.name for g in report.groups]
    fractions = [g.kept_fraction for g in report.groups]
    colors = ["tab:red" if g.bottleneck else "tab:blue" for g in report.groups]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.2))
    ax.bar(range(len(names)), fractions, color=colors)
    ax.axhline(report.threshold, color="black", linestyle="--", linewidth=0.8,
               label=f"bottleneck threshold {report.threshold:g}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction of structures")
    ax.set_title("SOSP: kept structures per channel group (red: bottleneck)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bottlenecks_from_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw the bottleneck plot of a SOSP run from its ``result.json`` (``scorer_report``).

    Args:
        run_dir: a ``curvprune run`` directory pruned with ``sosp-h`` or ``sosp-i``.
        path: the PNG to write (default: ``<run_dir>/bottlenecks.png``).

    Returns:
        The path written.

    Raises:
        ValueError: the run has no SOSP bottleneck report.

    """
    import json

    run_dir = Path(run_dir)
    record = json.loads((run_dir / "result.json").read_text())
    data = (record.get("scorer_report") or {}).get("bottlenecks")
    if data is None:
        raise ValueError(f"{run_dir} has no SOSP bottleneck report (scorer_report.bottlenecks)")
    out = Path(path) if path is not None else run_dir / "bottlenecks.png"
    plot_bottlenecks(BottleneckReport.from_dict(data), out)
    return out
