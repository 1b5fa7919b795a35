"""The four roles of a pruning pipeline as abstract base classes, and the values they exchange.

Owns :class:`CurvatureEstimator` (with :class:`EstimatorConfig`), :class:`SaliencyScorer`,
:class:`MaskApplier`, :class:`Scheduler`, the per-step :class:`PruneContext` and the report types
(:class:`StepReport`, :class:`PruneResult`). Plugins implement these. It may import
:mod:`curvprune.tensors`, :mod:`curvprune.structure` (for types only where a role needs them),
:mod:`curvprune.errors` and the leaf utilities; never plugins, configs, the pipeline or runs.
"""
