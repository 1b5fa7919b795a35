"""The gate space: one multiplicative gate mₛ per structure, on its post-BatchNorm output.

SOSP works in gate coordinates (memo §4.2): structure s's output channel (after its BatchNorm,
or the producer's output when there is none; one shared gate for a coupled residual channel) is
multiplied by mₛ, with m = 𝟙 at the trained point. Within its layer a channel's output is linear
in its filter, bias and BN affine (γ, β), so zeroing them (what the ``channel`` mask does) is
exactly m: 1 → 0, and every derivative along the removal direction equals the derivative in −mₛ.

:func:`gate_space` is the one place that knows how the core provides the gates
(:class:`curvprune.Structures`); everything else only sees a :class:`GateSpace`: a function
``forward(values, inputs)`` running the model with gates ``values`` ``[S]``, plus the group of
every structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune import ConfigError, ParamLayout, StructureGraph

__all__ = ["GateSpace", "gate_space"]


@attrs.frozen(eq=False)
class GateSpace:
    """A model seen as a function of its structure gates.

    Attributes:
        size: S, the number of structures (gates).
        forward: ``forward(values, inputs) -> outputs``: the model with every structure's
            output multiplied by its entry of ``values`` ``[S]`` (which may require grad or be
            a forward-mode dual tensor).
        group: long ``[S]``, the channel group of each structure.
        group_names: the name of each group (its first producer's module name).
        structure_of_channel: long ``[n_channels]``: for every output channel of the selected
            parameters (numbered as :meth:`ParamLayout.channel_index`), its structure, or -1.

    """

    size: int
    forward: Callable[[Tensor, Any], Tensor]
    group: Tensor
    group_names: tuple[str, ...]
    structure_of_channel: Tensor

    @property
    def n_groups(self) -> int:
        """Number of channel groups."""
        return len(self.group_names)

    @property
    def group_sizes(self) -> Tensor:
        """Structures per group, long ``[n_groups]``."""
        return torch.bincount(self.group, minlength=self.n_groups)

    def alive(self, mask: Tensor, layout: ParamLayout) -> Tensor:
        """Mark the structures that still have a kept weight, bool ``[S]``.

        Args:
            mask: the keep-mask over the selected weights, bool ``[d]``.
            layout: the selected parameters.

        """
        sid = self.structure_of_channel.to(mask.device)[layout.channel_index(mask.device)]
        valid = sid >= 0
        kept = torch.zeros(self.size, dtype=torch.long, device=mask.device)
        kept.index_add_(0, sid[valid], mask[valid].long())
        return kept > 0

    def removed_by(self, before: Tensor, after: Tensor, layout: ParamLayout) -> Tensor:
        """Mark the structures alive under ``before`` and gone under ``after``, bool ``[S]``."""
        return self.alive(before, layout) & ~self.alive(after, layout)


def gate_space(model: nn.Module, layout: ParamLayout, *, where: str = "scorer") -> GateSpace:
    """Build the gate space of ``model`` for the structures of ``layout``.

    Uses ``layout.structures`` when the pipeline attached them (``channel`` mask, ``coupled =
    true``), otherwise traces the model with :class:`curvprune.StructureGraph` (a model fx
    cannot trace gives its attention heads and Hugging Face MLP units, as in the pipeline).

    Raises:
        ConfigError: the selected parameters hold no prunable structure (e.g. only the
            classifier, or layer types without output channels).

    """
    structures = getattr(layout, "structures", None)
    if structures is None:
        structures = StructureGraph.trace(model, heads_fallback=True).structures(layout)
    group = torch.as_tensor(structures.structure_group).long()
    size = int(group.numel())
    if size == 0 or not structures.groups:
        raise ConfigError(
            "SOSP found no prunable structure among the selected parameters "
            f"({', '.join(layout.names)}): structures are output channels of Conv/Linear "
            "layers that do not feed the model output directly; select such layers with "
            f"[prune] targets @ {where}"
        )

    def forward(values: Tensor, inputs: Any) -> Tensor:
        with structures.gates(model, values):
            return model(inputs)

    return GateSpace(
        size=size,
        forward=forward,
        group=group,
        group_names=tuple(g.name for g in structures.groups),
        structure_of_channel=torch.as_tensor(structures.channel_structure).long(),
    )
