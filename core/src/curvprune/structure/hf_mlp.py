"""MLP hidden units of Hugging Face transformer blocks as structures, found by inspection.

Hugging Face models do not trace with ``torch.fx``, so, like their attention heads
(:mod:`.attention`), the hidden units of their feed-forward blocks are found by inspecting
the modules. An **MLP group** (:class:`MlpGroup`) is one block's MLP; its structures are its
hidden units (``intermediate_size`` of them). A unit is one output feature of the up
projection(s) and the matching input feature of the down projection; the block's input and
output width (the residual stream) never change, so the group is local to the block.

Recognised layouts (a Hugging Face class named ``*MLP`` of another layout is a refused group,
its reason naming the module):

* ``BertLayer`` (``intermediate.dense``, a Linear hidden → intermediate, then
  ``intermediate_act_fn``; ``output.dense``, intermediate → hidden): unit i is row i of
  ``intermediate.dense`` (and its bias) and column i of ``output.dense``. Masking zeroes the
  row and bias, so the unit outputs ``act(0)``: the activation must map 0 to 0 (GELU, ReLU,
  SiLU, tanh do), else the group is refused.
* ``GPT2MLP`` (``c_fc``, ``c_proj``: ``Conv1D`` layers, weight stored ``[in, out]``): unit i
  is column i of ``c_fc.weight`` (and ``c_fc.bias[i]``) and row i of ``c_proj.weight``. The
  layout's rows of ``c_fc.weight`` are input features, so, as for GPT-2's heads, a unit's
  layout rows are those of ``c_proj``: masking zeroes ``c_proj`` row i, which removes the
  unit's contribution exactly whatever the activation; its ``c_fc`` column and bias entry stay
  in the masked model (unread) and go on removal. Scores see the ``c_proj`` rows.
* ``LlamaMLP`` (``gate_proj``, ``up_proj``: Linear hidden → intermediate; ``down_proj``):
  unit i is row i of ``gate_proj`` and ``up_proj`` (and their biases with ``mlp_bias``) and
  column i of ``down_proj``. Masking zeroes both rows, so the unit outputs ``act(0)·0 = 0``.
  Removal updates the module's ``intermediate_size``; the shared config is left alone (no
  forward reads it), so layers may keep different widths.

Masked and removed models compute the same function; the removed modules run their stock
forward. The groups are only added to the head-only graph of a model ``torch.fx`` cannot
trace (:meth:`curvprune.structure.graph.StructureGraph.trace` with ``heads_fallback``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.errors import ConfigError, UnsupportedModelError
from curvprune.structure.groups import ChannelGroup

__all__ = ["MlpGroup", "find_mlps", "mlp_gates", "mlp_slices", "plan_mlp_removal"]

#: Hugging Face block classes recognised by name (any class in the module's MRO).
_STYLES = {"BertLayer": "bert", "GPT2MLP": "gpt2", "LlamaMLP": "llama"}
#: Submodules each part may have (anything else is a variant the rule does not know).
_KNOWN_CHILDREN = {
    "bert.intermediate": {"dense", "intermediate_act_fn"},
    "bert.output": {"dense", "LayerNorm", "dropout"},
    "gpt2": {"c_fc", "c_proj", "act", "dropout"},
    "llama": {"gate_proj", "up_proj", "down_proj", "act_fn"},
}


@attrs.frozen
class MlpGroup(ChannelGroup):
    """The hidden units of one Hugging Face MLP, pruned as structures (module docstring).

    ``size`` is the number of hidden units. ``name`` (and ``producers``) is the MLP module:
    ``<layer>.intermediate`` for BERT, the ``mlp`` module for GPT-2 and Llama.

    Attributes:
        style: ``bert``, ``gpt2``, ``llama``, or ``unknown`` (a refused module).
        owner: the module holding both projections (the BERT layer, else the MLP itself).
        rows: the parameters whose row i is unit i (the layout rows of the structures).
        biases: the biases whose entry i is masked with unit i.
    """

    style: str = "unknown"
    owner: str = ""
    rows: tuple[str, ...] = ()
    biases: tuple[str, ...] = ()

    def weights(self) -> tuple[str, ...]:
        """The parameters whose rows are this group's structures (all must be selected)."""
        return self.rows

    def layout_rows(self) -> list[tuple[str, Tensor]]:
        """``(parameter, structure id of each of its rows)`` for every row parameter."""
        return [(p, torch.arange(self.size)) for p in self.rows]

    def bias_rows(self) -> list[tuple[str, Tensor]]:
        """``(bias, structure id of each entry)`` for the biases masked with the rows."""
        return [(p, torch.arange(self.size)) for p in self.biases]

    def to_json(self) -> dict[str, Any]:
        """The group as plain JSON values, with its MLP style."""
        return {**super().to_json(), "style": self.style, "owner": self.owner,
                "rows": list(self.rows), "biases": list(self.biases)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _hf_classes(module: nn.Module) -> list[str]:
    if not type(module).__module__.startswith("transformers."):
        return []
    return [cls.__name__ for cls in type(module).__mro__]


def _style(module: nn.Module) -> str | None:
    return next((_STYLES[c] for c in _hf_classes(module) if c in _STYLES), None)


def _looks_like_mlp(module: nn.Module) -> bool:
    """A Hugging Face feed-forward module of a layout not recognised (class ``*MLP``)."""
    return bool(_hf_classes(module)) and type(module).__name__.endswith("MLP")


# --------------------------------------------------------------------------------------------
# Finding the MLP groups
# --------------------------------------------------------------------------------------------
def find_mlps(model: nn.Module) -> tuple[MlpGroup, ...]:
    """An :class:`MlpGroup` per recognised Hugging Face MLP of ``model``, in module order.

    A Hugging Face module named ``*MLP`` of another layout is a refused group (its reason
    names the module), as is a recognised one in a variant the rule does not handle.
    """
    out: list[MlpGroup] = []
    for name, module in model.named_modules():
        style = _style(module)
        if style is not None:
            out.append(_describe(name, module, style))
        elif _looks_like_mlp(module):
            out.append(_refused(name, name, "unknown", 0, (
                f"MLP module {name or '<model>'!r} ({type(module).__name__}) has a layout the "
                "MLP rule does not know (supported: Hugging Face BertLayer, GPT2MLP, "
                "LlamaMLP)")))
    return tuple(out)


class _Refusal(Exception):
    """A recognised module in a variant the MLP rule does not handle."""


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise _Refusal(why)


def _refused(name: str, block: str, style: str, size: int, reason: str) -> MlpGroup:
    return MlpGroup(name=name, size=size, producers=(name,), norms=(), consumers=(),
                    coupled=False, removable=False, reason=reason, channel_dim=-1,
                    style=style, owner=block)


def _children(module: Any, key: str) -> None:
    _need(isinstance(module, nn.Module), f"no {key.split('.')[-1]!r} submodule")
    extra = sorted(set(dict(module.named_children())) - _KNOWN_CHILDREN[key])
    _need(not extra, f"has submodules the MLP rule does not know ({', '.join(extra)})")


def _is_conv1d(module: Any) -> bool:
    return isinstance(module, nn.Module) and type(module).__name__ == "Conv1D" and \
        isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2


def _parts(style: str, block: nn.Module) -> tuple[nn.Module, ...]:
    """``(module, parameter owners of the up projections..., down projection)``."""
    if style == "bert":
        return block.intermediate.dense, block.output.dense
    if style == "gpt2":
        return block.c_fc, block.c_proj
    return block.gate_proj, block.up_proj, block.down_proj


def _describe(block_name: str, block: nn.Module, style: str) -> MlpGroup:
    """The MLP group of one recognised module, or a refused one with the reason."""
    name = _join(block_name, "intermediate") if style == "bert" else block_name
    label = f"{type(block).__name__} {block_name or '<model>'!r}"
    try:
        size, rows, biases = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}[style](
            block_name, block)
    except _Refusal as exc:
        return _refused(name, block_name, style, _width(style, block), f"MLP of {label}: {exc}")
    return MlpGroup(name=name, size=size, producers=(name,), norms=(), consumers=(),
                    coupled=False, removable=True, channel_dim=-1, style=style,
                    owner=block_name, rows=rows, biases=biases)


