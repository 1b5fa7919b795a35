"""Groups of a weight tensor, their L1 scores, and how many of them each layer loses.

A *group* (memo §1.2) is one output channel of a Conv/Linear weight W (``filter``: W[j]), one input
channel (``channel``: W[:, j]) or one scalar (``weight``). Its score is the mean absolute weight,
s_j = mean_{i∈j} |W_i| (the reference's L1 score divided by the group size: the same ranking within
a layer, and the quantity whose kept/pruned ratio stops the growth). A per-group quantity (λ, a
keep flag) acts on W through :func:`broadcast`, a view shaped to multiply W directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import attrs
import torch
from torch import Tensor

from curvprune import ConfigError, ParamLayout

__all__ = [
    "LayerPlan",
    "broadcast",
    "group_count",
    "group_scores",
    "num_pruned",
    "pick_lowest",
    "resolve_ratios",
]

# ⌈r·n⌉ must count as if r were exact: 0.07·100 is 7.000000000000001 in floating point. A
# relative nudge of 2⁻⁵⁰ covers the representation and product round-off of a ratio written with
# a few decimals, and never crosses a genuine integer for n up to ~10¹² (as in the core's caps).
_CEIL_NUDGE = 1.0 - 2.0**-50


def group_count(shape: Sequence[int], granularity: str) -> int:
    """Number of groups of a weight of ``shape``."""
    if granularity == "filter":
        return int(shape[0])
    if granularity == "channel":
        return int(shape[1])
    return math.prod(int(s) for s in shape)


def group_scores(weight: Tensor, granularity: str) -> Tensor:
    """s_j = mean |W_i| over each group, ``[n_groups]`` (float32 or the weight's dtype)."""
    w = weight.detach().abs()
    if granularity == "filter":
        return w.reshape(w.shape[0], -1).mean(1)
    if granularity == "channel":
        return w.transpose(0, 1).reshape(w.shape[1], -1).mean(1)
    return w.reshape(-1)


def broadcast(values: Tensor, shape: Sequence[int], granularity: str) -> Tensor:
    """A view of per-group ``values`` ``[n_groups]`` that broadcasts against a weight of ``shape``."""
    ones = [1] * (len(shape) - 1)
    if granularity == "filter":
        return values.view(-1, *ones)
    if granularity == "channel":
        return values.view(1, -1, *ones[1:])
    return values.view(*shape)


def num_pruned(ratio: float, n: int) -> int:
    """n_p = min(⌈r·n⌉, n − 1): the reference rule, which always keeps at least one group."""
    if ratio <= 0.0 or n <= 1:
        return 0
    return min(math.ceil(ratio * n * _CEIL_NUDGE), n - 1)


def pick_lowest(scores: Tensor, count: int) -> Tensor:
    """Bool ``[n]``: True for the ``count`` lowest scores (ties: the lower index goes first)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.sort(scores, stable=True).indices
        out[order[:count]] = True
    return out


@attrs.frozen(kw_only=True)
class LayerPlan:
    """What the schedule does to one selected parameter.

    Attributes:
        name: the parameter name.
        shape: its shape.
        n_groups: its number of groups.
        ratio: the pruning ratio r it was given (0 for excluded layers).
        n_pruned: n_p, groups it loses (0: the layer is never penalised).
        excluded: why the layer is never pruned (None: it may be).
    """

    name: str
    shape: tuple[int, ...]
    n_groups: int
    ratio: float
    n_pruned: int
    excluded: str | None = None


def _module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _matches(selector: str, param_name: str) -> bool:
    module = _module_name(param_name)
    if selector.startswith("re:"):
        pattern = selector[3:]
        return re.fullmatch(pattern, param_name) is not None or re.fullmatch(pattern, module) is not None
    return selector in (param_name, module)


def resolve_ratios(
    layout: ParamLayout,
    granularity: str,
    default: float,
    ratios: Mapping[str, float],
    excluded: Mapping[str, str],
    *,
    where: str = "schedule.ratios",
) -> tuple[list[LayerPlan], list[str]]:
    """Each selected parameter's ratio and pruned-group count, with warnings for the user.

    Args:
        layout: the selected parameters.
        granularity: ``filter``, ``channel`` or ``weight``.
        default: the ratio of layers no selector matches (``[prune] sparsity``).
        ratios: selector → ratio (see :class:`curvprune_greg.GRegConfig`).
        excluded: parameter name → why it is never pruned (output layer, residual rule).
        where: config path for error messages.

    Returns:
        ``(plans, warnings)``, plans in layout order.

    Raises:
        ConfigError: a selector matching no selected parameter (with a did-you-mean), two
            selectors matching one parameter, a positive ratio on an excluded layer, or a
            parameter without the dimension the granularity groups over.
    """
    chosen: dict[int, tuple[str, float]] = {}
    for selector, ratio in ratios.items():
        hits = [i for i, name in enumerate(layout.names) if _matches(selector, name)]
        if not hits:
            candidates = [*layout.names, *(_module_name(n) for n in layout.names)]
            hint = _closest(selector, candidates)
            more = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(
                f"ratios selector {selector!r} matches no pruned parameter (pruned: "
                f"{', '.join(layout.names)}){more} @ {where}"
            )
        for i in hits:
            if i in chosen:
                raise ConfigError(
                    f"parameter {layout.names[i]!r} matches two ratios selectors, "
                    f"{chosen[i][0]!r} and {selector!r}; make them disjoint @ {where}"
                )
            chosen[i] = (selector, float(ratio))
    plans, warnings = [], []
    for i, (name, shape) in enumerate(zip(layout.names, layout.shapes, strict=True)):
        shape = tuple(int(s) for s in shape)
        if granularity != "weight" and len(shape) < 2:
            raise ConfigError(
                f"greg ({granularity} groups) penalises Conv/Linear weights, but {name!r} has "
                f"shape {list(shape)}; remove it from prune.targets or add it to prune.ignore "
                "@ prune.targets"
            )
        n = group_count(shape, granularity)
        selector, ratio = chosen.get(i, (None, default))
        why = excluded.get(name)
        if why is not None:
            if selector is not None and ratio > 0:
                raise ConfigError(
                    f"ratios selector {selector!r} gives {name!r} ratio {ratio:g}, but it cannot "
                    f"be pruned in {granularity} mode: {why} @ {where}"
                )
            plans.append(LayerPlan(name=name, shape=shape, n_groups=n, ratio=0.0, n_pruned=0,
                                   excluded=why))
            continue
        count = num_pruned(ratio, n)
        if ratio > 0 and math.ceil(ratio * n * _CEIL_NUDGE) >= n:
            warnings.append(
                f"greg: ratio {ratio:g} would remove all {n} groups of {name!r}; it keeps 1 "
                "(the reference rule n_p = min(ceil(r·n), n − 1))"
            )
        plans.append(LayerPlan(name=name, shape=shape, n_groups=n, ratio=ratio, n_pruned=count))
    return plans, warnings


def _closest(word: str, choices: Sequence[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word.removeprefix("re:"), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None
