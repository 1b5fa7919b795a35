"""K-FAC's Kronecker factors of the selected parameters, computed by curvlinops.

curvlinops' :class:`curvlinops.KFACLinearOperator` (pinned: curvlinops-for-pytorch 3.0.1) hooks
every Linear and Conv2d layer owning a selected parameter and, over the data, accumulates

    A_l = (1/(N·S)) Σ_n Σ_s a_ns a_nsᵀ          (layer inputs, with a Conv2d's unfolded patches),
    G_l = (1/N)     Σ_n Σ_s g_ns g_nsᵀ          (gradients of the per-sample loss w.r.t. the
                                                 layer's outputs),

S the number of weight-sharing positions (output pixels of a Conv2d; 1 for a Linear layer on 2-d
inputs; ``kfac_approx = "reduce"`` averages the patches and sums the gradients over them first).
So for a Linear layer with per-sample gradient ∇W_n = g_n a_nᵀ, G⊗A ≈ (1/N)Σ_n vec∇W_n vec∇W_nᵀ:
the empirical Fisher of curvprune's convention, with E[aaᵀ⊗ggᵀ] factored as E[aaᵀ]⊗E[ggᵀ]
(Martens & Grosse 2015, Eq. 1-2; Grosse & Martens 2016 for convolutions). The labels behind g are
the data's (``fisher = "empirical"``), sampled from the model (``"true"``), or integrated out
exactly (``"type-2"``).

The factors are read from the operator's public ``state_dict()`` (``input_covariances`` and
``gradient_covariances``, keyed by module name). With curvlinops' ``separate_weight_and_bias``
(its default), a bias's block is G_l alone; here that is the factor pair (G_l, [1]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvprune import ConfigError, ParamLayout, default_loss

__all__ = ["SUPPORTED_LOSSES", "curvlinops_loss", "kronecker_factors", "take_samples"]

#: Losses curvlinops' K-FAC accepts (as modules).
SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
_FISHER_TYPES = {"empirical": "empirical", "true": "mc", "type-2": "type-2"}


def curvlinops_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> nn.Module:
    """The loss module curvlinops needs for ``loss_fn``.

    curvprune's default loss (mean cross-entropy) and ``torch.nn.functional.cross_entropy`` map
    to ``nn.CrossEntropyLoss()``; an instance of a supported loss module is used as is.

    Raises:
        ConfigError: any other loss (curvlinops derives the Fisher from the loss's likelihood).
    """
    if isinstance(loss_fn, SUPPORTED_LOSSES):
        return loss_fn
    if loss_fn is F.cross_entropy or loss_fn is default_loss:
        return nn.CrossEntropyLoss()
    raise ConfigError(
        f"kfac needs a loss curvlinops supports (nn.CrossEntropyLoss, nn.MSELoss or "
        f"nn.BCEWithLogitsLoss instances, or the default cross-entropy), got {loss_fn!r} "
        "@ estimator.name"
    )


def take_samples(
    batches: Iterable[Any], num_samples: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """The first ``num_samples`` samples of ``batches``, as a list of batches on ``device``.

    Raises:
        ConfigError: no sample at all.
    """
    taken: list[tuple[Tensor, Tensor]] = []
    have = 0
    for batch in batches:
        x, y = batch[0], batch[1]
        take = min(num_samples - have, int(x.shape[0]))
        taken.append((x[:take].to(device), y[:take].to(device)))
        have += take
        if have >= num_samples:
            break
    if have == 0:
        raise ConfigError("kfac got no samples to fit its factors on @ data")
    return taken


def check_modules(model: nn.Module, layout: ParamLayout) -> list[tuple[str, str]]:
    """``(module name, parameter name)`` of each selected parameter, checked for K-FAC.

    Raises:
        ConfigError: a parameter outside a Linear or Conv2d layer, or a parameter other than
            the layer's ``weight`` and ``bias``.
    """
    owners = []
    for name, module_type in zip(layout.names, layout.module_types, strict=True):
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or pname not in ("weight", "bias"):
            raise ConfigError(
                f"kfac covers weights and biases of Linear and Conv2d layers (curvlinops' K-FAC), "
                f"but {name!r} belongs to a {module_type}; exclude it with prune.ignore "
                "@ prune.targets"
            )
        owners.append((module_name, pname))
    return owners


def kronecker_factors(
    model: nn.Module,
    layout: ParamLayout,
    data: list[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    fisher: str = "empirical",
    mc_samples: int = 1,
    kfac_approx: str = "expand",
    seed: int = 2147483647,
) -> list[tuple[Tensor, Tensor]]:
    """``(G_l, A_l)`` for every selected parameter, in layout order.

    Args:
        model: the model; run in eval mode (BatchNorm on running statistics), mode restored.
        layout: the selected parameters (weights or biases of Linear/Conv2d layers).
        data: the batches the factors average over (all of them).
        loss_fn: mean loss over a batch (:func:`curvlinops_loss` maps it).
        fisher: ``"empirical"``, ``"true"`` or ``"type-2"`` (see :class:`KFACConfig`).
        mc_samples: labels sampled per input for ``"true"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        seed: curvlinops' seed for sampled labels.

    Returns:
        G_l ``[o, o]`` and A_l ``[i, i]`` (``[[1]]`` for a bias), in the model's dtype.
    """
    from curvlinops import KFACLinearOperator

    owners = check_modules(model, layout)
    params = layout.parameters(model)
    was_training = model.training
    model.eval()
    try:
        operator = KFACLinearOperator(
            model,
            curvlinops_loss(loss_fn),
            params,
            data,
            check_deterministic=False,
            seed=seed,
            fisher_type=_FISHER_TYPES[fisher],
            mc_samples=mc_samples,
            kfac_approx=kfac_approx,
            separate_weight_and_bias=True,
            num_data=sum(int(x.shape[0]) for x, _ in data),
        )
        operator.compute_kronecker_factors()
        state = operator.state_dict()
    finally:
        model.train(was_training)
    inputs, grads = state["input_covariances"], state["gradient_covariances"]
    out = []
    for (module_name, pname), param in zip(owners, params, strict=True):
        g = grads[module_name]
        a = inputs[module_name] if pname == "weight" else g.new_ones(1, 1)
        out.append((g, a))
        if g.shape[0] * a.shape[0] != param.numel():  # a layout curvlinops folds differently
            raise ConfigError(
                f"kfac factors of {module_name!r} ({g.shape[0]}×{a.shape[0]}) do not match "
                f"{pname} of {param.numel()} weights @ prune.targets"
            )
    return out
