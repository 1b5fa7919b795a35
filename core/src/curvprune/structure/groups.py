"""A channel group: output channels that are kept or removed together (found by the tracer)."""

from __future__ import annotations

from typing import Any

import attrs
import torch

__all__ = ["ChannelGroup"]


@attrs.frozen
class ChannelGroup:
    """Output channels that are kept or removed together.

    Attributes:
        name: the first producer's module name.
        size: number of channels.
        producers: Conv/Linear modules whose output channels (weight rows) form the group.
        norms: BatchNorm modules sliced with the group.
        consumers: ``(module_name, per_channel)``: Conv/Linear layers reading the channels;
            ``per_channel`` is the number of input features per channel (a Linear layer after
            a flatten of ``[N, C, H, W]`` reads H·W features per channel), else 1.
        coupled: whether several producers feed the same channels (a residual stream).
        removable: whether the channels can be removed physically (and so pruned).
        reason: why not, naming the node or module, when ``removable`` is False.
        gates: the module after which each producer's channels are gated: the BatchNorm
            right after it when there is one, else the producer; one per producer.
        channel_dim: the channel dimension of the gated outputs: 1 (Conv maps) or -1 (Linear
            features).
        copies: channels per structure. A group read or made by a grouped convolution
            (``groups = g``) keeps its conv groups equal in size: structure ``s`` is channel
            ``k * size + s`` for every ``k < copies`` (a multiple of every such g), so each conv
            group loses the same channel slots. 1 otherwise.
        norm_offsets, consumer_offsets, depthwise_offsets, gate_offsets: the channel offset of
            the group inside each norm, consumer, depthwise conv and gate point (parallel to
            those tuples; empty means all 0). A ``torch.cat`` of several groups puts each at
            its offset in the modules reading the concatenation.
        depthwise: depthwise convolutions (``groups = in = out``) the channels pass through:
            channel c of their input makes only channel c of their output, so their weight
            rows and biases are sliced with the group and ``groups`` follows.
        norm_windows, consumer_windows, depthwise_windows, gate_windows: the group's channels
            ``[lo, hi)`` each entry holds (parallel; empty means all of them): a ``torch.chunk``
            hands each chunk's readers a window of the group.
        gate_dims: the dim of the channels at each gate point (parallel to ``gates``; empty
            means ``channel_dim`` for all): 1 on a map, -1 on features or a channels-last map.
        block: consecutive channels per structure in each copy (> 1 when a GroupNorm of
            ``w``-channel groups reads the channels: a structure is a whole GroupNorm group, so
            the others' statistics stay; ``block`` is the lcm of such ``w``). Structure ``s``
            is channels ``k * size * block + s * block + j`` for ``k < copies``, ``j < block``.
        renorms: LayerNorms over the group's channels: removal slices them, and their
            statistics then run over the kept channels only (not the masked model's function:
            see :func:`curvprune.structure.norms.kept_statistics`).
        scales: ``(parameter, dim)``: channel-wise parameters multiplying the channels (a
            layer scale), sliced along ``dim`` on removal; ``scale_offsets`` and
            ``scale_windows`` place the group in them.
        splits: ``(node, windows)``: ``torch.split`` nodes cutting the channels into pieces
            ``[lo, hi)``, whose literal sizes a removal rewrites (in a GraphModule only).
        norm_steps, consumer_steps, depthwise_steps, gate_steps, scale_steps: the stride of
            the group's channels in each entry (parallel; empty means all 1): after a channel
            shuffle, channel ``lo + i`` sits at ``offset + step * i`` (see :meth:`laid`).
        embeddings: ``(parameter, dim, shape)``: parameters added to or concatenated beside
            the channels (a ViT's position embedding and class token) whose ``dim`` holds the
            whole group: masked and gated with the structures, sliced on removal
            (:mod:`curvprune.structure.tokens`).
        literals: ``(node, index, module, attribute, count)``: views whose shape holds the
            group's channel count as a literal at ``index``: removal sets ``attribute`` of
            ``module`` to the kept count, or (``attribute == ""``, a GraphModule) rewrites
            the node (:mod:`curvprune.structure.literals`).
    """

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]
    coupled: bool
    removable: bool
    reason: str | None = None
    gates: tuple[str, ...] = ()
    channel_dim: int = 1
    copies: int = 1
    norm_offsets: tuple[int, ...] = ()
    consumer_offsets: tuple[int, ...] = ()
    depthwise: tuple[str, ...] = ()
    depthwise_offsets: tuple[int, ...] = ()
    gate_offsets: tuple[int, ...] = ()
    norm_windows: tuple[tuple[int, int], ...] = ()
    consumer_windows: tuple[tuple[int, int], ...] = ()
    depthwise_windows: tuple[tuple[int, int], ...] = ()
    gate_windows: tuple[tuple[int, int], ...] = ()
    gate_dims: tuple[int, ...] = ()
    block: int = 1
    renorms: tuple[str, ...] = ()
    scales: tuple[tuple[str, int], ...] = ()
    scale_offsets: tuple[int, ...] = ()
    scale_windows: tuple[tuple[int, int], ...] = ()
    splits: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    norm_steps: tuple[int, ...] = ()
    consumer_steps: tuple[int, ...] = ()
    depthwise_steps: tuple[int, ...] = ()
    gate_steps: tuple[int, ...] = ()
    scale_steps: tuple[int, ...] = ()
    embeddings: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    literals: tuple[tuple[str, int, str, str, int], ...] = ()

    @property
    def channels(self) -> int:
        """The group's width in every module it touches: ``size * copies * block``."""
        return self.size * self.copies * self.block

    def expand(self, values: Any) -> Any:
        """Per-structure ``values`` ``[size]`` as per-channel values ``[channels]``."""
        return values.repeat_interleave(self.block).repeat(self.copies)

    def gate_points(self) -> list[tuple[str, int, int, int, int, int]]:
        """``(module, offset, lo, hi, step, dim)`` of every gate point (see :meth:`laid`)."""
        dims = self.gate_dims or (self.channel_dim,) * len(self.gates)
        return [(*p, d) for p, d in zip(self.laid("gates"), dims, strict=True)]

    def laid(self, what: str) -> list[tuple[Any, int, int, int, int]]:
        """``(entry, offset, lo, hi, step)``: :meth:`placed` with the stride of the group's
        channels in each entry: channel ``lo + i`` sits at ``offset + step * i``."""
        steps = getattr(self, what.rstrip("s") + "_steps" if what != "depthwise"
                        else "depthwise_steps")
        placed = self.placed(what)
        steps = steps or (1,) * len(placed)
        return [(*p, s) for p, s in zip(placed, steps, strict=True)]

    def spans(self, what: str) -> list[tuple[Any, int]]:
        """``(entry, offset)`` of ``norms``, ``consumers``, ``depthwise`` or ``gates``."""
        entries = getattr(self, what)
        offsets = getattr(self, {"norms": "norm_offsets", "consumers": "consumer_offsets",
                                 "depthwise": "depthwise_offsets", "gates": "gate_offsets",
                                 "scales": "scale_offsets"}[what])
        return list(zip(entries, offsets or (0,) * len(entries), strict=True))

    def placed(self, what: str) -> list[tuple[Any, int, int, int]]:
        """``(entry, offset, lo, hi)``: the group's channels ``lo .. hi - 1`` sit at ``offset``
        in each of ``norms``, ``consumers``, ``depthwise`` or ``gates``."""
        windows = getattr(self, {"norms": "norm_windows", "consumers": "consumer_windows",
                                 "depthwise": "depthwise_windows", "gates": "gate_windows",
                                 "scales": "scale_windows"}[what])
        spans = self.spans(what)
        windows = windows or ((0, self.channels),) * len(spans)
        return [(e, at, lo, hi) for (e, at), (lo, hi) in zip(spans, windows, strict=True)]

    def weights(self) -> tuple[str, ...]:
        """The weight parameters whose rows are the group's channels (all must be selected
        for the group to be pruned): each producer's ``weight``."""
        return tuple(f"{p}.weight" for p in self.producers)

    def channel_index(self, structures: Any) -> Any:
        """The channels (in the group's own numbering) of the given structure indices:
        ``(k * size + s) * block + j`` for every copy ``k`` and ``j < block``, ascending."""
        index = torch.as_tensor(structures, dtype=torch.long)
        slots = torch.arange(self.copies)[:, None] * self.size + index[None, :]
        out = slots[:, :, None] * self.block + torch.arange(self.block)[None, None, :]
        return out.reshape(-1)

    def to_json(self) -> dict[str, Any]:
        """The group as plain JSON values."""
        return {
            "name": self.name, "size": self.size, "producers": list(self.producers),
            "norms": list(self.norms), "consumers": [list(c) for c in self.consumers],
            "coupled": self.coupled, "removable": self.removable, "reason": self.reason,
            "copies": self.copies, "depthwise": list(self.depthwise),
            "block": self.block, "renorms": list(self.renorms),
            "scales": [list(x) for x in self.scales],
            "embeddings": [[p, dim] for p, dim, _ in self.embeddings],
            "literals": [[node, module, attr] for node, _, module, attr, _ in self.literals],
        }
