"""Whole runs, as ``curvprune run``/``compare``/``export`` perform them.

Owns data sets and models by name (:mod:`.data`, with text for causal LMs in :mod:`.text`,
:mod:`.models`), the plain training loop (:mod:`.training`), the prune phase of schedules with
their own training (:mod:`.prune_phase`), checkpoints and resume (:mod:`.checkpoints`,
:mod:`.checkpoint_files`, :mod:`.partial`), atomic run files (:mod:`.files`), where a run may write
(:mod:`.paths`), the static checks run before any compute (:mod:`.checks`), physical removal inside
a run (:mod:`.removal`), what a run measures about itself (:mod:`.measure`), the run itself
(:mod:`.execute`), comparisons (:mod:`.compare`), export (:mod:`.export`, Hugging Face folders in
:mod:`.export_hf`), and reports and plots (:mod:`.render`). It may import every layer below it
(:mod:`curvprune.pipeline` and down); only the top layer (:mod:`curvprune.cli`,
:mod:`curvprune.api`) and the testing kit import it.
"""
