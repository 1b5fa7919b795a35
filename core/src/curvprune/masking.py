"""Keep-masks over the selected weights, applied in place and held through training.

Masks are stored next to the model, not inside it (no parametrization): pruned weights are set to
exactly zero, gradients of pruned weights are zeroed before each optimizer step, and optimizer
state of the same shape (momentum, Adam moments) is zeroed at pruned positions after each step, so
neither weight decay nor momentum can revive a pruned weight. ``torch.func`` transforms see plain
parameters, which keeps per-sample gradients fast.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from curvprune.layout import ParamLayout

__all__ = ["MaskSet"]


class MaskSet:
    """Boolean keep-masks of the selected parameters (True = kept).

    Args:
        layout: the selected parameters.
        flat: bool ``[d]`` keep-mask in layout order.
    """

    def __init__(self, layout: ParamLayout, flat: Tensor) -> None:
        if flat.shape != (layout.d,) or flat.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{layout.d}], got {flat.dtype} {tuple(flat.shape)}")
        self.layout = layout
        self.flat = flat

    @classmethod
    def dense(cls, layout: ParamLayout, device: torch.device | str | None = None) -> MaskSet:
        """All weights kept."""
        return cls(layout, torch.ones(layout.d, dtype=torch.bool, device=device))

    @classmethod
    def from_tensors(cls, layout: ParamLayout, masks: Mapping[str, Tensor]) -> MaskSet:
        """From per-parameter masks (any dtype; nonzero = kept), e.g. loaded from safetensors."""
        missing = [n for n in layout.names if n not in masks]
        if missing:
            raise KeyError(f"masks missing for parameters: {', '.join(missing)}")
        flat = layout.flatten([masks[n].to(torch.bool) for n in layout.names])
        return cls(layout, flat)

    def to(self, device: torch.device | str) -> MaskSet:
        """A copy on ``device``."""
        return MaskSet(self.layout, self.flat.to(device))

    def tensors(self) -> dict[str, Tensor]:
        """Per-parameter masks shaped like the parameters (views of :attr:`flat`)."""
        return dict(zip(self.layout.names, self.layout.unflatten(self.flat), strict=True))

    # -- enforcing ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Set every pruned weight of ``model`` to exactly zero."""
        for param, mask in zip(self.layout.parameters(model), self._masks_for(model), strict=True):
            param.mul_(mask)

    @torch.no_grad()
    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the gradients of pruned weights (call before ``optimizer.step()``)."""
        for param, mask in zip(self.layout.parameters(model), self._masks_for(model), strict=True):
            if param.grad is not None:
                param.grad.mul_(mask)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Zero optimizer state shaped like a pruned parameter (momentum, Adam moments)."""
        for param, mask in zip(self.layout.parameters(model), self._masks_for(model), strict=True):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.mul_(mask)

    def _masks_for(self, model: nn.Module) -> list[Tensor]:
        device = next(iter(self.layout.parameters(model))).device
        if self.flat.device != device:
            self.flat = self.flat.to(device)
        return self.layout.unflatten(self.flat)

    # -- statistics -----------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of selected weights removed."""
        return float(1.0 - self.flat.float().mean()) if self.layout.d else 0.0

    def per_layer_sparsity(self) -> dict[str, float]:
        """Fraction removed in each selected parameter."""
        removed = torch.zeros(len(self.layout), device=self.flat.device)
        removed.index_add_(0, self.layout.param_index(self.flat.device), (~self.flat).float())
        sizes = torch.tensor(self.layout.sizes, device=self.flat.device, dtype=torch.float32)
        return dict(zip(self.layout.names, (removed / sizes).tolist(), strict=True))

    def num_removed(self) -> int:
        """Number of removed weights."""
        return int((~self.flat).sum())
