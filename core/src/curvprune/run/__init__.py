"""Whole runs, as ``curvprune run``/``compare``/``export`` perform them.

Owns data sets and models by name (:mod:`.data`, :mod:`.models`), the plain training loop
(:mod:`.training`), the prune phase of schedules with their own training (:mod:`.prune_phase`),
checkpoints and resume (:mod:`.checkpoints`), atomic run files (:mod:`.files`), physical removal
inside a run (:mod:`.removal`), the run itself (:mod:`.execute`), comparisons (:mod:`.compare`),
export (:mod:`.export`), and reports and plots (:mod:`.render`). It may import every layer
below it (:mod:`curvprune.pipeline` and down); only :mod:`curvprune.cli` and
:mod:`curvprune.api` import it.
"""
