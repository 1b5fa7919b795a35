"""Registration hooks of the ``curvprune-sosp`` distribution (entry point ``sosp``).

Registers the ``sosp-h`` and ``sosp-i`` scorers, and observes the end of a pipeline run to
build the bottleneck report (:mod:`curvprune_sosp.bottleneck`) of a SOSP pruning.
"""

from __future__ import annotations

import logging
from typing import Any

from curvprune import Register, hookimpl
from curvprune_sosp.config import SospHConfig, SospIConfig
from curvprune_sosp.scorers import SospHScorer, SospIScorer, SospScorer

log = logging.getLogger("curvprune_sosp")


@hookimpl
def curvprune_register_saliency_scorers(register: Register) -> None:
    """Register ``sosp-h`` and ``sosp-i``."""
    register("sosp-h", SospHScorer, config=SospHConfig)
    register("sosp-i", SospIScorer, config=SospIConfig)


@hookimpl
def curvprune_pipeline_end(pipeline: Any, result: Any) -> None:
    """After a SOSP pruning: per-group kept fractions and bottlenecks, kept on the scorer.

    The report is ``pipeline.scorer.bottlenecks`` (a :class:`~curvprune_sosp.BottleneckReport`)
    and is logged; other scorers are left alone.
    """
    scorer = pipeline.scorer
    if not isinstance(scorer, SospScorer) or scorer.space is None:
        return
    report = scorer.report_bottlenecks(result.masks.flat, result.masks.layout)
    log.info(
        "sosp bottlenecks: %s",
        ", ".join(f"{g.name} (kept {g.kept}/{g.size})" for g in report.bottlenecks) or "none",
        extra={"bottlenecks": report.to_dict()},
    )
