"""Channel structures: which output channels can be pruned together, gated, and removed.

A **channel group** is a set of output channels (dim 0 of Conv/Linear weights) that must be kept
or removed together. :meth:`StructureGraph.trace` finds them with a ``torch.fx`` symbolic trace
(no input needed) by following every producer's output through the ops that keep its channels
apart:

* a producer (``Conv1d``/``Conv2d``/``Conv3d``, not depthwise, or ``Linear``) starts a group of
  ``out_channels`` channels;
* BatchNorm layers slice with it (they are the group's ``norms``);
* zero-preserving element-wise ops (ReLU and friends, tanh, pooling, dropout, identity, scaling
  by a number, torchvision's ``StochasticDepth``) and flattening pass it on unchanged;
  flattening a ``[N, C, H, W]`` map turns each channel into ``in_features / C`` consecutive
  features of the following Linear layer;
* a residual ``add`` couples the channels of its inputs: channel c of every producer feeding the
  sum is one **structure** (a torchvision ResNet stage stream is the stem or downsample BN output
  plus the last BN output of each block: Nonnenmacher et al., 2022, treat such a coupled
  channel as one structure; greg_sosp memo §4.5);
* a depthwise convolution passes channel c to channel c: it joins the group (``depthwise``);
* a grouped convolution keeps its conv groups equal: structure s is channel ``k * size + s`` of
  every conv group k (``copies``);
* a channel ``torch.cat`` puts each group at its offset in the modules reading it;
* an equal ``torch.chunk`` hands each chunk's readers a window of the group (chunks kept equal);
* a channel-wise product couples its factors; one may be a sigmoid scale (squeeze-and-excitation);
* permutes and transposes move the channel dim (channels-last blocks, patch embeddings), a
  layer-scale parameter is sliced with the channels, a GroupNorm keeps whole groups, a
  LayerNorm over the channels is sliced (its statistics then run over the kept channels:
  :mod:`curvprune.structure.norms`), a channel shuffle places the channels at strides and keeps
  its rows alike (:mod:`curvprune.structure.shuffle`), and ``torch.split`` in a GraphModule
  hands out windows whose sizes removal rewrites (:mod:`curvprune.structure.reshapes`);
* a ViT's token stream is followed through its literal hidden-size view, class token, position
  embedding, token selection and ``nn.MultiheadAttention`` (:mod:`curvprune.structure.tokens`);
* Conv and Linear layers reading the channels are the group's ``consumers`` (their input dims
  are sliced on removal).

Anything else touching a group's channels (``torch.split`` at literal sizes in a plain module,
``F.pad``, slicing, views with a literal channel count, shuffles whose rows differ, ops with
f(0) ≠ 0 such as sigmoid outside a product, modules the tracer does not know) marks the groups
involved not removable, with a reason naming the node: removing their channels would silently
produce a wrong model (the option-A zero-pad shortcut pitfall of DepGraph, memo §7.1). A group
whose channels reach the model's output (the classifier) is never prunable.

**Gates.** Removing structure s is the same as multiplying its channel by a gate m_s = 0 at the
post-BN output of each of its producers (memo §4.2), and at every BN or depthwise conv of the
group off a private chain: every later op maps the zero channel to
zero, so every consumer reads zeros, exactly as if the channel were gone. Masking a structure
zeroes its producers' weight rows and biases and its BatchNorms' γ and β, which makes the gated
output exactly 0 (BN computes γ·x̂ + β). :meth:`Structures.gates` installs the gates as forward
hooks so a scorer can differentiate the loss with respect to them (SOSP).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.errors import (
    ConfigError,
    CurvpruneWarning,
    StructureSkipWarning,
    UnsupportedModelError,
)
from curvprune.structure.attention import HeadGroup, find_heads, head_gates, is_attention
from curvprune.structure.groups import ChannelGroup
from curvprune.structure.hf_mlp import MlpGroup, find_mlps, mlp_gates
from curvprune.structure.tokens import embedding_gates
from curvprune.structure.trace import Tracer
from curvprune.structure.trace_ops import is_leaf
from curvprune.structure.trace_ops import unique as unique_names
from curvprune.tensors.layout import ParamLayout

__all__ = [
    "ChannelGroup",
    "StructureGraph",
    "Structures",
    "attach_structures",
    "skipped_groups",
]


# --------------------------------------------------------------------------------------------
# The graph and the structures of a layout
# --------------------------------------------------------------------------------------------
@attrs.frozen(eq=False)
class StructureGraph:
    """The channel groups of a model, found by :meth:`trace`.

    Attributes:
        groups: every group, in the order its first producer runs.
        param_names: the model's parameter names at trace time.
        model_type: the traced model's class name.
        widths: channels of every BatchNorm and depthwise convolution at trace time (a
            concatenation puts several groups into one of them, at offsets).
        untraced: why ``torch.fx`` could not trace the model, when the graph holds only the
            attention heads and Hugging Face MLP hidden units found by inspecting its modules
            (:mod:`.attention`, :mod:`.hf_mlp`); else None.
    """

    groups: tuple[ChannelGroup, ...]
    param_names: frozenset[str]
    model_type: str
    widths: dict[str, int] = attrs.field(factory=dict)
    untraced: str | None = None

    @classmethod
    def trace(cls, model: nn.Module, *, heads_fallback: bool = False) -> StructureGraph:
        """Trace ``model`` with ``torch.fx`` (no input needed) and find its channel groups.

        Attention modules (:func:`curvprune.structure.attention.find_heads`) add one head group
        each after the channel groups; they are fx leaves. With ``heads_fallback``, a model fx
        cannot trace but that has recognised attention modules or Hugging Face MLPs (a Hugging
        Face model) gives a graph of those alone: its head groups and its MLP groups
        (:func:`curvprune.structure.hf_mlp.find_mlps`), in module order, with
        :attr:`untraced` naming the cause; the pipeline and :func:`curvprune.apply_removal`
        ask for it, other callers keep the error.

        Raises:
            UnsupportedModelError: the model cannot be traced symbolically (the cause is named)
                and no graph of inspected groups was asked for or possible, or a Linear layer's
                input is not a whole number of features per flattened channel.
        """
        heads = find_heads(model)
        names = frozenset(n for n, _ in model.named_parameters())
        try:
            # a GraphModule is read as it is, so that a removal can rewrite its literals
            gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.GraphModule(
                model, _LeafTracer().trace(model))
        except Exception as exc:  # noqa: BLE001 - fx raises many types; the cause is reported
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            inspected = heads + find_mlps(model) if heads_fallback else ()
            if any(g.removable for g in inspected):
                return cls(groups=_module_order(model, inspected), param_names=names,
                           model_type=type(model).__name__,
                           untraced=f"{type(exc).__name__}: {cause}")
            raise UnsupportedModelError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                f"{cause}); channel structures need a symbolically traceable model, or set "
                "mask.coupled = false for per-layer channels without tracing @ model"
            ) from None
        tracer = Tracer(gm)
        tracer.rewritable = gm is model
        tracer.source = model
        tracer.run()
        return cls(
            groups=tracer.groups() + heads,
            param_names=names,
            model_type=type(model).__name__,
            widths=dict(tracer.widths),
        )

    def group(self, name: str) -> ChannelGroup:
        """The group with this name (its first producer), or the group ``name`` produces."""
        for g in self.groups:
            if g.name == name or name in g.producers:
                return g
        raise KeyError(f"no channel group produced by {name!r}")

    def structures(self, layout: ParamLayout) -> Structures:
        """The prunable structures among the parameters ``layout`` selects.

        A group is prunable when it is removable and the weights of all its producers are
        selected. Its channels become structures ``offsets[g] .. offsets[g] + size - 1``.
        """
        position = {name: i for i, name in enumerate(layout.names)}
        chosen = []
        for g in self.groups:
            where = [position.get(w) for w in g.weights()]
            if g.removable and where and all(i is not None for i in where):
                chosen.append((min(w for w in where if w is not None), g))
        chosen.sort(key=lambda item: item[0])
        groups = tuple(g for _, g in chosen)
        offsets, acc = [], 0
        for g in groups:
            offsets.append(acc)
            acc += g.size
        channel_offsets = [0]
        for c in layout.channels:
            channel_offsets.append(channel_offsets[-1] + c)
        channel_structure = torch.full((channel_offsets[-1],), -1, dtype=torch.long)
        for g, off in zip(groups, offsets, strict=True):
            ids = g.expand(torch.arange(off, off + g.size))
            rows = [(p, 0, 0, g.channels, 1, True) for p in g.producers]
            rows += [(m, at, lo, hi, s, False) for m, at, lo, hi, s in g.laid("depthwise")]
            for p, at, lo, hi, step, whole in rows:
                i = position.get(f"{p}.weight")
                if i is None:  # an unselected depthwise conv: only its input is pruned
                    continue
                if whole and layout.channels[i] != g.channels:
                    raise ConfigError(
                        f"parameter {p}.weight has {layout.channels[i]} output channels but its "
                        f"group has {g.channels} @ layout"
                    )
                start = channel_offsets[i] + at
                channel_structure[start : start + step * (hi - lo) : step] = ids[lo:hi]

        # Attention heads and MLP units own rows of their projections (the loop above passes
        # over them: an attention module or MLP has no weight of its own)
        for g, off in zip(groups, offsets, strict=True):
            for p, local in g.layout_rows() if isinstance(g, _ROW_GROUPS) else ():
                i = position[p]
                if layout.channels[i] != local.numel():
                    raise ConfigError(f"parameter {p} has {layout.channels[i]} rows but its "
                                      f"heads have {local.numel()} @ layout")
                channel_structure[channel_offsets[i]: channel_offsets[i + 1]] = off + local

        structure_group = torch.repeat_interleave(
            torch.arange(len(groups)), torch.tensor([g.size for g in groups], dtype=torch.long)
        )
        return Structures(
            graph=self,
            groups=groups,
            offsets=tuple(offsets),
            channel_structure=channel_structure,
            structure_group=structure_group,
            layout_names=layout.names,
        )


@attrs.frozen(eq=False)
class Structures:
    """The prunable structures of a layout: one per channel of each prunable group.

    Attributes:
        graph: the traced graph.
        groups: the prunable groups, ordered by their first producer's place in the layout.
        offsets: first structure id of each group; structures ``[0, S)``.
        channel_structure: long ``[n_channels]``: for each output channel of the layout's
            parameters (numbered as in :meth:`ParamLayout.channel_index`), its structure id, or
            -1 for channels that are never pruned (not in a prunable group, e.g. the
            classifier's rows).
        structure_group: long ``[S]``: the group index of each structure.
        layout_names: the names of the layout these structures were made for.
    """

    graph: StructureGraph
    groups: tuple[ChannelGroup, ...]
    offsets: tuple[int, ...]
    channel_structure: Tensor
    structure_group: Tensor
    layout_names: tuple[str, ...] = ()

    @property
    def n_structures(self) -> int:
        """S, the number of structures."""
        return int(self.structure_group.numel())

    @property
    def n_groups(self) -> int:
        """The number of prunable groups."""
        return len(self.groups)

    def __len__(self) -> int:
        return self.n_structures

    def names(self) -> list[str]:
        """A readable name per structure: ``"<group>[<channel>]"``."""
        return [f"{g.name}[{c}]" for g in self.groups for c in range(g.size)]

    def group_slice(self, index: int) -> slice:
        """The structure ids of group ``index``."""
        start = self.offsets[index]
        return slice(start, start + self.groups[index].size)

    @contextlib.contextmanager
    def gates(self, model: nn.Module, values: Tensor) -> Iterator[None]:
        """Multiply every gate point by its structure's value while the context is open.

        Each group's gate points are the output of the BatchNorm right after each producer, or
        the producer's output when there is none; channel c of group g is multiplied by
        ``values[offsets[g] + c]`` (broadcast over the other dims). ``values`` may require grad:
        ∂loss/∂values is the sensitivity of the loss to each structure's gate (SOSP).

        Args:
            model: the model the structures were traced from.
            values: ``[S]`` gate values (1 = unchanged, 0 = structure removed).
        """
        if values.dim() != 1 or values.numel() != self.n_structures:
            raise ValueError(f"gate values must have shape [{self.n_structures}], got "
                             f"{list(values.shape)}")
        modules = dict(model.named_modules())
        handles = []
        try:
            for g, off in zip(self.groups, self.offsets, strict=True):
                for gate, at, lo, hi, step, dim in g.gate_points():
                    if gate not in modules:
                        raise ConfigError(f"module {gate!r} is not in the model @ structures")
                    hook = _gate_hook(values, (off, g, lo, hi, step), at, dim)
                    handles.append(modules[gate].register_forward_hook(hook))

            for g, off in zip(self.groups, self.offsets, strict=True):
                if isinstance(g, HeadGroup):  # attention heads: no gate points of their own
                    handles.extend(head_gates(g, modules, values, off))
                elif isinstance(g, MlpGroup):  # nor MLP units: their down projection's input
                    handles.extend(mlp_gates(g, modules, values, off))
                elif g.embeddings:  # parameters added to the channels: gated themselves
                    handles.extend(embedding_gates(model, g, values, off))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def gate_masks(self, keep: Tensor) -> dict[str, Tensor]:
        """Keep-masks of the non-weight parameters that gate each structure.

        For every prunable group: its producers' biases, its BatchNorms' weight and bias and
        its depthwise convolutions' biases (when the model has them), each
        ``keep[offsets[g] : offsets[g] + size]`` repeated ``copies`` times at the group's offset
        in the parameter (the rest kept). With the producers' weight rows zeroed (the layout's
        mask), a removed structure's gated output is exactly zero.

        Args:
            keep: bool ``[S]``, True for kept structures.
        """
        out: dict[str, Tensor] = {}
        params, widths = self.graph.param_names, self.graph.widths
        for i, g in enumerate(self.groups):
            piece = g.expand(keep[self.group_slice(i)])
            entries = [(f"{p}.bias", p, 0, 0, g.channels, 1) for p in g.producers]
            entries += [(f"{n}.{w}", n, at, lo, hi, s) for n, at, lo, hi, s in g.laid("norms")
                        for w in ("weight", "bias")]
            entries += [(f"{n}.bias", n, at, lo, hi, s)
                        for n, at, lo, hi, s in g.laid("depthwise")]
            for name, module, at, lo, hi, step in entries:
                if name not in params:
                    continue
                width = widths.get(module, g.channels)
                mask = out.get(name)
                if mask is None:
                    mask = torch.ones(width, dtype=torch.bool, device=keep.device)
                mask[at : at + step * (hi - lo) : step] &= piece[lo:hi]
                out[name] = mask
            for name, dim, shape in g.embeddings:  # whole-group embeddings, full-shape masks
                view = [1] * len(shape)
                view[dim] = g.channels
                mask = piece.view(view).expand(shape)
                out[name] = out[name] & mask if name in out else mask.clone()

        # Attention heads and MLP units: the biases of their rows (the loop above finds none)
        for i, g in enumerate(self.groups):
            for name, local in g.bias_rows() if isinstance(g, _ROW_GROUPS) else ():
                if name in params:
                    kept = keep[self.group_slice(i)][local.to(keep.device)]
                    out[name] = out[name] & kept if name in out else kept
        return out

    def unaffine_norms(self) -> list[str]:
        """BatchNorms of prunable groups without affine parameters (they cannot gate exactly)."""
        params = self.graph.param_names
        return [n for g in self.groups for n in g.norms if f"{n}.weight" not in params]


def _gate_hook(values: Tensor, piece: tuple[int, ...], at: int, dim: int) -> Any:
    """Multiply the output's channels ``at, at + step, ...`` on ``dim`` by the group's gate
    values ``values[off : off + size]`` per channel (:meth:`ChannelGroup.expand`), window
    ``[lo, hi)`` of them (``piece``); the others by 1."""
    off, group, lo, hi, step = piece

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # an attention module: (output, attention weights)
            return (hook(module, inputs, output[0]), *output[1:])
        gate = group.expand(values[off : off + group.size])[lo:hi].to(output.dtype)
        width = output.shape[dim]
        if at or step != 1 or gate.numel() != width:
            full = torch.ones(width, dtype=gate.dtype, device=gate.device)
            gate = full.index_put((torch.arange(at, at + step * gate.numel(), step,
                                                device=gate.device),), gate)
        shape = [1] * output.dim()
        shape[dim] = width
        return output * gate.view(shape)

    return hook


#: Groups found by module inspection, owning rows of their modules' projections.
_ROW_GROUPS = (HeadGroup, MlpGroup)


def _module_order(model: nn.Module, groups: tuple[ChannelGroup, ...]) -> tuple[ChannelGroup, ...]:
    """``groups`` in the order their modules come in ``model`` (a block's heads, then its MLP)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return tuple(sorted(groups, key=lambda g: order.get(g.name, len(order))))


class _LeafTracer(torch.fx.Tracer):
    """The default fx tracer, keeping known library pass-through modules (torchvision's
    ``StochasticDepth``) as leaves so the tracer sees the module, not its random mask."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (is_leaf(m) or is_attention(m)
                or super().is_leaf_module(m, module_qualified_name))


def skipped_groups(graph: StructureGraph, layout: ParamLayout) -> list[ChannelGroup]:
    """Groups whose producers are all selected but that cannot be pruned, for a reason other
    than reaching the model's output (the classifier is never pruned, by design)."""
    selected = set(layout.names)
    return [
        g for g in graph.groups
        if not g.removable and all(w in selected for w in g.weights())
        and "reach the model output" not in (g.reason or "")
    ]


def attach_structures(mask: Any, layout: ParamLayout, model: nn.Module) -> ParamLayout:
    """``layout`` with traced structures when ``mask`` prunes coupled channels, else unchanged.

    The pipeline calls this once per run: structures are traced when the mask applier's
    granularity is ``channel`` and its config has ``coupled = true``.

    Raises:
        UnsupportedModelError: the model cannot be traced, or no selected channel is prunable
            (the reasons of the groups are listed).
    """
    config = getattr(mask, "config", None)
    if getattr(mask, "granularity", "weight") != "channel" or not getattr(config, "coupled", False):
        return layout
    graph = StructureGraph.trace(model, heads_fallback=True)
    structures = graph.structures(layout)
    skipped = skipped_groups(graph, layout)
    if graph.untraced and structures.n_structures:
        message = (f"torch.fx cannot trace {graph.model_type} ({graph.untraced}): only its "
                   "attention heads and Hugging Face MLP hidden units are pruned, every other "
                   "selected channel stays dense")
        if getattr(config, "strict", False):
            raise UnsupportedModelError(f"{message}; set mask.strict = false @ mask.strict")
        warnings.warn(message, StructureSkipWarning, stacklevel=2)
    if skipped and structures.n_structures:
        listed = "; ".join(f"{g.name}: {g.reason}" for g in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        message = (f"{len(skipped)} selected channel group(s) cannot be pruned and stay dense "
                   f"({listed}{more})")
        if getattr(config, "strict", False):
            raise UnsupportedModelError(
                f"{message}; leave them out with prune.ignore or set mask.strict = false "
                "@ mask.strict"
            )
        warnings.warn(message, StructureSkipWarning, stacklevel=2)
    if structures.n_structures == 0:
        why = "; ".join(
            f"{g.name}: {g.reason or 'weights not all selected'}" for g in graph.groups
        ) or "the model has no Conv or Linear producers"
        raise UnsupportedModelError(
            f"no selected channel can be pruned ({why}) @ prune.targets"
        )
    renorms = unique_names(n for g in structures.groups for n in g.renorms)
    if renorms:
        more = f" and {len(renorms) - 3} more" if len(renorms) > 3 else ""
        warnings.warn(
            f"LayerNorms over prunable channels ({', '.join(renorms[:3])}{more}): a masked "
            "channel is a zero that still counts in their mean and variance, a removed one "
            "does not, so the removed model differs from the masked one (evaluate after "
            "removal; curvprune.structure.norms.kept_statistics gives the removed function)",
            CurvpruneWarning, stacklevel=2,
        )
    unaffine = structures.unaffine_norms()
    if unaffine and getattr(config, "remove", False):
        raise UnsupportedModelError(
            f"BatchNorm layers without affine parameters ({', '.join(unaffine)}) cannot be "
            "gated exactly, so their channels cannot be removed without changing the model; "
            "exclude their producers with prune.ignore or set mask.remove = false @ mask.remove"
        )
    if unaffine:
        warnings.warn(
            f"BatchNorm layers without affine parameters ({', '.join(unaffine)}) cannot be "
            "gated exactly: a masked channel outputs -mean/std instead of 0, so the masked and "
            "the physically smaller model differ (removal refuses them)",
            stacklevel=2,
        )
    return layout.with_structures(structures)
