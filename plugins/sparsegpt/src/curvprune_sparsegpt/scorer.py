"""The ``wanda`` saliency scorer: WANDA inside the curvprune pipeline (one-shot, no update).

WANDA (Sun, Liu, Bair & Kolter, ICLR 2024, Eq. 1) scores weight (i, j) of a layer by
``|W_ij|·‖X_j‖₂``, ‖X_j‖₂ the norm of input feature j over the calibration inputs. The scorer
runs the model over ``num_samples`` calibration samples (``PruneContext.batches``) once, with a
forward pre-hook on every layer that owns a selected weight, and accumulates the squared norm of
each input column (Linear: the last dimension; Conv2d: the unfolded patch, so column j of the
``[out, in·kh·kw]`` weight; transformers' Conv1D: its ``[in, out]`` weight's rows). Under
torch.distributed each rank sums over its slice of the samples and the sums are all-reduced, so
every rank scores alike.

How the paper's comparison group maps onto curvprune's mask appliers: WANDA compares scores
within each output row; curvprune's ``layerwise`` mask compares within each layer (the paper's
§5 "per-layer" ablation), ``nm`` within each group of m consecutive inputs of a row (exactly the
paper's N:M), ``global`` across layers. With the default (dense) calibration the dense model's
activations are used for every layer (the paper's one-pass setting); with ``[schedule]
calibration = "sequential"`` each stage's inputs come through the already-pruned layers
(``ctx.model`` then runs one stage, :mod:`curvprune.pipeline.stages`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune import ConfigError, PruneContext, SaliencyScorer, distributed
from curvprune_sparsegpt.hessian import layer_inputs, weight_matrix

__all__ = ["WandaConfig", "WandaScorer"]


@attrs.frozen(kw_only=True)
class WandaConfig:
    """``[scorer] name = "wanda"``.

    Attributes:
        num_samples: calibration samples the input norms are computed on (the paper: 128
            sequences of 2048 tokens for LLMs; here samples of the run's data).
    """

    num_samples: int = attrs.field(default=128, validator=attrs.validators.ge(1))


class WandaScorer(SaliencyScorer):
    """``|W_ij|·‖X_j‖₂`` for every selected Linear, Conv2d and Conv1D weight; no update."""

    granularity = "weight"
    needs_data = True
    layer_local = True

    def __init__(self, config: WandaConfig | None = None) -> None:
        super().__init__(config or WandaConfig())

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        mask = components.get("mask")
        if getattr(mask, "granularity", "weight") != "weight":
            return "wanda scores single weights; use the layerwise, nm or global mask @ mask.name"
        return None

    @torch.no_grad()
    def score(self, ctx: PruneContext) -> Tensor:
        if ctx.batches is None:
            raise ConfigError("scorer 'wanda' needs calibration data @ data")
        layers = _layers(ctx.model, ctx.layout.names)
        sums: dict[str, Tensor] = {}

        def hook(name: str) -> Any:
            def accumulate(module: nn.Module, args: tuple[Any, ...]) -> None:
                rows = layer_inputs(module, args[0].detach()).to(torch.float64)
                part = rows.square().sum(dim=0)
                sums[name] = part if name not in sums else sums[name] + part
            return accumulate

        handles = [m.register_forward_pre_hook(hook(p)) for p, m in layers.items()]
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            for x, _ in ctx.batches(num_samples=self.config.num_samples):
                ctx.model(x)
        finally:
            ctx.model.train(was_training)
            for handle in handles:
                handle.remove()
        pieces = []
        for pname, module in layers.items():
            weight = weight_matrix(module)
            squares = sums.get(pname)
            if squares is None:  # this rank saw no sample reach the layer: zeros, then reduce
                squares = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
            distributed.all_reduce_sum_(squares)
            scores = weight.abs().to(torch.float64) * squares.sqrt()
            pieces.append(_as_parameter(module, scores))
        return ctx.layout.flatten(pieces).to(ctx.weights.dtype)


def _layers(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """The module owning each selected weight; anything else selected is an error."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        kind = type(module).__name__
        supported = isinstance(module, (nn.Linear, nn.Conv2d)) or kind == "Conv1D"
        if leaf != "weight" or not supported or getattr(module, "groups", 1) != 1:
            raise ConfigError(
                f"wanda scores the weights of Linear, Conv2d (groups = 1) and Conv1D layers, not "
                f"{name} ({kind}); leave it out with prune.ignore @ prune.targets"
            )
        out[name] = module
    return out


def _as_parameter(module: nn.Module, matrix: Tensor) -> Tensor:
    """A ``[rows, d_in]`` score matrix in the shape of ``module.weight``."""
    if type(module).__name__ == "Conv1D":
        return matrix.t()
    return matrix.reshape(module.weight.shape)
