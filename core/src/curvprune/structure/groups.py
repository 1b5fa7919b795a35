"""A channel group: output channels that are kept or removed together (found by the tracer)."""

from __future__ import annotations

from typing import Any

import attrs

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

    def to_json(self) -> dict[str, Any]:
        """The group as plain JSON values."""
        return {
            "name": self.name, "size": self.size, "producers": list(self.producers),
            "norms": list(self.norms), "consumers": [list(c) for c in self.consumers],
            "coupled": self.coupled, "removable": self.removable, "reason": self.reason,
        }
