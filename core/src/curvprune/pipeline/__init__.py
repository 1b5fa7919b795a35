"""The pruning pipeline: a validated composition of the four roles, and the step that runs them.

Owns :class:`Pipeline` (built once from a config; :mod:`.pipeline`), :class:`PruningSession`
(pruning inside a training loop; :mod:`.session`), one pruning step (:mod:`.steps`), the
memory/time plan (:mod:`.planning`, measured by :mod:`.memprobe`) and the single-weight
loss-change audit (:mod:`.audit`). Modules below :mod:`.pipeline` see a pipeline only through
:class:`.view.PipelineView`. It may import :mod:`curvprune.config`, :mod:`curvprune.plugin`,
:mod:`curvprune.roles`, :mod:`curvprune.structure`, :mod:`curvprune.tensors` and the leaves;
never :mod:`curvprune.run`, the CLI or the builtins (those register through the plugin manager).
"""
