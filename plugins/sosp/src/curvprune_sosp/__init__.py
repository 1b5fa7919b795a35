"""SOSP for curvprune: second-order structured pruning (SOSP-H, SOSP-I) with global ranking.

Nonnenmacher, Pfeil, Steinwart & Reeb, "SOSP: Efficiently Capturing Global Correlations by
Second-Order Structured Pruning", ICLR 2022. Scorers ``sosp-h`` and ``sosp-i`` (with the core's
``channel`` mask); the bottleneck report of :mod:`curvprune_sosp.bottleneck`.
"""

from curvprune_sosp.bottleneck import (
    BottleneckReport,
    GroupRatio,
    bottleneck_report,
    plot_bottlenecks,
    plot_bottlenecks_from_run,
)
from curvprune_sosp.config import SospHConfig, SospIConfig
from curvprune_sosp.scorers import SospHScorer, SospIScorer, SospScorer
from curvprune_sosp.selection import GreedyResult, greedy_order
from curvprune_sosp.stability import RankingStabilityWarning, spearman

__all__ = [
    "BottleneckReport",
    "GreedyResult",
    "GroupRatio",
    "RankingStabilityWarning",
    "SospHConfig",
    "SospHScorer",
    "SospIConfig",
    "SospIScorer",
    "SospScorer",
    "bottleneck_report",
    "greedy_order",
    "plot_bottlenecks",
    "plot_bottlenecks_from_run",
    "spearman",
]
