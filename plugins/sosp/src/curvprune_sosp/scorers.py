"""The ``sosp-h`` and ``sosp-i`` scorers (Nonnenmacher, Pfeil, Steinwart & Reeb, ICLR 2022).

Both score structures (one output channel of a channel group; a coupled residual channel is one
structure) in loss units under the second-order model of :mod:`curvprune_sosp.curvature`,

    ΔL(M) ≈ Σ_{s∈M} qₛ + ½·Σ_{s,s'∈M} Q_{ss'},   q = −∂L/∂m,  Q = G (gate-space Gauss-Newton),

and leave the global ranking to the core's ``channel`` mask (``scope = "global"``, no per-layer
normalisation: the scores are loss changes and compare across layers as they are).

* **SOSP-H** (memo Eq. 3): λₛ = qₛ + ½·(H𝟙)ₛ, the structure's share of the modelled loss change
  of removing every structure, its interaction with all structures of all layers included;
  Σₛ λₛ = ΔL(all). H is the exact gate-space Hessian (double backward; the paper's abstract
  describes SOSP-H with the whole Hessian) or, with ``hessian = "ggn"``, G (a dual-number
  forward and two backward passes); no S×S object either way. Ranked by |λₛ| (``absolute``).
* **SOSP-I**: the explicit S×S matrix Q and the greedy selection of
  :mod:`curvprune_sosp.selection`, whose interaction terms range over the structures actually
  removed. The scorer runs the greedy to the step's target count, with the mask's per-group
  minimum, and returns each structure's position in the greedy order as its score: the mask's
  ascending global ranking then removes exactly the greedy set.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvprune import ConfigError, ParamLayout, PruneContext, SaliencyScorer
from curvprune_sosp.bottleneck import BottleneckReport, bottleneck_report, plot_bottlenecks
from curvprune_sosp.config import SospHConfig, SospIConfig
from curvprune_sosp.curvature import (
    GateStatistics,
    StructureGGN,
    gradient_and_ggn_vector,
    gradient_and_hessian_vector,
    quadratic_form,
    structure_ggn,
)
from curvprune_sosp.gates import GateSpace, gate_space
from curvprune_sosp.losses import OutputCurvature, resolve_output_curvature
from curvprune_sosp.selection import GreedyResult, greedy_order, order_scores
from curvprune_sosp.stability import check_stability

__all__ = ["SospHScorer", "SospIScorer", "SospScorer"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SospScorer(SaliencyScorer):
    """What both SOSP scorers share: gate space, data, checks and the bottleneck report.

    Attributes:
        space: the gate space of the last :meth:`score` call.
        alive: bool ``[S]``, the structures alive at the last :meth:`score` call.
        rank_correlation: the split-half Spearman correlation measured there (None if not).
        bottlenecks: the :class:`BottleneckReport` of the last pipeline run (set by the
            plugin's ``curvprune_pipeline_end`` hook), or None.

    """

    granularity = "channel"
    needs_data: ClassVar[bool] = True
    scorer_name: ClassVar[str] = "sosp"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.min_channels = 1
        self.space: GateSpace | None = None
        self.alive: Tensor | None = None
        self.rank_correlation: float | None = None
        self.bottlenecks: BottleneckReport | None = None

    # -- pipeline checks ------------------------------------------------------------------------
    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Require coupled structures and ``min_channels >= 1``; remember ``min_channels``."""
        mask = components.get("mask")
        mask_config = getattr(mask, "config", None)
        if mask_config is not None and getattr(mask_config, "coupled", True) is False:
            return (
                f"scorer {self.scorer_name!r} gates traced channel groups (after BatchNorm, "
                "coupled residual channels shared); set coupled = true @ mask.coupled"
            )
        min_channels = getattr(mask_config, "min_channels", 1)
        if min_channels < 1:
            return (
                f"scorer {self.scorer_name!r} ranks globally and could remove every channel "
                "of a layer, which disconnects the network; keep at least one: set "
                "min_channels >= 1 @ mask.min_channels"
            )
        self.min_channels = int(min_channels)
        return None

    # -- shared steps ---------------------------------------------------------------------------
    def _prepare(self, ctx: PruneContext) -> tuple[GateSpace, Tensor, torch.device]:
        if ctx.batches is None:
            raise ConfigError(f"scorer {self.scorer_name!r} needs data batches @ data")
        device = next(iter(ctx.model.parameters())).device
        space = gate_space(ctx.model, ctx.layout, where="prune.targets")
        alive = space.alive(ctx.mask.to(device), ctx.layout)
        self.space, self.alive = space, alive
        return space, alive, device

    def _data(self, ctx: PruneContext) -> Iterable[Any]:
        """Return the scoring batches.

        ``ctx.batches(num_samples)`` when the source takes a sample count (the pipeline's does:
        under ``torch.distributed`` it cuts the data over all ranks as one process would, and
        yields this rank's slices), else ``ctx.batches()``.
        """
        assert ctx.batches is not None
        try:
            takes_count = bool(inspect.signature(ctx.batches).parameters)
        except (TypeError, ValueError):
            takes_count = False
        n = self.config.num_samples
        return ctx.batches(n) if takes_count else ctx.batches()  # type: ignore[call-arg]

    def _curvature(self, ctx: PruneContext):  # noqa: ANN202 - a closure factory
        def factory(out: Tensor, y: Tensor) -> OutputCurvature:
            return resolve_output_curvature(self.config.loss, ctx.loss_fn, out, y)

        return factory

    def _target_count(
        self, ctx: PruneContext, space: GateSpace, alive: Tensor
    ) -> tuple[int, Tensor]:
        """Structures to remove at this step and each group's quota (as the channel mask)."""
        kept = torch.bincount(space.group.to(alive.device), weights=alive.double(),
                              minlength=space.n_groups).long()
        quota = (kept - self.min_channels).clamp_min(0)
        removed = space.size - int(alive.sum())
        count = max(0, round(ctx.target_sparsity * space.size) - removed)
        allowed = int(quota.sum())
        if count > allowed:
            import warnings

            warnings.warn(
                f"{self.scorer_name}: the target removes {count} more of {space.size} "
                f"structures, but every channel group keeps min_channels = {self.min_channels}, "
                f"so at most {allowed} can go (sparsity "
                f"{(removed + allowed) / space.size:.3f} instead of {ctx.target_sparsity:g})",
                stacklevel=3,
            )
        return min(count, allowed), quota

    def _removed_set(self, ctx: PruneContext, pruned: Tensor) -> Tensor:
        assert self.space is not None
        mask = ctx.mask.to(pruned.device)
        return self.space.removed_by(mask, mask & ~pruned, ctx.layout)

    def bottleneck_report(self, alive_after: Tensor) -> BottleneckReport:
        """Build the :class:`BottleneckReport` for the structures ``alive_after`` (bool ``[S]``)."""
        if self.space is None:
            raise ValueError(f"{self.scorer_name}: no structures yet; score a model first")
        return bottleneck_report(
            self.space.group_names, self.space.group, alive_after,
            threshold=self.config.bottleneck_threshold,
            width_multiplier=self.config.width_multiplier,
        )

    def report(self) -> dict[str, Any] | None:
        """Return the run's ``scorer_report``: bottlenecks, rank correlation, a Markdown table."""
        if self.bottlenecks is None:
            return None
        rho = self.rank_correlation
        note = "" if rho is None else (
            f"\nSplit-half Spearman rank correlation of the scores: {rho:.3f}.\n")
        return {
            "bottlenecks": self.bottlenecks.to_dict(),
            "rank_correlation": rho,
            "markdown": self.bottlenecks.to_markdown() + note,
        }

    def write_figures(self, folder: Path) -> list[str]:
        """Write ``bottlenecks.png`` (kept fraction per group, bottlenecks highlighted)."""
        if self.bottlenecks is None:
            return []
        plot_bottlenecks(self.bottlenecks, Path(folder) / "bottlenecks.png")
        return ["bottlenecks.png"]

    def report_bottlenecks(self, mask: Tensor, layout: ParamLayout) -> BottleneckReport:
        """Build and keep the bottleneck report for the final keep-mask ``mask`` ``[d]``."""
        assert self.space is not None
        self.bottlenecks = self.bottleneck_report(self.space.alive(mask, layout))
        return self.bottlenecks


class SospHScorer(SospScorer):
    """SOSP-H: λₛ = −gₛ + ½·(H𝟙)ₛ from one Hessian-vector product per batch (memo Eq. 3).

    H is the exact gate-space Hessian (``hessian = "exact"``, default) or the Gauss-Newton
    matrix G (``hessian = "ggn"``).

    Attributes:
        saliency: the signed λ of the last :meth:`score` call, ``[S]`` float64 (0 for
            structures already removed).
        grad: g = ∂L/∂m, ``[S]`` float64.

    """

    scorer_name = "sosp-h"

    def __init__(self, config: SospHConfig | None = None) -> None:
        super().__init__(config or SospHConfig())
        self.saliency: Tensor | None = None
        self.grad: Tensor | None = None
        self._curv: OutputCurvature | None = None

    def score(self, ctx: PruneContext) -> Tensor:
        """|λₛ| (or λₛ with ``absolute = false``) per structure, ``[S]``."""
        space, alive, device = self._prepare(ctx)
        tangent = alive.to(torch.float64)
        product = (gradient_and_hessian_vector if self.config.hessian == "exact"
                   else gradient_and_ggn_vector)
        stats, curv = product(
            space, ctx.model, self._data(ctx), self._curvature(ctx), tangent,
            self.config.num_samples,
        )
        g, gv = stats.mean_grad(), stats.mean_ggn_vector()
        saliency = torch.where(alive, -g + 0.5 * gv, torch.zeros_like(g))
        self.saliency, self.grad, self._curv = saliency, g, curv
        self.rank_correlation = check_stability(
            _masked(stats, alive), alive, self.config.min_rank_correlation,
            scorer=self.scorer_name, num_samples=stats.num_samples,
            absolute=self.config.absolute,
        )
        return saliency.abs() if self.config.absolute else saliency

    def predicted_loss_change(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """ΔL(M) = −gᵀe_M + ½·e_MᵀHe_M for the removed set M, H as in :meth:`score`.

        Exact H: one more Hessian-vector product with tangent e_M. GGN: e_MᵀGe_M =
        (1/N)·Σₙ (Aₙe_M)ᵀΛₙ(Aₙe_M) on the same N samples from forward-mode products only.
        """
        if self.grad is None or self.space is None:
            return None
        removed = self._removed_set(ctx, pruned.to(self.grad.device))
        direction = removed.to(torch.float64)
        if not bool(removed.any()):
            return torch.zeros((), dtype=torch.float64)
        if self.config.hessian == "exact":
            stats, _ = gradient_and_hessian_vector(
                self.space, ctx.model, self._data(ctx), self._curvature(ctx), direction,
                self.config.num_samples)
            quad = (direction * stats.mean_ggn_vector()).sum()
        else:
            quad = quadratic_form(self.space, ctx.model, self._data(ctx), self._curv,
                                  direction, self.config.num_samples)
        return -(self.grad * direction).sum() + 0.5 * quad


class SospIScorer(SospScorer):
    """SOSP-I: the explicit S×S gate-space Gauss-Newton matrix and greedy selection.

    Attributes:
        ggn: the :class:`StructureGGN` of the last :meth:`score` call (Q, g, the Jacobian mode).
        greedy: the greedy picks of that call.

    """

    scorer_name = "sosp-i"
    memory_hint: ClassVar[str] = (
        "SOSP-I holds an S×S matrix (S = prunable channels): use scorer 'sosp-h' (no S×S "
        "object), dtype = 'float32', or select fewer layers ([prune] targets/ignore)"
    )

    def __init__(self, config: SospIConfig | None = None) -> None:
        super().__init__(config or SospIConfig())
        self.ggn: StructureGGN | None = None
        self.greedy: GreedyResult | None = None

    @staticmethod
    def matrix_bytes(size: int, config: SospIConfig | None = None) -> int:
        """Bytes SOSP-I holds for S = ``size`` structures.

        The S×S matrix plus one chunk's Jacobians and their Λ-products
        (2·``max_jacobian_elements`` numbers).
        """
        config = config or SospIConfig()
        itemsize = _DTYPES[config.dtype].itemsize
        return size * size * itemsize + 2 * config.max_jacobian_elements * 4

    def memory_bytes(self, model: nn.Module, layout: ParamLayout) -> int:
        """:meth:`matrix_bytes` for the structures of ``layout`` in ``model`` (for ``plan``)."""
        return self.matrix_bytes(gate_space(model, layout).size, self.config)

    def score(self, ctx: PruneContext) -> Tensor:
        """Each structure's position in the greedy order (picked first = 0), ``[S]``."""
        space, alive, device = self._prepare(ctx)
        ggn, _ = structure_ggn(
            space, ctx.model, self._data(ctx), self._curvature(ctx), self.config.num_samples,
            device=device, mode=self.config.jacobian, dtype=_DTYPES[self.config.dtype],
            max_jacobian_elements=self.config.max_jacobian_elements,
        )
        self.ggn = ggn
        halves = ggn.half_saliencies()
        self.rank_correlation = check_stability(
            halves, alive, self.config.min_rank_correlation, scorer=self.scorer_name,
            num_samples=int(ggn.count.sum()),
        )
        if self.config.selection != "greedy":
            self.greedy = None
            return self.saliencies(alive)
        count, quota = self._target_count(ctx, space, alive)
        self.greedy = greedy_order(-ggn.grad, ggn.matrix, count, candidates=alive,
                                   group=space.group.to(device), quota=quota)
        return order_scores(self.greedy.order, space.size)

    def saliencies(self, alive: Tensor) -> Tensor:
        """Per-structure scores of the non-greedy ``selection`` rules, ``[S]`` float64.

        With q = −g and Q restricted to the alive structures a: ``"diagonal"`` |qₛ + ½Qₛₛ|;
        ``"all"`` |qₛ + ½(Qa)ₛ|; ``"upper_bound"`` |qₛ + ½Qₛₛ| + ½·Σ_{s'≠s} |Q_{ss'}|a_{s'}.
        Structures already removed score 0.
        """
        assert self.ggn is not None
        q = -self.ggn.grad
        mat = self.ggn.matrix.to(torch.float64)
        a = alive.to(mat.device, torch.float64)
        diag = mat.diagonal()
        rule = self.config.selection
        if rule == "diagonal":
            score = (q + 0.5 * diag).abs()
        elif rule == "all":
            score = (q + 0.5 * (mat @ a)).abs()
        elif rule == "upper_bound":
            off = mat.abs() @ a - diag.abs() * a
            score = (q + 0.5 * diag).abs() + 0.5 * off
        else:  # pragma: no cover - validated by the config
            raise ValueError(rule)
        return torch.where(alive.to(score.device), score, torch.zeros_like(score))

    def predicted_loss_change(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """ΔL(M) = Σ_M qₛ + ½·Σ_{M×M} Q for the removed set M, read from Q."""
        if self.ggn is None:
            return None
        removed = self._removed_set(ctx, pruned.to(self.ggn.grad.device))
        e = removed.to(torch.float64)
        q = self.ggn.matrix.to(torch.float64)
        return -(self.ggn.grad * e).sum() + 0.5 * (e @ q @ e)


def _masked(stats: GateStatistics, alive: Tensor) -> Tensor | None:
    halves = stats.half_saliencies()
    return None if halves is None else torch.where(alive, halves, torch.zeros_like(halves))

