"""What every conformance suite shares: building the component by name, Hypothesis settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from hypothesis import HealthCheck, settings
from torch import Tensor

import curvprune
from curvprune import (
    PluginHost,
)

__all__ = ["ComponentContract", "contract_settings", "structure_to_weights"]

#: Every contract test: subclasses re-run the same @given test, which is the point here.
contract_settings = settings(suppress_health_check=[HealthCheck.differing_executors])

_HOSTS: dict[type, PluginHost] = {}


class ComponentContract:
    """Shared plumbing: the plugin host and building components by kind and name."""

    kind: ClassVar[str]
    #: The registered name of the component under test.
    name: ClassVar[str]
    #: Config options the suite builds the component with.
    options: ClassVar[Mapping[str, Any]] = {}
    #: ``(name, plugin)`` pairs registered in-process, with entry-point autoload off (so an
    #: installed copy of the same plugin does not clash). Empty: use the installed plugins.
    plugins: ClassVar[Sequence[tuple[str, object]]] = ()

    @classmethod
    def host(cls) -> PluginHost:
        """The plugin host the suite resolves names in (built once per class)."""
        if cls not in _HOSTS:
            if cls.plugins:
                _HOSTS[cls] = curvprune.get_plugin_manager(autoload=False, plugins=cls.plugins)
            else:
                _HOSTS[cls] = curvprune.get_plugin_manager()
        return _HOSTS[cls]

    def _create(self, **config: Any) -> Any:
        return curvprune.create(self.kind, self.name, host=self.host(), **config)


def structure_to_weights(keep: Tensor, layout: curvprune.ParamLayout) -> Tensor:
    """Weight keep-mask ``[d]`` from a structure keep-mask ``[S]`` (unprunable rows kept)."""
    sid = layout.structure_index()
    never = torch.ones_like(sid, dtype=torch.bool)
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], never)
    return per_channel[layout.channel_index()]