def _width(style: str, block: nn.Module) -> int:
    """The intermediate width of a refused block, when it can be read (else 0)."""
    try:
        up = _parts(style, block)[0]
        return int(up.weight.shape[1] if style == "gpt2" else up.weight.shape[0])
    except (AttributeError, IndexError, TypeError):
        return 0


Spec = tuple[int, tuple[str, ...], tuple[str, ...]]


def _bert(name: str, m: nn.Module) -> Spec:
    inter, output = getattr(m, "intermediate", None), getattr(m, "output", None)
    _children(inter, "bert.intermediate")
    _children(output, "bert.output")
    up, down = getattr(inter, "dense", None), getattr(output, "dense", None)
    _need(isinstance(up, nn.Linear) and isinstance(down, nn.Linear)
          and up.out_features == down.in_features,
          "intermediate.dense/output.dense are not Linear layers of one intermediate width")
    act = getattr(inter, "intermediate_act_fn", None)
    _need(callable(act), "intermediate.intermediate_act_fn is not callable")
    try:
        zero = act(torch.zeros(1, dtype=up.weight.dtype, device=up.weight.device))
    except Exception:  # noqa: BLE001 - any failure means the activation is not known
        zero = None
    _need(isinstance(zero, Tensor) and zero.shape == (1,) and float(zero.abs()) == 0.0,
          "its activation does not map 0 to 0, so a masked unit would not output zero")
    rows = (_join(name, "intermediate.dense.weight"),)
    biases = (_join(name, "intermediate.dense.bias"),) if up.bias is not None else ()
    return int(up.out_features), rows, biases


