"""Which layers GReg never prunes: the model's output layer and the residual rule (memo §2).

* **Output layer** (``filter``): the rows of the layer that writes the model's output are the
  outputs themselves (the classes); removing one removes a class.
* **Input layer** (``channel``): the input channels of the layer that reads the model's input are
  the data's channels.
* **Residual rule** (``residual = "internal"``, the reference's ``_get_layer_pr_resnet``): channels
  added together across a residual connection form one coupled group (the stage's stream: stem,
  downsample and each block's last conv). The reference never prunes those producers (filter
  mode) nor the layers reading the stream (channel mode), so only block-internal channels go and
  the stream keeps its width.

The channel groups come from the core's :class:`curvprune.StructureGraph` (a torch.fx trace). A
model it cannot trace falls back to the layout's order: the last selected parameter is taken as
the output layer and the first as the input layer, and no residual coupling is known (a warning
says so).
"""

from __future__ import annotations

from torch import nn

import curvprune
from curvprune import ConfigError, ParamLayout

__all__ = ["excluded_layers", "gate_parameters"]


def excluded_layers(
    model: nn.Module, layout: ParamLayout, granularity: str, residual: str
) -> tuple[dict[str, str], list[str]]:
    """Parameter name → why GReg never prunes it, and warnings for the user.

    Args:
        model: the model.
        layout: the selected parameters.
        granularity: ``filter``, ``channel`` or ``weight`` (no structural rule for ``weight``).
        residual: ``internal`` or ``none``.
    """
    if granularity == "weight":
        return {}, []
    graph_cls = getattr(curvprune, "StructureGraph", None)
    if graph_cls is not None:
        try:
            graph = graph_cls.trace(model)
        except ConfigError as exc:
            fallback = _by_order(layout, granularity)
            return fallback, [f"greg: cannot trace the model ({exc}); {_FALLBACK}"]
        return _by_graph(graph.groups, layout, granularity, residual), []
    return _by_order(layout, granularity), []


_FALLBACK = (
    "the last selected parameter is taken as the output layer, the first as the input layer, "
    "and no residual coupling is known"
)


def _by_order(layout: ParamLayout, granularity: str) -> dict[str, str]:
    if granularity == "filter":
        return {layout.names[-1]: "its rows are the model's outputs"}
    return {layout.names[0]: "its input channels are the model's input"}


def _weight_of(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def _by_graph(
    groups: object, layout: ParamLayout, granularity: str, residual: str
) -> dict[str, str]:
    """Apply the rules to the traced channel groups (:class:`curvprune.ChannelGroup`)."""
    selected = set(layout.names)
    out: dict[str, str] = {}
    consumed: set[str] = set()
    for group in groups:  # type: ignore[attr-defined]
        producers = [_weight_of(m) for m in group.producers]
        readers = [_weight_of(m) for m, _ in group.consumers]
        consumed.update(readers)
        if granularity == "filter":
            if not group.removable:
                for p in producers:
                    out.setdefault(p, group.reason or "its output channels cannot be removed")
            elif group.coupled and residual == "internal":
                for p in producers:
                    out.setdefault(p, "its channels are coupled across a residual addition "
                                      "(residual = 'internal')")
        elif group.coupled and residual == "internal":
            for r in readers:
                out.setdefault(r, "its input channels come from a residual stream "
                                  "(residual = 'internal')")
    if granularity == "channel":
        for name in layout.names:
            if name not in consumed:
                out.setdefault(name, "its input channels are the model's input")
    return {k: v for k, v in out.items() if k in selected}


def gate_parameters(model: nn.Module, layout: ParamLayout) -> dict[str, list[str]]:
    """Selected weight name → names of the 1-D parameters gating its output channels.

    For each traced group with a single producer: the producer's bias and the weight and bias of
    the BatchNorm right after it, where the model has them (the ``reg_affine`` option). Empty
    when the model cannot be traced.
    """
    graph_cls = getattr(curvprune, "StructureGraph", None)
    if graph_cls is None:
        return {}
    try:
        graph = graph_cls.trace(model)
    except ConfigError:
        return {}
    params = {name for name, _ in model.named_parameters()}
    selected = set(layout.names)
    out: dict[str, list[str]] = {}
    for group in graph.groups:
        if len(group.producers) != 1:
            continue
        producer = group.producers[0]
        # only BatchNorms holding exactly this group's channels (not a wider one after a
        # torch.cat, where the group sits at an offset)
        widths = getattr(graph, "widths", {})
        full = getattr(group, "channels", group.size)
        placed = (group.placed("norms") if hasattr(group, "placed")
                  else [(n, 0, 0, full) for n in group.norms])
        norms = [n for n, at, lo, hi in placed
                 if (at, lo, hi) == (0, 0, full) and widths.get(n, full) == full]
        names = [f"{producer}.bias", *(f"{n}.{w}" for n in norms for w in ("weight", "bias"))]
        weight = _weight_of(producer)
        if weight in selected:
            out[weight] = [n for n in names if n in params]
    return out
