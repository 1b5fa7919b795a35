"""The ``greg`` schedule: GReg-1 and GReg-2 (Wang, Qin, Zhang & Fu, ICLR 2021) as a state machine.

The penalty. Before every optimizer step the schedule adds, to the gradient of each selected
Conv/Linear weight W, the gradient of ½ Σ_j λ_j ‖W_j‖² over its groups j::

    grad ← grad + λ ⊙ W                 (λ broadcast from one value per group)

so it passes through SGD momentum like any gradient, while the optimizer's own weight decay still
acts on every parameter (memo §1.3). Biases and BatchNorm parameters are never penalised.

The states (memo §1.4, §1.5), with t the iteration (optimizer step, from 0) and K_u, K_s, δλ, τ, ...
the options of :class:`~curvprune_greg.GRegConfig`::

    GReg-1:                     GReg-2:
      bind: P_ℓ = n_p lowest      bind: nothing picked
      │                            │
      │                          pick ── every K_u: λ = k·δλ_pick on all groups of layers with
      │                            │     n_p > 0; once λ ≥ τ_pick: P_ℓ = n_p lowest *current* s_j
      ▼                            ▼
    grow ── every K_u (t % K_u = 0, before the step's penalty): EMA_ℓ ← 0.9·EMA_ℓ + 0.1·ρ_ℓ
      │     (ρ_ℓ = mean kept s / mean pruned s, structured modes only; the first ρ starts the
      │     EMA), then λ_j = λ₀ + k·δλ on P_ℓ (λ₀ = 0, or GReg-2's pick value) and 0 (GReg-1)
      │     or ``reg_granularity_recover`` (GReg-2) on kept groups. Leave once max λ > τ, or
      │     (structured) once every pruned layer's EMA ≥ ``mag_ratio_limit``.
      ▼
    stabilize ── λ frozen, for K_s iterations after the one that left ``grow``
      │
      ▼
    removed ── :meth:`level_at` returns the level and :meth:`select` the keep-mask of the kept
               groups after step t_s + K_s; no penalty after that (fine-tuning is plain).

λ is recomputed as k·δλ from the update count k (not accumulated by repeated addition), so it
matches the formula to one rounding.

GReg-1: all layers share the counts: every layer with n_p > 0 grows alike, so they leave ``grow``
together (layers with n_p = 0 count as finished from the start, as in the reference). The
reference checks the ratio condition layer by layer inside one update, reading the other layers'
EMA from the previous update for layers not yet visited; here every layer's EMA is updated first
and then the condition is checked once (order-independent).

GReg-2 (the reference's ``_greg_2``): each layer stops on its own. During ``pick`` the EMA of every
pruned layer is updated against the *moving* L1 set (its n_p lowest groups at that update), so it
is warm when the layer picks; after the pick it follows the picked set. A layer finishes once it
has picked and (structured) its own EMA ≥ ``mag_ratio_limit``, or its λ > τ; a finished layer's
λ is frozen (still applied) while the others keep growing; ``grow`` ends when every layer has
finished. The per-layer count k_ℓ gives λ_ℓ = λ_pick + k_ℓ·δλ.

Cost: one fused multiply-add per selected parameter per step; the magnitude statistics (one
reduction per layer and a single host synchronisation) only at update iterations, every K_u steps.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvprune import ConfigError, ParamLayout, PruneContext, Scheduler
from curvprune_greg.config import GRegConfig
from curvprune_greg.group_select import filter_group_scores
from curvprune_greg.groups import (
    LayerPlan,
    broadcast,
    group_scores,
    pick_lowest,
    resolve_ratios,
)
from curvprune_greg.rules import excluded_layers, gate_parameters

__all__ = ["GRegSchedule"]

log = logging.getLogger("curvprune_greg")

#: Phases, in order. ``pick`` only exists for GReg-2.
PHASES = ("unbound", "pick", "grow", "stabilize", "removed")

# λ_pick = k·δλ_pick ≥ τ_pick must hold at k = τ_pick/δλ_pick although the quotient of two decimal
# floats can land a few ulps off (1e-2/1e-5 = 999.9999999999999); a relative slack of 1e-9 is far
# below one increment (k ≤ 10⁸ for any sensible setting) and far above the round-off.
_PICK_SLACK = 1e-9

_MAG_EMA = 0.9  # EMA ← 0.9·EMA + 0.1·ratio (the reference's smoothing)


class GRegSchedule(Scheduler):
    """Growing-regularization pruning (GReg-1 / GReg-2) inside a training loop.

    Drive it through a :class:`curvprune.PruningSession` (``before_optimizer_step`` adds the
    penalty, ``step`` removes the groups when the state machine says so; the session passes its
    iteration as ``step``) or, in ``curvprune run``, through the prune phase (SGD with
    ``lr_prune``, ``momentum`` and ``weight_decay`` until :meth:`finished`).

    The pruning ratio of a layer is ``ratios[selector]`` or ``[prune] sparsity``; the schedule
    learns the latter from the pipeline (:meth:`check_pipeline`) or from :meth:`bind`.
    """

    during_training: ClassVar[bool] = True
    prune_phase: ClassVar[bool] = True

    def __init__(self, config: GRegConfig | None = None) -> None:
        super().__init__(config or GRegConfig())
        self.default_ratio: float | None = None
        self._applier: Any = None  # the pipeline's mask applier: the level is in its units
        self._reset()

    def _reset(self) -> None:
        self.phase = "unbound"
        self.updates = 0  # penalty updates in ``grow``
        self.pick_updates = 0  # uniform updates in ``pick`` (GReg-2)
        self.stabilize_start = -1
        self.removed_at = -1
        self.events: list[tuple[int, str]] = []
        self.plans: list[LayerPlan] = []
        self._lam: dict[str, Tensor] = {}  # per group, on the parameter's device
        self._pruned: dict[str, Tensor] = {}  # bool per group
        self._ema: dict[str, float] = {}
        self._layer_updates: dict[str, int] = {}  # GReg-2: grow updates of each layer
        self._finished: set[str] = set()  # GReg-2: layers that stopped growing
        self._bound = False
        self._layout: ParamLayout | None = None
        self._model: nn.Module | None = None  # select_by = "group": the model to score
        self._affine: dict[str, list[str]] = {}  # weight → gating 1-D parameters (reg_affine)
        self._affine_lam: dict[str, Tensor] = {}  # λ on pruned groups, 0 elsewhere (reg_affine)

    # -- binding to a model -----------------------------------------------------------------
    def bind(
        self, model: nn.Module, layout: ParamLayout, sparsity: float | None = None, *, step: int = 0
    ) -> None:
        """Resolve each layer's ratio and groups, and (GReg-1) pick the pruned groups.

        Called by the first :meth:`before_optimizer_step` (with its ``step``); call it yourself
        to see the plan (:attr:`plans`) before training. State loaded by
        :meth:`load_state_dict` is kept.

        Raises:
            ConfigError: bad ``ratios`` (see :func:`curvprune_greg.groups.resolve_ratios`), no
                default ratio known, or loaded state that does not fit the model.
        """
        cfg = self.config
        ratio = sparsity if sparsity is not None else self.default_ratio
        if ratio is None:
            raise ConfigError(
                "greg needs the default pruning ratio: build it through a Pipeline ([prune] "
                "sparsity) or call schedule.bind(model, layout, sparsity) @ prune.sparsity"
            )
        self.default_ratio = ratio
        excluded, notes = excluded_layers(model, layout, cfg.granularity, cfg.residual)
        plans, more = resolve_ratios(layout, cfg.granularity, ratio, cfg.ratios, excluded)
        for note in (*notes, *more):
            warnings.warn(note, stacklevel=3)
        params = dict(zip(layout.names, layout.parameters(model), strict=True))
        self._model = model if cfg.select_by == "group" else None
        if self.phase == "unbound":
            self.plans, self._layout = plans, layout  # GReg-1 picks from them at once
            self._start(plans, params, step)
        else:
            self._adopt(plans, params)
        self.plans = plans
        self._layout = layout
        if cfg.reg_affine:
            gates = gate_parameters(model, layout)
            self._affine = {p.name: gates.get(p.name, []) for p in plans if p.n_pruned}
        self._bound = True
        self._refresh_affine()
        log.info("greg bound: %s", "; ".join(
            f"{p.name}: {p.n_pruned}/{p.n_groups}" + (f" ({p.excluded})" if p.excluded else "")
            for p in plans))

    def _start(self, plans: list[LayerPlan], params: Mapping[str, nn.Parameter], step: int) -> None:
        """Fresh state: λ = 0; GReg-1 picks P_ℓ by the initial L1 scores."""
        for plan in plans:
            if plan.n_pruned == 0:
                continue
            weight = params[plan.name]
            self._lam[plan.name] = torch.zeros(plan.n_groups, device=weight.device, dtype=weight.dtype)
        if self.config.variant == 1:
            self._pick(params)
        self.phase = "grow" if self.config.variant == 1 else "pick"
        self.events.append((step, self.phase))

    def _adopt(self, plans: list[LayerPlan], params: Mapping[str, nn.Parameter]) -> None:
        """Check loaded state against the model and move it to the parameters' devices."""
        active = {p.name: p for p in plans if p.n_pruned}
        if set(self._lam) != set(active):
            raise ConfigError(
                f"greg state was saved for layers {sorted(self._lam)} but this model and config "
                f"prune {sorted(active)} @ schedule"
            )
        for name, plan in active.items():
            weight = params[name]
            lam = self._lam[name]
            if lam.shape != (plan.n_groups,):
                raise ConfigError(
                    f"greg state has {lam.numel()} groups for {name!r}, the model {plan.n_groups} "
                    "@ schedule"
                )
            self._lam[name] = lam.to(device=weight.device, dtype=weight.dtype)
            if name in self._pruned:
                self._pruned[name] = self._pruned[name].to(device=weight.device, dtype=torch.bool)

    @property
    def active(self) -> list[LayerPlan]:
        """The layers that lose groups (n_p > 0), in layout order."""
        return [p for p in self.plans if p.n_pruned]

    # -- the training-loop calls ------------------------------------------------------------
    def before_optimizer_step(self, step: int, model: nn.Module, layout: ParamLayout) -> None:
        """Update λ when ``step`` is an update iteration, then add λ ⊙ W to the gradients."""
        if self.phase == "removed":
            return
        if not self._bound:
            self.bind(model, layout, step=step)
        params = dict(zip(layout.names, layout.parameters(model), strict=True))
        if self.phase in ("pick", "grow") and step % self.config.update_reg_interval == 0:
            self._update(step, params)
        granularity = self.config.granularity
        with torch.no_grad():
            for name, lam in self._lam.items():
                _add_penalty(params[name], broadcast(lam, params[name].shape, granularity))
            if self._affine_lam:
                named = dict(model.named_parameters())
                for name, lam in self._affine_lam.items():
                    for gate in self._affine[name]:
                        _add_penalty(named[gate], lam)

    def _update(self, step: int, params: Mapping[str, nn.Parameter]) -> None:
        cfg = self.config
        structured = cfg.granularity != "weight"
        if self.phase == "pick":
            self.pick_updates += 1
            value = self.pick_updates * cfg.reg_granularity_pick
            for lam in self._lam.values():
                lam.fill_(value)
            if structured and self._lam:  # the EMA follows the moving L1 set while picking
                self._update_ratios(params, self._moving_sets(params))
            if not self._lam or value >= cfg.reg_upper_limit_pick * (1 - _PICK_SLACK):
                self._pick(params)
                self._refresh_affine()
                self._enter("grow", step)
                self._finish_layers(list(self._lam), value)
                if len(self._finished) == len(self._lam):
                    self._enter("stabilize", step)
            return
        if cfg.variant == 2:
            self._grow_per_layer(step, params)
            return
        if structured and self._lam:
            self._update_ratios(params, self._pruned)
        self.updates += 1
        top = self.pruned_lambda
        for name, lam in self._lam.items():
            kept = 0.0 if cfg.variant == 1 else cfg.reg_granularity_recover
            pruned = self._pruned[name]
            lam.copy_(torch.where(pruned, torch.full_like(lam, top), torch.full_like(lam, kept)))
        self._refresh_affine()
        by_ratio = structured and bool(self._ema) and all(
            r >= cfg.mag_ratio_limit for r in self._ema.values())
        if not self._lam or by_ratio or self.max_lambda > cfg.reg_upper_limit:
            self._enter("stabilize", step)

    def _grow_per_layer(self, step: int, params: Mapping[str, nn.Parameter]) -> None:
        """Run GReg-2's ``grow``: every layer not finished takes one step and checks its stop."""
        cfg = self.config
        growing = [name for name in self._lam if name not in self._finished]
        if cfg.granularity != "weight" and growing:
            self._update_ratios(params, {name: self._pruned[name] for name in growing})
        self.updates += 1
        base = self.pick_updates * cfg.reg_granularity_pick
        for name in growing:
            k = self._layer_updates.get(name, 0) + 1
            self._layer_updates[name] = k
            top = base + k * cfg.reg_granularity_prune
            lam = self._lam[name]
            lam.copy_(torch.where(self._pruned[name], torch.full_like(lam, top),
                                  torch.full_like(lam, cfg.reg_granularity_recover)))
        self._refresh_affine()
        self._finish_layers(growing, None)
        if len(self._finished) == len(self._lam):
            self._enter("stabilize", step)

    def _finish_layers(self, names: list[str], pick_value: float | None) -> None:
        """Mark each layer of ``names`` finished once its EMA ≥ limit (structured) or λ > τ.

        The layer's λ max is its pruned groups' value (``pick_value`` at the pick, else
        λ_pick + k_ℓ·δλ) or ``reg_granularity_recover`` on its kept groups, whichever is larger
        (the reference's ``reg.max()``).
        """
        cfg = self.config
        base = self.pick_updates * cfg.reg_granularity_pick
        for name in names:
            if pick_value is not None:
                top = pick_value
            else:
                top = max(base + self._layer_updates.get(name, 0) * cfg.reg_granularity_prune,
                          cfg.reg_granularity_recover)
            ema = self._ema.get(name, 0.0)
            by_ratio = cfg.granularity != "weight" and ema >= cfg.mag_ratio_limit
            if by_ratio or top > cfg.reg_upper_limit:
                self._finished.add(name)
                log.info("greg: %s finished growing (λ %.4g, EMA ratio %s)", name, top,
                         self._ema.get(name))

    def _moving_sets(self, params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
        """GReg-2 before its pick: each pruned layer's n_p groups of lowest current score."""
        return {
            plan.name: pick_lowest(group_scores(params[plan.name], self.config.granularity),
                                   plan.n_pruned)
            for plan in self.active
        }

    def _refresh_affine(self) -> None:
        """``reg_affine``: each pruned group's λ for its gating parameters, 0 for kept groups and
        before GReg-2 picks (the uniform phase penalises weights only)."""
        self._affine_lam = {
            name: torch.where(self._pruned[name], self._lam[name], 0.0)
            for name, gates in self._affine.items() if gates and name in self._pruned
        }

    def _pick(self, params: Mapping[str, nn.Parameter]) -> None:
        """P_ℓ = the n_p groups of lowest current score (GReg-1 at the start, GReg-2 at its pick):
        mean |W_j|, or with ``select_by = "group"`` Σ|θ| over what removing j deletes."""
        names = [plan.name for plan in self.active]
        if self._model is not None and names:
            scores = filter_group_scores(self._model, self._layout, names)
        else:
            scores = {n: group_scores(params[n], self.config.granularity) for n in names}
        for plan in self.active:
            self._pruned[plan.name] = pick_lowest(scores[plan.name], plan.n_pruned)

    def _update_ratios(
        self, params: Mapping[str, nn.Parameter], sets: Mapping[str, Tensor]
    ) -> None:
        """EMA of mean kept / mean pruned group magnitude per layer of ``sets`` (one host sync)."""
        if not sets:
            return
        ratios = []
        for name, pruned in sets.items():
            s = group_scores(params[name], self.config.granularity).double()
            kept_mean = s[~pruned].mean()
            pruned_mean = s[pruned].mean()
            ratios.append(kept_mean / pruned_mean)  # inf once the pruned groups are exactly 0
        for name, ratio in zip(sets, torch.stack(ratios).tolist(), strict=True):
            old = self._ema.get(name)
            self._ema[name] = ratio if old is None else _MAG_EMA * old + (1 - _MAG_EMA) * ratio

    def _enter(self, phase: str, step: int) -> None:
        self.phase = phase
        self.events.append((step, phase))
        if phase == "stabilize":
            self.stabilize_start = step
        log.info("greg: iteration %d: %s (max λ %.4g, EMA ratios %s)", step, phase,
                 self.max_lambda, {k: round(v, 1) for k, v in self._ema.items()})

    def level_at(self, step: int, target: float) -> float | None:
        """After step t_s + K_s: the fraction of units the chosen groups remove; else None.

        Units are those of the mask applier: output channels of the selected parameters
        (``filter``, with the ``channel`` mask) or selected weights (``channel``, ``weight``).
        """
        if self.phase != "stabilize" or step - self.stabilize_start < self.config.stabilize_reg_interval:
            return None
        self.phase = "removed"
        self.removed_at = step
        self.events.append((step, "removed"))
        return self.removal_level()

    def removal_level(self) -> float:
        """The sparsity the chosen groups give, in the mask applier's units.

        With the pipeline's mask applier known (from :meth:`check_pipeline`) that is its
        ``achieved_sparsity`` of :meth:`keep_mask` (structures for the ``channel`` mask);
        otherwise the fraction of output channels (``filter``) or of weights removed.
        """
        if not self.plans:
            return 0.0
        if self._applier is not None and self._layout is not None:
            return float(self._applier.achieved_sparsity(self.keep_mask(self._layout), self._layout))
        if self.config.granularity == "filter":
            total = sum(p.n_groups for p in self.plans)
            return sum(p.n_pruned for p in self.plans) / total
        total = sum(math.prod(p.shape) for p in self.plans)
        per_group = [math.prod(p.shape) // p.n_groups for p in self.plans]
        return sum(p.n_pruned * g for p, g in zip(self.plans, per_group, strict=True)) / total

    def select(self, ctx: PruneContext) -> Tensor | None:
        """The keep-mask of everything but the chosen groups, bool ``[d]`` (None before binding)."""
        if not self._bound:
            return None
        return self.keep_mask(ctx.layout, ctx.mask.device)

    def keep_mask(self, layout: ParamLayout, device: torch.device | str | None = None) -> Tensor:
        """Bool ``[d]``: False on every weight of the chosen groups (all True before a pick)."""
        if tuple(p.name for p in self.plans) != layout.names:
            raise ConfigError("greg was bound to other parameters than the pipeline prunes @ prune.targets")
        parts = []
        for plan in self.plans:
            keep = torch.ones(plan.shape, dtype=torch.bool, device=device)
            pruned = self._pruned.get(plan.name)
            if pruned is not None:
                keep = keep & broadcast(~pruned.to(keep.device), plan.shape, self.config.granularity)
            parts.append(keep)
        return layout.flatten(parts)

    def finished(self, step: int) -> bool:
        """True from the removal step on (the removal step depends on the run: see :meth:`max_steps`)."""
        return self.phase == "removed" and step >= self.removed_at

    # -- prune phase (curvprune run) ---------------------------------------------------------
    def max_steps(self) -> int:
        """Optimizer steps until removal when the magnitude-ratio stop never fires (an upper bound).

        GReg-1 leaves ``grow`` at the update k* where k*·δλ > τ first holds, i.e. at iteration
        (k* − 1)·K_u; GReg-2 first spends k_p = ⌈τ_pick/δλ_pick⌉ updates picking. Removal follows
        K_s iterations later; the count includes the removal step.
        """
        cfg = self.config
        start = 0.0
        picks = 0
        if cfg.variant == 2:
            picks = max(1, math.ceil(cfg.reg_upper_limit_pick / cfg.reg_granularity_pick * (1 - _PICK_SLACK)))
            start = picks * cfg.reg_granularity_pick
        grows = math.floor((cfg.reg_upper_limit - start) / cfg.reg_granularity_prune) + 1
        while start + (grows - 1) * cfg.reg_granularity_prune > cfg.reg_upper_limit:
            grows -= 1  # guard the floor against round-off
        while not start + grows * cfg.reg_granularity_prune > cfg.reg_upper_limit:
            grows += 1
        leave = (picks + grows - 1) * cfg.update_reg_interval
        return leave + cfg.stabilize_reg_interval + 1

    def prune_phase_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD with the constant ``lr_prune``, ``momentum`` and ``weight_decay`` (memo §1.3)."""
        cfg = self.config
        return torch.optim.SGD(model.parameters(), lr=cfg.lr_prune, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    # -- inspection ---------------------------------------------------------------------------
    @property
    def pruned_lambda(self) -> float:
        """λ of the pruned groups now: k·δλ (GReg-1) or λ_pick + k·δλ (GReg-2); 0 before growth.

        GReg-2: the value of the layers still growing; a finished layer keeps its own.
        """
        cfg = self.config
        base = self.pick_updates * cfg.reg_granularity_pick if cfg.variant == 2 else 0.0
        return base + self.updates * cfg.reg_granularity_prune

    @property
    def max_lambda(self) -> float:
        """The largest λ of any group now."""
        if not self._lam:
            return 0.0
        if self.phase == "pick" or (self.config.variant == 2 and self.updates == 0):
            return self.pick_updates * self.config.reg_granularity_pick
        return self.pruned_lambda

    def lambdas(self) -> dict[str, Tensor]:
        """λ per group of each penalised layer (copies)."""
        return {k: v.detach().clone() for k, v in self._lam.items()}

    def pruned_groups(self) -> dict[str, Tensor]:
        """The chosen groups of each layer, bool per group (empty before GReg-2 picks)."""
        return {k: v.clone() for k, v in self._pruned.items()}

    def finished_layers(self) -> set[str]:
        """GReg-2: the layers that stopped growing (their λ frozen)."""
        return set(self._finished)

    def magnitude_ratios(self) -> dict[str, float]:
        """The smoothed kept/pruned magnitude ratio of each pruned layer."""
        return dict(self._ema)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Phase, counters, λ per group, chosen groups, EMA ratios and events (tensors on CPU)."""
        return {
            "phase": self.phase,
            "updates": self.updates,
            "pick_updates": self.pick_updates,
            "stabilize_start": self.stabilize_start,
            "removed_at": self.removed_at,
            "events": [[step, phase] for step, phase in self.events],
            "lambda": {k: v.detach().cpu().clone() for k, v in self._lam.items()},
            "pruned": {k: v.cpu().clone() for k, v in self._pruned.items()},
            "ema": dict(self._ema),
            "layer_updates": dict(self._layer_updates),
            "finished": sorted(self._finished),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; tensors move to the model at the next binding."""
        phase = str(state["phase"])
        if phase not in PHASES:
            raise ConfigError(f"greg state has an unknown phase {phase!r} @ schedule")
        self._reset()
        self.phase = phase
        self.updates = int(state["updates"])
        self.pick_updates = int(state["pick_updates"])
        self.stabilize_start = int(state["stabilize_start"])
        self.removed_at = int(state["removed_at"])
        self.events = [(int(s), str(p)) for s, p in state["events"]]
        self._lam = {k: v.clone() for k, v in state["lambda"].items()}
        self._pruned = {k: v.clone().bool() for k, v in state["pruned"].items()}
        self._ema = {k: float(v) for k, v in state["ema"].items()}
        # states saved before GReg-2 stopped layers one by one: every layer grew alike
        default = dict.fromkeys(self._lam, self.updates) if self.config.variant == 2 else {}
        self._layer_updates = {k: int(v) for k, v in state.get("layer_updates", default).items()}
        self._finished = {str(k) for k in state.get("finished", ())}

    # -- validation -----------------------------------------------------------------------------
    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Require the ``magnitude`` scorer and a mask applier of the matching granularity.

        Also records ``[prune] sparsity`` as the default ratio.
        """
        prune = components.get("prune")
        if prune is not None:
            self.default_ratio = float(prune.sparsity)
        scorer, mask = components.get("scorer"), components.get("mask")
        self._applier = mask
        granularity = self.config.granularity
        if scorer is not None and type(scorer).__name__ != "MagnitudeScorer":
            return (
                "schedule 'greg' picks its groups by L1 magnitude itself; set [scorer] name = "
                "'magnitude'" + (" with granularity = 'channel' and norm = 'l1'"
                                 if granularity == "filter" else "") + " @ scorer.name"
            )
        if mask is None:
            return None
        if granularity == "filter" and mask.granularity != "channel":
            return (
                "schedule 'greg' with granularity = 'filter' removes whole output channels; use "
                "[mask] name = 'channel' (and [scorer] granularity = 'channel') @ mask.name"
            )
        if granularity != "filter" and type(mask).__name__ not in ("LayerwiseMask", "GlobalMask"):
            return (
                f"schedule 'greg' with granularity = {granularity!r} masks single weights; use "
                "[mask] name = 'layerwise' or 'global' @ mask.name"
            )
        if granularity == "filter" and self.config.residual == "none" and getattr(
                mask.config, "coupled", False):
            return (
                "schedule 'greg' with residual = 'none' prunes the filters of each layer on its "
                "own, also where a residual addition couples them; set [mask] coupled = false "
                "(masks only) or residual = 'internal' @ schedule.residual"
            )
        return None


def _add_penalty(param: Tensor, lam: Tensor) -> None:
    """grad ← grad + λ ⊙ W (a zero gradient first where the loss did not reach ``param``)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad.addcmul_(lam, param)
