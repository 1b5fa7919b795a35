"""The exception hierarchy: every error says what failed, where, and how to fix it.

All curvprune errors derive from :class:`CurvpruneError`, so an application can catch the family
in one clause; the CLI prints ``str(error)`` (one line, no traceback) and exits non-zero.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = [
    "RankLostError",
    "ChannelCollapseWarning",
    "CheckpointError",
    "ConfigError",
    "CurvpruneError",
    "CurvpruneWarning",
    "DuplicateComponentError",
    "DuplicatePluginError",
    "EstimatorStateError",
    "MemoryPlanError",
    "NumericalError",
    "PluginHookError",
    "PluginLoadError",
    "SampleReuseWarning",
    "StructureSkipWarning",
    "UnknownComponentError",
    "UnsupportedModelError",
    "UnsupportedQuery",
    "closest",
]


def closest(word: str, choices: Iterable[str]) -> str | None:
    """Return the choice most similar to ``word`` (for "did you mean" hints), or None."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


class CurvpruneError(Exception):
    """Base class of every error raised on purpose by curvprune and its plugins."""


class ConfigError(CurvpruneError, ValueError):
    """A configuration could not be read, structured or validated.

    Attributes:
        errors: one line per problem, each of the form ``description @ path``.
    """

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


class UnsupportedModelError(ConfigError):
    """A model whose graph curvprune cannot trace or whose channels it cannot remove.

    The message names the module or graph node at fault (``... @ model``).
    """


class UnknownComponentError(CurvpruneError, LookupError):
    """A component name that no installed plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        self.kind, self.name = kind, name
        self.available = sorted(available)
        hint = closest(name, self.available)
        message = f"no {kind} {name!r} (installed: {', '.join(self.available) or 'none'})"
        if hint:
            message += f"; did you mean {hint!r}?"
        else:
            message += "; other methods install as plugins: pip install curvprune-<name>"
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would quote the message otherwise
        return str(self.args[0])


class DuplicateComponentError(CurvpruneError):
    """Two plugins registered a component of the same kind under the same name."""


class DuplicatePluginError(CurvpruneError):
    """Two distributions declare the same entry-point name in group ``curvprune``."""


class PluginLoadError(CurvpruneError, ImportError):
    """An installed plugin failed to import or to register its components."""


class PluginHookError(CurvpruneError, RuntimeError):
    """A plugin raised inside a lifecycle hook; the message names the plugin and the hook."""


class CheckpointError(CurvpruneError, ValueError):
    """A checkpoint or partial run directory is missing, truncated, corrupt or unsafe to load."""


class NumericalError(CurvpruneError, ArithmeticError):
    """Non-finite gradients or losses, or a curvature that cannot be inverted."""


class MemoryPlanError(CurvpruneError, MemoryError):
    """A run would not fit in the memory available (raised before any compute)."""


class EstimatorStateError(CurvpruneError, RuntimeError):
    """An estimator was queried in a state that cannot answer (not set up, no gradients yet)."""


class UnsupportedQuery(CurvpruneError, NotImplementedError):
    """An estimator cannot answer a query; the message says what it can do instead."""


class RankLostError(CurvpruneError, RuntimeError):
    """Another torch.distributed rank stopped responding in a collective (the message names
    it); the run's last checkpoint stays resumable."""


class CurvpruneWarning(UserWarning):
    """A run goes on, but probably not as intended; ``curvprune run`` lists these in its report."""


class SampleReuseWarning(CurvpruneWarning):
    """The data holds fewer samples than the gradients need, so some are used more than once."""


class StructureSkipWarning(CurvpruneWarning):
    """Selected layers whose channels cannot be pruned stay dense (the reason is named)."""


class ChannelCollapseWarning(CurvpruneWarning):
    """A global channel ranking left a layer with 10 % or less of its channels."""

