"""Literal channel counts in traced code, and how a removal keeps them right.

``torch.fx`` records every Python number a module's code computes with as a literal of the
graph. torchvision's ViT turns its patch embedding into tokens with
``x.reshape(n, self.hidden_dim, n_h * n_w)``: the channels stay on dim 1 and only the spatial
dims merge, but ``self.hidden_dim`` is traced as the number it held (768). A removal that
narrows the channels leaves that number stale, and the model would fail (or, worse, run on a
wrong shape). The tracer (:mod:`curvprune.structure.tokens`) follows such a view only when it
knows what to change on removal:

* **A** ``torch.fx.GraphModule``: the literal is part of the model, in the node's arguments;
  removal rewrites it to the kept count (as it rewrites ``torch.split`` sizes,
  :func:`curvprune.structure.reshapes.rewrite_splits`) and recompiles.
* **A plain** ``nn.Module``: the traced code cannot be rewritten, but the number came from the
  code of the module that ran the node: the last entry of the node's ``nn_module_stack``
  (the model itself when the stack is empty; for a module call, the caller). The literal is
  read as that module's attribute when (1) exactly one ``int`` attribute of that module
  (``vars(module)``, booleans excluded) equals it, (2) the number appears once in the node's
  shape, and (3) no other node run by the same module's code holds the same number. Removal
  then sets that attribute to the kept channel count, and the module's own forward computes
  the new shape. ViT: ``hidden_dim`` of the ``VisionTransformer`` (its other int attributes,
  ``image_size``, ``patch_size``, ``mlp_dim``, ``num_classes``, ``seq_length``, differ).

Anything else (no such attribute, several, the number also used elsewhere in that code) is
refused with the node named: a guess could leave a model that runs and computes something
else. What the rule cannot see: code of *another* module reading the same attribute (a child
reading ``parent.hidden_dim``); such a model keeps the stale number there and fails on its
first forward after removal, loudly rather than silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["VIEWS", "owner_path", "resolve_literal", "rewrite_literals", "shape_of"]

#: Reshaping calls whose shape argument a literal channel count may sit in.
VIEWS = frozenset({"view", "reshape"})


def owner_path(node: torch.fx.Node) -> str:
    """The qualified name of the module whose code ran ``node`` ("" for the model itself)."""
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    if node.op == "call_module" and stack:
        stack = stack[:-1]  # the entry of the module being called: its caller ran the node
    if not stack:
        return ""
    key, value = stack[-1]
    return str(value[0] if isinstance(value, tuple) else key)


def shape_of(node: torch.fx.Node) -> tuple[list[Any], str] | None:
    """A view's shape and where it sits: ``"packed"`` (one tuple argument), ``"args"``
    (``x.view(n, c, -1)``) or ``"shape"`` (``torch.reshape(x, shape=...)``); None otherwise."""
    if not (node.target in VIEWS or node.target is torch.reshape):
        return None
    if node.target is torch.reshape and len(node.args) < 2:
        shape, where = node.kwargs.get("shape"), "shape"
    elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        shape, where = node.args[1], "packed"
    else:
        shape, where = node.args[1:], "args"
    return (list(shape), where) if isinstance(shape, (tuple, list)) else None


def _ints(value: Any) -> Iterator[int]:
    """Every int (not bool) inside nested node arguments."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _ints(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _ints(item)
    elif isinstance(value, slice):
        yield from _ints((value.start, value.stop, value.step))


def resolve_literal(graph: torch.fx.Graph, source: nn.Module, node: torch.fx.Node,
                    value: int, shape: Sequence[Any]) -> tuple[str, str] | str:
    """``(module path, attribute)`` the literal ``value`` in ``node``'s ``shape`` stands for,
    by the rule of this module's docstring; else the reason, one line."""
    path = owner_path(node)
    module = dict(source.named_modules()).get(path)
    label = (f"module {path!r} ({type(module).__name__})" if path and module is not None
             else f"the model ({type(source).__name__})")
    if module is None:
        return f"its code ran in {path!r}, which is not a module of the model"
    if sum(1 for s in shape if type(s) is int and s == value) > 1:
        return "the number appears more than once in the shape"
    names = sorted(k for k, v in vars(module).items() if type(v) is int and v == value)
    if len(names) != 1:
        what = ("no int attribute" if not names
                else f"{len(names)} int attributes ({', '.join(names)})")
        return f"{label} has {what} equal to it, so a removal cannot tell what to set"
    for other in graph.nodes:
        if other is not node and owner_path(other) == path \
                and value in _ints((other.args, other.kwargs)):
            return (f"the number also appears at node {other.name!r} of {label}'s code, so "
                    f"setting {names[0]!r} may change more than the channels")
    return path, names[0]


def rewrite_literals(model: nn.Module, literals: Sequence[tuple[tuple[Any, ...], int]]
                     ) -> Callable[[], None]:
    """Check, then return a function that sets each literal channel count to its kept count.

    ``literals``: ``((node, index, module, attribute, value), kept)``, the group's
    :attr:`~curvprune.structure.groups.ChannelGroup.literals` with its kept channels: an
    attribute to set (plain module) or, with ``attribute == ""``, entry ``index`` of a
    GraphModule view node's shape to rewrite. Raises a one-line ``ValueError`` when the model
    no longer holds what was traced.
    """
    modules = dict(model.named_modules())
    nodes = {n.name: n for n in model.graph.nodes} if isinstance(
        model, torch.fx.GraphModule) else {}
    edits: list[tuple[Any, ...]] = []
    for (node, index, path, attr, value), kept in literals:
        if attr:
            owner = modules.get(path)
            if owner is None or type(getattr(owner, attr, None)) is not int \
                    or getattr(owner, attr) != value:
                raise ValueError(f"the literal {value} at node {node!r} stands for {attr!r} of "
                                 f"{path or 'the model'!r}, which no longer holds it")
            edits.append((owner, attr, kept))
            continue
        target = nodes.get(node)
        found = shape_of(target) if target is not None else None
        if found is None or len(found[0]) <= index or found[0][index] != value:
            raise ValueError(f"view at node {node!r} is not in the model's fx graph with the "
                             f"traced channel count {value} (the model changed since)")
        edits.append((target, index, kept))

    def apply() -> None:
        for edit in edits:
            if isinstance(edit[0], nn.Module):  # (module, attribute, kept)
                setattr(*edit)
                continue
            target, index, kept = edit
            shape, where = shape_of(target)  # type: ignore[misc]
            shape[index] = kept
            if where == "shape":
                target.kwargs = {**target.kwargs, "shape": tuple(shape)}
            else:
                target.args = (target.args[0], *([tuple(shape)] if where == "packed" else shape))
        if any(not isinstance(e[0], nn.Module) for e in edits):
            model.recompile()

    return apply
