"""Ranking stability: the Spearman correlation of scores from two halves of the samples.

With too few samples the saliencies are noisy and the global ranking (and with it the pruned
set) depends on which samples were drawn. The scorers accumulate their sums separately over the
even and the odd batches; the rank correlation of the two half-sample scores over the alive
structures estimates how reproducible the ranking is (memo §4.5). Below the configured threshold
the scorer warns with the measured value.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from curvprune import CurvpruneWarning

__all__ = ["RankingStabilityWarning", "average_ranks", "check_stability", "spearman"]


class RankingStabilityWarning(CurvpruneWarning):
    """The two halves of the samples rank the structures differently: use more samples."""


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..n−1 of ``x`` ``[n]``, ties sharing their average rank (float64)."""
    values, index = torch.sort(x.double())
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    average = first.double() + (counts.double() - 1) / 2
    ranks = torch.empty_like(average[inverse])
    ranks[index] = average[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` ``[n]`` (Pearson of average ranks).

    Returns 1.0 for fewer than two entries or when one side is constant (nothing to rank).
    """
    if a.numel() < 2:
        return 1.0
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if float(denom) == 0.0:
        return 1.0
    return float((ra * rb).sum() / denom)


def check_stability(
    halves: Tensor | None, alive: Tensor, threshold: float, *, scorer: str, num_samples: int,
    absolute: bool = True,
) -> float | None:
    """Warn when the half-sample rankings of the alive structures correlate below ``threshold``.

    Args:
        halves: ``[2, S]`` scores from each half (None: a half was empty; nothing to check).
        alive: bool ``[S]``, the structures still to rank.
        threshold: the smallest acceptable Spearman correlation (0 disables the warning).
        scorer: the scorer's name, for the message.
        num_samples: samples used in all, for the message.
        absolute: rank by absolute value (as the scorer does).

    Returns:
        The measured correlation, or None when it could not be measured.

    """
    if halves is None:
        if threshold > 0:
            warnings.warn(
                f"{scorer}: ranking stability not measured (one batch only, {num_samples} "
                "samples); use at least two batches",
                RankingStabilityWarning,
                stacklevel=3,
            )
        return None
    a, b = halves[0][alive], halves[1][alive]
    if absolute:
        a, b = a.abs(), b.abs()
    rho = spearman(a, b)
    if threshold > 0 and rho < threshold:
        warnings.warn(
            f"{scorer}: the scores of two halves of the {num_samples} samples have Spearman "
            f"rank correlation {rho:.3f} < {threshold:g}; the ranking is unstable: raise "
            "scorer.num_samples",
            RankingStabilityWarning,
            stacklevel=3,
        )
    return rho
