"""Keep-masks over the selected weights, applied in place and held through training.

Masks are stored next to the model, not inside it (no parametrization): pruned weights are set to
exactly zero, gradients of pruned weights are zeroed before each optimizer step, and optimizer
state of the same shape (momentum, Adam moments) is zeroed at pruned positions after each step, so
neither weight decay nor momentum can revive a pruned weight. ``torch.func`` transforms see plain
parameters, which keeps per-sample gradients fast.

Structured (channel) masks also hold **extra** masks for parameters that are not selected but
must be zero for a removed channel to output exactly zero: its producers' biases and its
BatchNorms' γ and β (:meth:`curvprune.Structures.gate_masks`). They are enforced the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from curvprune.tensors.layout import ParamLayout

__all__ = ["MaskAwareOptimizer", "MaskSet"]


@runtime_checkable
class MaskAwareOptimizer(Protocol):
    """An optimizer with state that mixes coordinates, told about every new mask.

    Zeroing the optimizer state shaped like a parameter (:meth:`MaskSet.mask_optimizer_state_`)
    is enough for SGD's momentum or Adam's moments, which are per coordinate. An optimizer whose
    state couples coordinates (M-FAC's window of past gradients, a preconditioner, a low-rank
    factor) must itself remove pruned coordinates from that state, or its next update moves
    pruned weights. It does so in ``apply_masks``, which the pruning session calls after every
    pruning step (not every optimizer step: it may be costly, and gradients of pruned weights
    are zeroed before each step anyway). Any optimizer may implement it; nothing registers.
    """

    def apply_masks(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Remove pruned coordinates from the optimizer's state.

        Args:
            masks: bool keep-mask (True = kept), shaped like its parameter, for every masked
                parameter that this optimizer optimizes (looked up by identity); parameters
                not in the mapping are unmasked.
        """


