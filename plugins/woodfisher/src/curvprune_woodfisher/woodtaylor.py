"""The ``woodtaylor`` scorer: OBS with the first-order term of the local model kept.

WoodFisher (Singh & Alistarh, 2020, Sec. "WoodTaylor") prunes with the quadratic model

    L(w + δ) − L(w) ≈ ḡᵀδ + ½ δᵀFδ,

ḡ the mean gradient (``PruneContext.mean_grad``) and F the estimator's damped Fisher, instead of
OBS's ½ δᵀFδ (which assumes ḡ = 0 at a trained point). Write u = F⁻¹ḡ (the unconstrained
minimiser is δ = −u) and d_q = [F⁻¹]_qq.

**One weight q.** Minimising ḡᵀδ + ½δᵀFδ subject to e_qᵀ(w + δ) = 0: stationarity of the
Lagrangian gives Fδ = −ḡ − μe_q, so δ = −u − μF⁻¹e_q, and the constraint w_q − u_q − μd_q = 0
gives μ = (w_q − u_q)/d_q. Substituting,

    δ_q* = −u − F⁻¹e_q (w_q − u_q)/d_q,      ρ_q = ½ (w_q − u_q)²/d_q − ½ ḡᵀu.

**A set P, summed** (the reference code's update, ``joint = false``): the single-weight
multipliers μ_q = (w_q − u_q)/d_q, one shared move to the minimiser:
δ = −u − F⁻¹ Σ_{q∈P} e_q μ_q = −F⁻¹(ḡ + z), z = Σ_P e_q μ_q (one IHVP). Predicted change:
Σ_P ½ (w_q − u_q)²/d_q − ½ ḡᵀu (correlations between pruned weights ignored; the pipeline
zeroes w_P afterwards).

**A set P, jointly** (``joint = true``, per block): the constraint E_Pᵀ(w + δ) = 0 gives
μ = ([F⁻¹]_PP)⁻¹(w_P − u_P), δ = −F⁻¹(ḡ + E_Pμ), and the exact model change
½ (w_P − u_P)ᵀ([F⁻¹]_PP)⁻¹(w_P − u_P) − ½ ḡᵀu. Blocks decouple: F is block diagonal.

**The constant −½ ḡᵀu** is the same for every weight, so :meth:`WoodTaylorScorer.score`
leaves it out (it is up to n_blocks/2 and would swamp small saliencies in float32); it is
counted once in :meth:`WoodTaylorScorer.predicted_loss_change`. With ḡ = 0 every formula is
OBS's.

**Defaults: the exact method.** ``normalize_update = false``, ``ranking = "exact"``: the
paper's model, unclipped. On a trained model the move to the unconstrained minimiser,
‖u‖ ≤ ‖ḡ‖/λ, can be far outside the region where the model holds (digits CNN, λ = 1e-4,
256 per-sample gradients: ‖u‖ = 63 against ‖w‖ = 9.9; docs/methods/woodfisher.md), so two
bounds are offered.

**The reference's normalisation** (``normalize = "reference"``, ``woodtaylorblock.py``
``_get_weight_update``): the whole update of parameter l (OBS part and −u_l) is rescaled,
δ_l ← δ_l / (‖δ_l‖/(r‖w_l‖) + 1e-9), when ‖δ_l‖ > ‖w_l‖ (r = ``normalize_update_mult``,
default 1 as in the reference). Scores are not affected; pruned weights move off zero and the
pipeline zeroes them; the quadratic model's prediction does not hold for the scaled update, so
:meth:`WoodTaylorScorer.predicted_loss_change` returns None.

**Trust region on the first-order move** (``normalize = "first_order"``, curvprune's
extension): the linear term is replaced by ḡ_t = α·Tḡ, T scaling the entries of parameter l by

    t_l = min(1, r‖w_l‖ / (α‖u_l‖)),

the largest factor that keeps the unconstrained first-order move of that parameter inside the
ball ‖u_t,l‖ ≤ r‖w_l‖, u_t = F⁻¹ḡ_t (exactly u_t,l = α t_l u_l when F's blocks do not cross
parameters; for an unblocked F the bound holds up to the cross-parameter terms of F⁻¹). Every
formula above holds with (ḡ_t, u_t) for (ḡ, u): the scorer is exact WoodTaylor on the model
ḡ_tᵀδ + ½δᵀFδ, so the joint update still puts the pruned weights exactly at zero.

**The reference's ranking** (``ranking = "reference"``, ``_get_param_stat``): per parameter l,
s_q = ½(w_q − u_q)²/d_q − ½ḡ_lᵀu_l, then s_q − min_l s + 1e-10, times the mask; layers are
shifted by different amounts before the global threshold (the exact ranking shifts all by one
constant, so it ranks by the model's change).

**ḡ from the labels** (``mean_gradient = "labels"``, default): with ``fisher = "true"`` the
gradients fed to the estimator use labels sampled from the model, whose mean estimates
E_y~p[∇ log p(y|x)] = 0 rather than the loss gradient; the scorer then computes ḡ from the
data's labels over the same number of samples (``PruneContext.batches``, model in eval mode,
pruned coordinates zeroed). With the empirical Fisher the pipeline's mean is already that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvprune import (
    ConfigError,
    CurvatureEstimator,
    PruneContext,
    SaliencyScorer,
    distributed,
)
from curvprune_woodfisher.config import WoodTaylorConfig

__all__ = ["WoodTaylorScorer"]


class WoodTaylorScorer(SaliencyScorer):
    """WoodTaylor saliency ρ_q = ½(w_q − u_q)²/[F⁻¹]_qq (+ const) and its constrained update.

    Args:
        config: the scorer's :class:`WoodTaylorConfig` (defaults if None).

    """

    needs_curvature = True
    needs_gradient = True

    config: WoodTaylorConfig

    def __init__(self, config: WoodTaylorConfig | None = None) -> None:
        super().__init__(config or WoodTaylorConfig())
        self._ctx: PruneContext | None = None
        self._gbar: Tensor | None = None
        self._u: Tensor | None = None
        self._diag: Tensor | None = None
        self._predicted: Tensor | None = None

    # -- shared quantities of one step -----------------------------------------------------------
    def _prepare(self, ctx: PruneContext) -> tuple[CurvatureEstimator, Tensor, Tensor, Tensor]:
        """``(estimator, ḡ_t, u_t = F⁻¹ḡ_t, d = diag F⁻¹)``, computed once per context."""
        estimator = ctx.estimator
        if estimator is None:
            raise ConfigError("woodtaylor needs a curvature estimator @ estimator")
        if ctx.mean_grad is None:
            raise ConfigError(
                "woodtaylor needs the mean gradient (PruneContext.mean_grad) @ scorer"
            )
        if self._ctx is not ctx:
            diag = estimator.inverse_diagonal()
            # A float32 diagonal can round to <= 0 when 1/damping dwarfs it; floor it.
            self._diag = diag.clamp_min(torch.finfo(diag.dtype).eps * diag.abs().max())
            self._gbar, self._u = self._first_order_move(ctx, estimator)
            self._ctx, self._predicted = ctx, None
        assert self._gbar is not None and self._u is not None and self._diag is not None
        return estimator, self._gbar, self._u, self._diag

    def _first_order_move(
        self, ctx: PruneContext, estimator: CurvatureEstimator
    ) -> tuple[Tensor, Tensor]:
        """``(ḡ_t, u_t)``: the linear term α·Tḡ and u_t = F⁻¹ḡ_t (module docstring).

        t_l = min(1, r‖w_l‖/(α‖u_l‖)) per parameter l; one extra IHVP when a clip is active.
        """
        mean = self._mean_gradient(ctx, estimator)
        u = estimator.ihvp(mean)
        gbar = mean.to(device=u.device, dtype=u.dtype)
        alpha = self.config.first_order
        if not (self.config.normalize_update and self.config.normalize == "first_order"):
            return (gbar, u) if alpha == 1 else (alpha * gbar, alpha * u)
        sizes = torch.tensor(ctx.layout.sizes, device=u.device)
        param = torch.repeat_interleave(torch.arange(sizes.numel(), device=u.device), sizes)
        if param.numel() != u.numel():
            raise ConfigError(
                f"woodtaylor: the layout covers {param.numel()} weights but the mean gradient "
                f"has {u.numel()} @ scorer.normalize_update"
            )
        w = (ctx.weights * ctx.mask).to(u.dtype)
        w_norm = torch.zeros(sizes.numel(), device=u.device, dtype=u.dtype)
        u_norm = torch.zeros_like(w_norm)
        w_norm.index_add_(0, param, w.square()).sqrt_()
        u_norm.index_add_(0, param, u.square()).sqrt_()
        radius = self.config.normalize_update_mult * w_norm
        move = alpha * u_norm
        # t_l = 1 where the move is inside the ball (including u_l = 0), else radius / move.
        scale = torch.where(
            move > radius, radius / move.clamp_min(torch.finfo(u.dtype).tiny), torch.ones_like(move)
        )
        if bool((scale == 1).all()):  # no clip active: the exact method, no extra IHVP
            return (gbar, u) if alpha == 1 else (alpha * gbar, alpha * u)
        gbar_t = alpha * scale[param] * gbar
        return gbar_t, estimator.ihvp(gbar_t)

    def _mean_gradient(self, ctx: PruneContext, estimator: CurvatureEstimator) -> Tensor:
        """ḡ: the pipeline's mean, or, for sampled labels, the data labels' (module docstring)."""
        assert ctx.mean_grad is not None
        sampled = getattr(estimator.config, "fisher", "empirical") == "true"
        if self.config.mean_gradient == "estimator" or not sampled:
            return ctx.mean_grad
        if ctx.batches is None or ctx.loss_fn is None:
            raise ConfigError(
                "woodtaylor with fisher = 'true' computes the mean gradient from the data's "
                "labels and needs the data (PruneContext.batches and loss_fn); pass data, or set "
                "mean_gradient = 'estimator' @ scorer.mean_gradient"
            )
        samples = estimator.num_grads * int(getattr(estimator.config, "fisher_mini_batch", 1))
        return labelled_mean_gradient(ctx, samples).to(ctx.mean_grad)

    def score(self, ctx: PruneContext) -> Tensor:
        """ρ_q + ½ ḡ_tᵀu_t = ½ (w_q − u_t,q)² / [F⁻¹]_qq, ``[d]`` (ranking equals ρ's).

        With ``ranking = "reference"``: per parameter l, that minus ½ḡ_t,lᵀu_t,l, minus its
        minimum over l, plus 1e-10, times the mask (the reference's ``_get_param_stat``).
        """
        _, gbar, u, diag = self._prepare(ctx)
        mask = ctx.mask.to(device=u.device, dtype=u.dtype)
        w = ctx.weights.to(u) * mask
        rho = (w - u).square() / (2 * diag)
        if self.config.ranking == "exact":
            return rho
        param = ctx.layout.param_index(u.device)
        n = len(ctx.layout.sizes)
        per_layer = torch.zeros(n, dtype=u.dtype, device=u.device).index_add_(0, param, gbar * u)
        stat = rho - 0.5 * per_layer[param]
        low = torch.full((n,), torch.inf, dtype=u.dtype, device=u.device)
        low = low.scatter_reduce(0, param, stat, reduce="amin")
        return (stat - low[param] + 1e-10) * mask

    def compensate(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """δw = −F⁻¹(ḡ_t + z) = −u_t − F⁻¹z: z summed single-weight multipliers, or joint ones.

        With ``normalize_update`` and ``normalize = "reference"``, each parameter's δ_l is then
        rescaled to r‖w_l‖ when ‖δ_l‖ > ‖w_l‖ (the reference's ``_get_weight_update``).
        """
        estimator, _, u, _ = self._prepare(ctx)
        z = self._multipliers(ctx, pruned)
        if not self.config.update:
            return None
        delta = -(u + estimator.ihvp(z))
        if self._reference_normalized:
            delta = self._reference_rescale(ctx, delta)
        return delta

    @property
    def _reference_normalized(self) -> bool:
        return self.config.normalize_update and self.config.normalize == "reference"

    def _reference_rescale(self, ctx: PruneContext, delta: Tensor) -> Tensor:
        """δ_l / (‖δ_l‖/(r‖w_l‖) + 1e-9) for every parameter l with ‖δ_l‖ > ‖w_l‖."""
        param = ctx.layout.param_index(delta.device)
        n = len(ctx.layout.sizes)
        w = ctx.weights.to(delta) * ctx.mask.to(device=delta.device, dtype=delta.dtype)
        w_norm = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        w_norm = w_norm.index_add_(0, param, w.square()).sqrt()
        d_norm = torch.zeros_like(w_norm).index_add_(0, param, delta.square()).sqrt()
        r = self.config.normalize_update_mult
        divisor = torch.where(d_norm > w_norm, d_norm / (w_norm * r) + 1e-9,
                              torch.ones_like(d_norm))
        return delta / divisor[param]

    def predicted_loss_change(self, ctx: PruneContext, pruned: Tensor) -> Tensor | None:
        """Return the quadratic model's change for this step, with −½ḡ_tᵀu_t counted once.

        None under the reference's normalisation (the model's change is for the unscaled
        update).
        """
        if self._reference_normalized and self.config.update:
            return None
        if self._ctx is not ctx or self._predicted is None:
            self._multipliers(ctx, pruned)
        return self._predicted

    def _multipliers(self, ctx: PruneContext, pruned: Tensor) -> Tensor:
        """Z = E_P μ; stores the model's change ½((w_P − u_P)ᵀμ − ḡᵀu) for this step (ḡ_t, u_t)."""
        estimator, gbar, u, diag = self._prepare(ctx)
        offset = ctx.weights.to(u.dtype) - u
        pruned = pruned.to(u.device)
        if self.config.joint:
            z = self._joint_multipliers(estimator, offset, pruned)
        else:
            z = torch.where(pruned, offset / diag, torch.zeros_like(offset))
        self._predicted = 0.5 * ((z * offset).sum() - gbar @ u)
        return z

    def _joint_multipliers(
        self, estimator: CurvatureEstimator, offset: Tensor, pruned: Tensor
    ) -> Tensor:
        """Z = E_P μ with μ = ([F⁻¹]_PP)⁻¹(w_P − u_P), solved per block."""
        index = pruned.nonzero().squeeze(1)
        z = torch.zeros_like(offset)
        if index.numel() == 0:
            return z
        groups, row, col = estimator.block_layout.group(index)
        if groups.shape[1] > self.config.max_joint_group:
            raise ConfigError(
                f"joint woodtaylor would solve a {groups.shape[1]}x{groups.shape[1]} system in "
                f"one block (max_joint_group = {self.config.max_joint_group}); use a smaller "
                "block_size, more pruning steps, or joint = false @ scorer.joint"
            )
        sub = estimator.inverse_columns(groups).to(offset.dtype)  # [n, K, K], identity padding
        rhs = torch.where(groups >= 0, offset[groups.clamp_min(0)], 0).unsqueeze(-1)
        chol, info = torch.linalg.cholesky_ex(sub)
        if bool(info.any()):  # [F⁻¹]_PP is SPD in exact arithmetic; rounding can break that
            mu = torch.linalg.solve(sub, rhs)
        else:
            mu = torch.cholesky_solve(rhs, chol)
        z[index] = mu.squeeze(-1)[row, col]
        return z


def labelled_mean_gradient(ctx: PruneContext, samples: int) -> Tensor:
    """Mean over ``samples`` samples of ∇L with the data's labels, flat ``[d]``, pruned zeroed.

    The model runs in eval mode (as the core's GradientSource does) and its mode is restored.
    Under torch.distributed each rank sums its slice; sums and counts are all-reduced.
    """
    assert ctx.batches is not None and ctx.loss_fn is not None
    params = ctx.layout.parameters(ctx.model)
    total = torch.zeros(ctx.layout.d, dtype=torch.float64, device=ctx.weights.device)
    count = torch.zeros((), dtype=torch.float64, device=ctx.weights.device)
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        for inputs, targets in ctx.batches(num_samples=samples):
            n = int(targets.shape[0])
            if n == 0:
                continue
            loss = ctx.loss_fn(ctx.model(inputs), targets) * n
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g
                     for g, p in zip(grads, params, strict=True)]
            total += ctx.layout.flatten(grads).to(total)
            count += n
    finally:
        ctx.model.train(was_training)
    distributed.all_reduce_sum_(total)
    distributed.all_reduce_sum_(count)
    if float(count) == 0:
        raise ConfigError("woodtaylor: the data yielded no samples for the mean gradient @ data")
    return (total / count).masked_fill_(~ctx.mask.to(total.device), 0)