def _gpt2(name: str, m: nn.Module) -> Spec:
    _children(m, "gpt2")
    up, down = getattr(m, "c_fc", None), getattr(m, "c_proj", None)
    _need(_is_conv1d(up) and _is_conv1d(down), "c_fc/c_proj are not Conv1D layers")
    inner = int(up.weight.shape[1])
    _need(int(down.weight.shape[0]) == inner and up.nf == inner and down.nx == inner
          and (up.bias is None or up.bias.shape == (inner,)),
          f"c_fc/c_proj do not share an intermediate width of {inner}")
    return inner, (_join(name, "c_proj.weight"),), ()


def _llama(name: str, m: nn.Module) -> Spec:
    _children(m, "llama")
    gate, up, down = (getattr(m, p, None) for p in ("gate_proj", "up_proj", "down_proj"))
    _need(all(isinstance(x, nn.Linear) for x in (gate, up, down))
          and gate.out_features == up.out_features == down.in_features,
          "gate_proj/up_proj/down_proj are not Linear layers of one intermediate width")
    rows = (_join(name, "gate_proj.weight"), _join(name, "up_proj.weight"))
    biases = tuple(_join(name, f"{p}.bias") for p, x in (("gate_proj", gate), ("up_proj", up))
                   if x.bias is not None)
    return int(up.out_features), rows, biases


# --------------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------------
def mlp_slices(group: MlpGroup, block: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """``(owner, parameter, axis)`` of every parameter that removing hidden units of ``group``
    (``block``, the module at ``group.owner``) slices: entry ``i`` along ``axis`` is unit ``i``.
    A parameter the module does not have (no bias) is left out: what a unit's removal deletes,
    for the removal and for the group saliencies."""
    if group.style == "gpt2":
        up, down = _parts("gpt2", block)
        cuts = [(up, "weight", 1), (up, "bias", 0), (down, "weight", 0)]
    else:
        *ups, down = _parts(group.style, block)
        cuts = [(lin, what, 0) for lin in ups for what in ("weight", "bias")]
        cuts.append((down, "weight", 1))
    return [c for c in cuts if getattr(c[0], c[1], None) is not None]


def plan_mlp_removal(group: MlpGroup, index: Tensor,
                     modules: Mapping[str, nn.Module]) -> Callable[[], None]:
    """Check the removal of every unit of ``group`` not in ``index`` (kept, ascending) and
    compute the new tensors; the returned callable swaps them in.

    Raises:
        ConfigError: no unit would be kept.
        UnsupportedModelError: the group is refused, or the module changed since the trace.
    """
    if not group.removable:
        raise UnsupportedModelError(
            f"cannot remove hidden units of MLP {group.name!r}: {group.reason} @ model")
    if index.numel() == 0:
        raise ConfigError(
            f"removal would leave MLP {group.name!r} with no hidden unit; keep at least one "
            "(mask.min_channels >= 1) @ mask.min_channels")
    block = modules.get(group.owner)
    if block is None or _describe(group.owner, block, group.style).size != group.size:
        raise UnsupportedModelError(
            f"MLP {group.name!r} is not in the model or its hidden units changed since the "
            "trace @ model")
    index = index.cpu()
    kept = int(index.numel())
    cuts = mlp_slices(group, block)
    attrs_after: list[tuple[nn.Module, str, int]] = []
    if group.style == "gpt2":
        up, down = _parts("gpt2", block)
        attrs_after += [(up, "nf", kept), (down, "nx", kept)]
    else:
        *ups, down = _parts(group.style, block)
        attrs_after += [(lin, "out_features", kept) for lin in ups]
        attrs_after.append((down, "in_features", kept))
        if group.style == "llama" and isinstance(getattr(block, "intermediate_size", None), int):
            attrs_after.append((block, "intermediate_size", kept))
    new = []
    for owner, param, axis in cuts:
        old = getattr(owner, param, None)
        if old is not None:
            value = old.detach().index_select(axis, index.to(old.device)).clone()
            new.append((owner, param, old, value))

    def apply() -> None:
        for owner, param, old, value in new:
            setattr(owner, param, nn.Parameter(value, requires_grad=old.requires_grad))
        for owner, attr, value in attrs_after:
            setattr(owner, attr, value)

    return apply


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------
def mlp_gates(group: MlpGroup, modules: Mapping[str, nn.Module], values: Tensor,
              offset: int) -> list[Any]:
    """Multiply each hidden unit's activation by ``values[offset + i]`` while the handles live.

    The gate scales the down projection's input (the unit's activation after the nonlinearity,
    times ``up_proj`` for Llama): 0 is the unit removed, 1 the model unchanged. Returns
    handles with ``remove()``.
    """
    block = modules.get(group.owner)
    if block is None:
        raise ConfigError(f"MLP {group.name!r} is not in the model @ structures")
    down = _parts(group.style, block)[-1]
    gate = values[offset: offset + group.size]

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * gate.to(args[0].dtype), *args[1:])

    return [down.register_forward_pre_hook(hook)]
