"""Channel structures: which output channels are pruned together, and their physical removal.

Owns the ``torch.fx`` tracer that finds coupled channel groups (:mod:`.trace`, with the rules
for shape ops in :mod:`.reshapes` and :mod:`.shuffle`, for norms and layer scales in
:mod:`.norms`, and for transformer token streams in :mod:`.tokens` and :mod:`.literals`;
:mod:`.groups`), the per-layout structure map and exact gates
(:mod:`.graph`), slicing pruned channels out of a model (:mod:`.removal`) and FLOP/parameter
counts (:mod:`.counting`). It may import :mod:`curvprune.tensors`, :mod:`curvprune.errors` and
the leaf utilities; the tensor layer sees structures only through the small
:class:`curvprune.tensors.layout.StructureMap` protocol.
"""
