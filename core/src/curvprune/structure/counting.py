"""FLOP and parameter counts of a model, by the GReg reference rules (greg_sosp memo §2).

FLOPs = 2·(Σ_conv k_h·k_w·C_in·C_out·H_out·W_out / groups + Σ_linear in·out), per sample;
parameters = Conv and Linear weights and biases (BatchNorm excluded), with the packed
in-projection of ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear) and Hugging Face
``Conv1D`` layers (GPT-2's transposed Linear) counted as the dense layers they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["count_flops_params", "count_params"]

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def count_params(model: nn.Module) -> int:
    """Conv and Linear weights and biases (BatchNorm excluded; memo §2); also the attention
    in-projections of ``nn.MultiheadAttention`` and transformers' ``Conv1D`` layers."""
    total = 0
    for module in model.modules():
        if isinstance(module, _COUNTED) or type(module).__name__ == "Conv1D":
            total += sum(p.numel() for p in module.parameters(recurse=False))
        elif isinstance(module, nn.MultiheadAttention):
            total += sum(p.numel() for n, p in module.named_parameters(recurse=False)
                         if n.startswith("in_proj_"))
    return total


@torch.no_grad()
def count_flops_params(model: nn.Module, example_input: Tensor) -> tuple[int, int]:
    """FLOPs per sample and parameters, by the GReg reference rules (memo §2).

    FLOPs = 2·(Σ_conv k·C_in·C_out·|output map| / groups + Σ_linear in·out·|positions|), with k
    the kernel size (product over its dims), counted by forward hooks on one forward pass of
    ``example_input`` (batch in dim 0) and divided by the batch size; BatchNorm, biases,
    activations and additions are not counted. Parameters: :func:`count_params`.

    The model's training mode is restored afterwards.
    """
    totals = [0]
    batch = int(example_input.shape[0]) if example_input.dim() else 1

    def conv_hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        kernel = 1
        for k in module.kernel_size:
            kernel *= int(k)
        per_out = kernel * module.in_channels // module.groups
        totals[0] += 2 * per_out * output.numel() // max(batch, 1)

    def linear_hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        totals[0] += 2 * module.in_features * output.numel() // max(batch, 1)

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return totals[0], count_params(model)
