"""Tensor bookkeeping shared by every role: which weights are selected and how they are laid out.

Owns :class:`ParamLayout` (the selected parameters as one flat vector, and the only place that
converts between the flat ``[d]`` view and per-parameter tensors), :class:`BlockLayout`,
:class:`MaskSet` (keep-masks over that layout, enforced on the model), :class:`GradientSource`
(per-sample gradient rows ``[k, d]``) and the few ``torch.distributed`` collectives curvprune
uses. It may import only :mod:`curvprune.errors` and the leaf utilities (``_log``,
``_progress``): nothing here knows about roles, plugins, configs or runs.
"""