class MaskSet:
    """Boolean keep-masks of the selected parameters (True = kept).

    Args:
        layout: the selected parameters.
        flat: bool ``[d]`` keep-mask in layout order.
        extra: keep-masks of other parameters of the model (not in the layout), by parameter
            name, each shaped like its parameter (biases and BatchNorm affine parameters of
            pruned channels).
    """

    def __init__(
        self, layout: ParamLayout, flat: Tensor, extra: Mapping[str, Tensor] | None = None
    ) -> None:
        if flat.shape != (layout.d,) or flat.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{layout.d}], got {flat.dtype} {tuple(flat.shape)}")
        self.layout = layout
        self.flat = flat
        self.extra: dict[str, Tensor] = {}
        for name, mask in (extra or {}).items():
            if name in layout.names:
                raise ValueError(f"extra mask {name!r} is a selected parameter; put it in flat")
            self.extra[name] = mask.to(device=flat.device, dtype=torch.bool)

    def with_extra(self, extra: Mapping[str, Tensor]) -> MaskSet:
        """A copy with ``extra`` masks added (ANDed with existing ones).

        Masks of selected parameters are ANDed into :attr:`flat`; the others are kept as extra
        masks.
        """
        flat = self.flat
        position = {name: i for i, name in enumerate(self.layout.names)}
        pieces = None
        merged = dict(self.extra)
        for name, mask in extra.items():
            mask = mask.to(device=flat.device, dtype=torch.bool)
            if name in position:
                if pieces is None:
                    pieces = list(self.layout.unflatten(flat.clone()))
                i = position[name]
                pieces[i] = pieces[i] & mask.reshape(pieces[i].shape)
            else:
                merged[name] = merged[name] & mask if name in merged else mask
        if pieces is not None:
            flat = self.layout.flatten(pieces)
        return MaskSet(self.layout, flat, merged)

    def with_structure_gates(self) -> MaskSet:
        """A copy that also masks the gates of every structure with no kept weight left.

        A structure whose weights are all pruned must output exactly zero: its producers'
        biases and its normalization layers' affine parameters join the extra masks
        (:meth:`curvprune.Structures.gate_masks`). Without traced structures: unchanged.
        """
        structures = self.layout.structures
        if structures is None:
            return self
        return self.with_extra(structures.gate_masks(self.layout.alive_structures(self.flat)))

    def narrowed(self, flat: Tensor) -> MaskSet:
        """The mask set after pruning down to ``flat`` (bool ``[d]``, a subset of :attr:`flat`).

        Extra masks carry over, and structures left with no kept weight are gated.
        """
        return MaskSet(self.layout, flat, self.extra).with_structure_gates()

    @torch.no_grad()
    def write_(self, model: nn.Module, weights: Tensor) -> None:
        """Write flat ``weights`` ``[d]`` into ``model``, then zero every pruned position and
        extra-masked parameter (:meth:`apply_`)."""
        self.layout.scatter_(model, weights)
        self.apply_(model)

    @classmethod
    def dense(cls, layout: ParamLayout, device: torch.device | str | None = None) -> MaskSet:
        """All weights kept."""
        return cls(layout, torch.ones(layout.d, dtype=torch.bool, device=device))

    @classmethod
    def from_tensors(cls, layout: ParamLayout, masks: Mapping[str, Tensor]) -> MaskSet:
        """From per-parameter masks (any dtype; nonzero = kept), e.g. loaded from safetensors.

        Masks of parameters outside the layout become extra masks.
        """
        missing = [n for n in layout.names if n not in masks]
        if missing:
            raise KeyError(f"masks missing for parameters: {', '.join(missing)}")
        flat = layout.flatten([masks[n].to(torch.bool) for n in layout.names])
        extra = {n: m for n, m in masks.items() if n not in layout.names}
        return cls(layout, flat, extra)

    def to(self, device: torch.device | str) -> MaskSet:
        """A copy on ``device``."""
        extra = {n: m.to(device) for n, m in self.extra.items()}
        return MaskSet(self.layout, self.flat.to(device), extra)

    def tensors(self) -> dict[str, Tensor]:
        """Per-parameter masks shaped like the parameters (views of :attr:`flat`), and the
        extra masks."""
        out = dict(zip(self.layout.names, self.layout.unflatten(self.flat), strict=True))
        out.update(self.extra)
        return out

    # -- enforcing ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Set every pruned weight (and extra-masked parameter) of ``model`` to exactly zero."""
        for param, mask in self._pairs(model):
            param.mul_(mask)

    @torch.no_grad()
    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the gradients of pruned weights (call before ``optimizer.step()``)."""
        for param, mask in self._pairs(model):
            if param.grad is not None:
                param.grad.mul_(mask)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Zero optimizer state shaped like a pruned parameter (momentum, Adam moments)."""
        for param, mask in self._pairs(model):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.mul_(mask)

    @torch.no_grad()
    def mask_optimizer_(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Remove pruned coordinates from all of the optimizer's state (after a pruning step).

        Zeroes the state shaped like a parameter (:meth:`mask_optimizer_state_`) and, for a
        :class:`MaskAwareOptimizer`, calls ``optimizer.apply_masks`` with the keep-mask of
        every masked parameter the optimizer holds.
        """
        self.mask_optimizer_state_(optimizer, model)
        if isinstance(optimizer, MaskAwareOptimizer):
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            optimizer.apply_masks(
                {param: mask for param, mask in self._pairs(model) if id(param) in held}
            )

    def _pairs(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """(parameter, mask) for the selected parameters and the extra-masked ones."""
        params = self.layout.parameters(model)
        pairs = list(zip(params, self._masks_for(model), strict=True))
        if self.extra:
            named = dict(model.named_parameters())
            missing = [n for n in self.extra if n not in named]
            if missing:
                raise ValueError(
                    f"extra masks for parameters not in the model: {', '.join(missing)}"
                )
            for name, mask in self.extra.items():
                if mask.device != named[name].device:
                    mask = self.extra[name] = mask.to(named[name].device)
                pairs.append((named[name], mask.reshape(named[name].shape)))
        return pairs

    def _masks_for(self, model: nn.Module) -> list[Tensor]:
        device = next(iter(self.layout.parameters(model))).device
        if self.flat.device != device:
            self.flat = self.flat.to(device)
        return self.layout.unflatten(self.flat)

    # -- statistics -----------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of selected weights removed: an integer count over d, divided once."""
        return self.num_removed() / self.layout.d if self.layout.d else 0.0

    def removed_per_layer(self) -> dict[str, int]:
        """Count the removed weights of each selected parameter (in int64, exact).

        One reduction per parameter slice: no ``[d]`` index (8 bytes per weight, 0.7 GB for
        GPT-2 small) is built, and the counts come back to the host in one transfer.
        """
        kept = torch.stack([
            self.flat[self.layout.slice(i)].count_nonzero() for i in range(len(self.layout))
        ]) if len(self.layout) else torch.zeros(0, dtype=torch.long)
        counts = torch.tensor(self.layout.sizes) - kept.cpu()
        return dict(zip(self.layout.names, (int(c) for c in counts.tolist()), strict=True))

    def per_layer_sparsity(self) -> dict[str, float]:
        """Fraction removed in each selected parameter.

        Counted in integers and divided once at the end, so the fraction is the correctly
        rounded k/n whatever the default dtype (float32 counts stop being exact above 2^24
        weights; float32 division rounds 1/3 to 0.3333333432...).
        """
        removed = self.removed_per_layer()
        sizes = dict(zip(self.layout.names, self.layout.sizes, strict=True))
        return {name: removed[name] / sizes[name] if sizes[name] else 0.0 for name in removed}

    def num_removed(self) -> int:
        """Number of removed weights."""
        return self.layout.d - int(self.flat.count_nonzero())
