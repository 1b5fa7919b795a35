"""Per-sample gradient rows of ``nn.Linear`` layers in closed form (``GradientSource``'s fast path).

For a Linear layer y = W·x + b, the gradient of a sample's loss is g ⊗ x for W and g for b, with
g = ∂L/∂y: one batched forward and one backward give every sample's g and x, and GEMMs write the
rows straight into the ``[k, d]`` buffer. :func:`linear_owners` decides when this applies;
:func:`linear_rows` computes the rows (checked against ``vmap(grad)`` in float64 in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from curvprune.tensors.layout import ParamLayout

__all__ = ["NotClosedForm", "linear_owners", "linear_rows"]


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

    One batched forward of the chunk's samples records each selected layer's input x and
    output; one backward of the rows' summed losses gives ∂Lᵣ/∂output for every sample (in
    eval mode the samples of a torch.nn model do not interact, so row r's loss depends on
    its own samples only). Row r's gradient of W is then Σ gᵣₜ ⊗ xᵣₜ over its samples and
    sequence positions t (and over the layer's calls, if it runs more than once), and of
    the bias Σ gᵣₜ, each written by one batched GEMM straight into its columns of the
    preallocated ``[k, d]`` buffer: no per-parameter copy to flatten afterwards. The sum of
    the rows (the running mean and the finiteness check, ``GradientSource._track``) is one more GEMM
    over all the chunk's samples, Σ g ⊗ x, instead of a second pass over the k·d rows.
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
                # not a plain tensor out, or a selected layer whose weights were used
                # without calling it (a fused fast path): vmap sees every use
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
    flat = torch.empty(rows, layout.d, dtype=dtype, device=outputs.device)
    column_sum = torch.empty(layout.d, dtype=dtype, device=outputs.device)
    seen: dict[nn.Linear, tuple[Tensor, Tensor]] = {}
    for module, pairs in calls.items():
        ins, outs = [], []
        for x, out in pairs:
            g = next(back_of)
            g = torch.zeros_like(out) if g is None else g
            x, g = x.to(dtype), g.to(dtype)  # autocast may have run the layer in half
            ins.append(x.reshape(rows, -1, x.shape[-1]))
            outs.append(g.reshape(rows, -1, g.shape[-1]))
        seen[module] = (torch.cat(ins, 1), torch.cat(outs, 1))
    for (module, kind), start, size in zip(owners, layout.offsets[:-1],
                                           layout.sizes, strict=True):
        x, g = seen[module]  # [k, positions, in], [k, positions, out]
        columns, total = flat[:, start : start + size], column_sum[start : start + size]
        if kind == "weight":
            torch.bmm(g.mT, x, out=columns.view(rows, *module.weight.shape))
            torch.mm(g.reshape(-1, g.shape[-1]).mT, x.reshape(-1, x.shape[-1]),
                     out=total.view(module.weight.shape))
        else:
            torch.sum(g, dim=1, out=columns)
            torch.sum(g, dim=(0, 1), out=total)
    return flat, losses.detach(), column_sum
