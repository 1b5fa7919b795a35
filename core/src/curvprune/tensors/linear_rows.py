"""Per-sample gradient rows of ``nn.Linear`` layers in closed form (``GradientSource``'s fast path).

For a Linear layer y = W·x + b, the gradient of a sample's loss is g ⊗ x for W and g for b, with
g = ∂L/∂y: one batched forward and one backward give every sample's g and x, and GEMMs write the
rows straight into the ``[k, d]`` buffer. :func:`linear_owners` decides when this applies;
:func:`linear_rows` computes the rows (checked against ``vmap(grad)`` in float64 in the tests).
:class:`LinearFactors` holds the x and g the rows are made of, which sharded ranks exchange
instead of the rows: (in + out) numbers per position against in·out per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from curvprune.tensors.layout import ParamLayout

__all__ = ["LinearFactors", "NotClosedForm", "linear_factors", "linear_owners", "linear_rows"]


class NotClosedForm(Exception):
    """The closed form does not apply to this model.

    Its outputs are not a plain tensor, or a selected layer's weights were used without calling
    the layer.
    """


def linear_owners(model: nn.Module, layout: ParamLayout) -> list[tuple[nn.Linear, str]] | None:
    """Return ``(module, "weight" | "bias")`` per selected parameter if the closed form applies.

    It applies when every selected parameter is the weight or bias of a ``torch.nn.Linear``
    (exactly that class, so its forward is ``x @ Wᵀ + b``) that owns it alone, and every module
    of the model is one of torch.nn's own, none of them in place: such a model, in eval mode,
    computes each sample on its own (no batch statistics, no mixing of samples), which the
    batched closed form relies on. Otherwise None: ``vmap(grad)``, which needs no such
    assumption.
    """
    for module in model.modules():
        if not type(module).__module__.startswith("torch.nn.") or getattr(module, "inplace",
                                                                           False):
            return None
    owners: dict[int, tuple[nn.Linear, str]] = {}
    uses: dict[int, int] = {}
    for module in model.modules():
        for kind, param in module.named_parameters(recurse=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
            if type(module) is nn.Linear and kind in ("weight", "bias"):
                owners[id(param)] = (module, kind)
    params = dict(model.named_parameters())
    chosen = []
    for name in layout.names:
        key = id(params[name])
        if key not in owners or uses[key] != 1:
            return None
        chosen.append(owners[key])
    return chosen


@attrs.define(eq=False)
class LinearFactors:
    """Each selected layer's inputs x and output gradients g for one chunk of rows.

    Row r's gradient of a Linear layer's W is Σₜ gᵣₜ ⊗ xᵣₜ, of its bias Σₜ gᵣₜ: these
    ``[k, positions, in]`` and ``[k, positions, out]`` tensors (positions: the row's samples,
    sequence positions and the layer's calls) hold all the rows in (in + out)·positions numbers
    per row instead of in·out, which is what sharded ranks exchange
    (:meth:`curvprune.tensors.gradients.GradientSource.iter_grads` with ``columns``).

    Attributes:
        pairs: ``(x, g)`` per distinct selected layer, in the order of first selection.
        losses: the rows' losses ``[k]``.
    """

    pairs: list[tuple[Tensor, Tensor]]
    losses: Tensor

    @property
    def rows(self) -> int:
        return int(self.losses.shape[0])

    def positions(self) -> list[int]:
        """Positions per row of each layer (the same on every rank for the same data shapes)."""
        return [int(x.shape[1]) for x, _ in self.pairs]

    def packed(self) -> Tensor:
        """``[k, 1 + Σ positions·(in + out)]``: the loss, then each layer's x and g, per row."""
        pieces = [self.losses.to(self.pairs[0][0].dtype).unsqueeze(1)]
        for x, g in self.pairs:
            pieces += [x.reshape(self.rows, -1), g.reshape(self.rows, -1)]
        return torch.cat(pieces, dim=1)

    @classmethod
    def unpacked(
        cls, packed: Tensor, modules: Sequence[nn.Linear], positions: Sequence[int]
    ) -> LinearFactors:
        """The inverse of :meth:`packed`, given the layers and their positions per row."""
        k, at = packed.shape[0], 1
        pairs = []
        for module, count in zip(modules, positions, strict=True):
            width_in, width_out = count * module.in_features, count * module.out_features
            x = packed[:, at : at + width_in].reshape(k, count, module.in_features)
            at += width_in
            g = packed[:, at : at + width_out].reshape(k, count, module.out_features)
            at += width_out
            pairs.append((x, g))
        return cls(pairs, packed[:, 0])

    def columns(
        self,
        layout: ParamLayout,
        owners: Sequence[tuple[nn.Linear, str]],
        lo: int,
        hi: int,
        out: Tensor | None = None,
    ) -> Tensor:
        """The rows' columns ``[lo, hi)`` of the flat layout, ``[k, hi − lo]``.

        Only the weights in the range are formed: a parameter cut by ``lo`` or ``hi`` costs
        its rows of W inside the range (two partial rows at most are formed whole and cut).
        """
        index = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in owners))}
        x0 = self.pairs[0][0]
        if out is None:
            out = torch.empty(self.rows, hi - lo, dtype=x0.dtype, device=x0.device)
        for (module, kind), start, size in zip(owners, layout.offsets[:-1], layout.sizes,
                                               strict=True):
            a, b = max(lo, start) - start, min(hi, start + size) - start
            if a >= b:
                continue
            x, g = self.pairs[index[module]]
            target = out[:, start + a - lo : start + b - lo]
            if kind == "bias":
                torch.sum(g[..., a:b], dim=1, out=target)
                continue
            width = module.in_features
            first, last = a // width, -(-b // width)  # the rows of W the range touches
            if a % width == 0 and b % width == 0:
                torch.bmm(g[..., first:last].mT, x, out=target.view(self.rows, last - first,
                                                                     width))
            else:
                part = torch.bmm(g[..., first:last].mT, x).reshape(self.rows, -1)
                target.copy_(part[:, a - first * width : b - first * width])
        return out

    def full_rows(
        self, layout: ParamLayout, owners: Sequence[tuple[nn.Linear, str]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``[k, d]``, losses ``[k]`` and the rows' sum ``[d]`` (one process's form).

        The sum is one more GEMM over all the chunk's samples, Σ g ⊗ x, instead of a second
        pass over the k·d rows.
        """
        flat = self.columns(layout, owners, 0, layout.d)
        x0 = self.pairs[0][0]
        column_sum = torch.empty(layout.d, dtype=x0.dtype, device=x0.device)
        index = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in owners))}
        for (module, kind), start, size in zip(owners, layout.offsets[:-1], layout.sizes,
                                               strict=True):
            x, g = self.pairs[index[module]]
            total = column_sum[start : start + size]
            if kind == "weight":
                torch.mm(g.reshape(-1, g.shape[-1]).mT, x.reshape(-1, x.shape[-1]),
                         out=total.view(module.weight.shape))
            else:
                torch.sum(g, dim=(0, 1), out=total)
        return flat, self.losses, column_sum


def linear_factors(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    owners: list[tuple[nn.Linear, str]],
    selected: dict[str, Tensor],
    frozen: dict[str, Tensor],
    xs: Tensor,
    ys: Tensor,
) -> LinearFactors:
    """Every selected layer's x and g for a chunk ``xs`` ``[k, per_row, …]``, and the losses.

    One batched forward of the chunk's samples records each selected layer's input x and
    output; one backward of the rows' summed losses gives ∂Lᵣ/∂output for every sample (in
    eval mode the samples of a torch.nn model do not interact, so row r's loss depends on its
    own samples only).

    Raises:
        NotClosedForm: the outputs are not a plain tensor, or a selected layer's weights were
            used without calling it (a fused fast path): ``vmap`` sees every use.
    """
    rows, per_row = xs.shape[0], xs.shape[1]
    samples = xs.reshape(rows * per_row, *xs.shape[2:])
    calls: dict[nn.Linear, list[tuple[Tensor, Tensor]]] = {m: [] for m, _ in owners}

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not output.requires_grad:  # the first selected layer: its output starts the graph
            output.requires_grad_()
        calls[module].append((inputs[0].detach(), output))  # type: ignore[index]

    handles = [m.register_forward_hook(record) for m in calls]
    try:
        with torch.enable_grad():
            outputs = functional_call(model, ({**frozen, **selected},), (samples,),
                                      strict=False)
            if not isinstance(outputs, Tensor) or not all(calls.values()):
                raise NotClosedForm
            grouped = outputs.reshape(rows, per_row, *outputs.shape[1:])
            losses = vmap(loss_fn)(grouped, ys)
            recorded = [out for m in calls for _, out in calls[m]]
            backs = torch.autograd.grad(losses.sum(), recorded, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    back_of = iter(backs)
    dtype = next(iter(selected.values())).dtype
    pairs = []
    for pairs_of_module in calls.values():
        ins, outs = [], []
        for x, out in pairs_of_module:
            g = next(back_of)
            g = torch.zeros_like(out) if g is None else g
            x, g = x.to(dtype), g.to(dtype)  # autocast may have run the layer in half
            ins.append(x.reshape(rows, -1, x.shape[-1]))
            outs.append(g.reshape(rows, -1, g.shape[-1]))
        pairs.append((torch.cat(ins, 1), torch.cat(outs, 1)))
    return LinearFactors(pairs, losses.detach())


def linear_rows(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    layout: ParamLayout,
    owners: list[tuple[nn.Linear, str]],
    selected: dict[str, Tensor],
    frozen: dict[str, Tensor],
    xs: Tensor,
    ys: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``[k, d]``, losses ``[k]`` and the rows' sum ``[d]`` in closed form (nn.Linear).

    :func:`linear_factors`, then each row of W is Σₜ gᵣₜ ⊗ xᵣₜ over its samples and sequence
    positions (and over the layer's calls, if it runs more than once), and of the bias Σₜ gᵣₜ,
    each written by one batched GEMM straight into its columns of the preallocated ``[k, d]``
    buffer: no per-parameter copy to flatten afterwards.
    """
    factors = linear_factors(model, loss_fn, owners, selected, frozen, xs, ys)
    return factors.full_rows(layout, owners)
