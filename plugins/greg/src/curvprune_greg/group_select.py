"""GReg's ``select_by = "group"``: pick filters by the L1 mass their removal deletes.

The reference picks a layer's pruned filters by s_j = mean |W_j| over the filter alone (memo
§1.2). Removing filter j physically also deletes its bias, its BatchNorm's γ_j and β_j and the
next layers' input columns fed by channel j. With ``select_by = "group"`` a filter's selection
score is the sum of |θ| over all of those (the core's ``magnitude`` scorer with
``granularity = "channel"``, ``extent = "group"``, ``norm = "l1"``, ``normalize = "none"``), ranked
within the layer as before. Only the selection changes: the penalty still acts on the filter (and,
with ``reg_affine``, its bias and BN affine), and the magnitude ratio that stops the growth is
still the filters' mean |W|, the quantity the penalty drives down.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import curvprune
from curvprune import ConfigError, ParamLayout

__all__ = ["filter_group_scores"]


def filter_group_scores(
    model: nn.Module, layout: ParamLayout, names: Sequence[str]
) -> dict[str, Tensor]:
    """For each selected weight in ``names``: per filter, Σ|θ| over what removing it deletes.

    Raises:
        ConfigError: the model cannot be traced, or a filter of ``names`` is not a removable
            channel structure of its own.
    """
    try:
        graph = curvprune.StructureGraph.trace(model)
    except ConfigError as exc:
        raise ConfigError(f"greg select_by = 'group' needs a traceable model ({exc}) "
                          "@ schedule.select_by") from None
    traced = layout.with_structures(graph.structures(layout))
    weights = traced.gather(model).detach()
    ctx = curvprune.PruneContext(model=model, layout=traced, weights=weights,
                                 mask=torch.ones_like(weights, dtype=torch.bool),
                                 target_sparsity=0.0)
    host = curvprune.get_plugin_manager(autoload=False)
    scorer = curvprune.create("scorer", "magnitude", host=host, granularity="channel",
                              extent="group", norm="l1", normalize="none")
    with torch.no_grad():
        scores = scorer.score(ctx)
    sid = traced.structure_index(scores.device)
    starts = [0]
    for c in traced.channels[:-1]:
        starts.append(starts[-1] + c)
    out: dict[str, Tensor] = {}
    for name in names:
        i = traced.names.index(name)
        ids = sid[starts[i] : starts[i] + traced.channels[i]]
        if bool((ids < 0).any()):
            raise ConfigError(
                f"greg select_by = 'group': the filters of {name!r} are not a removable channel "
                "group of their own; use select_by = 'filter' @ schedule.select_by"
            )
        out[name] = scores[ids]
    return out
