"""Static checks of a run: everything that can fail before any training or data loading.

``curvprune validate``, ``curvprune plan`` and ``curvprune run`` all call :func:`static_checks`,
so a bad model or data name, a missing file, a run name that would escape the output folder or
a model whose selected channels cannot be pruned is reported in one line before any compute:

* where the run writes: ``--out``/``[run] out`` and the cache are folders (or will be), the run
  name is one folder name;
* ``[data]``: a known name, its folders present (no sample is loaded); text: an ``hf:`` model,
  the text and the tokenizer files present (nothing tokenized);
* ``[model]``: the model builds (random weights, on the CPU), a ``checkpoint`` file exists;
* ``[prune]``: the targets select parameters of that model, and a channel mask can trace it and
  finds prunable channels among them.

A ``module:pkg.mod:factory`` model imports and runs ``pkg.mod``: a config is as trusted as a
script. :func:`modules_to_import` names the modules a config would import, so ``validate`` and
``plan`` can show them before importing anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
from torch import nn

from curvprune.errors import ConfigError
from curvprune.pipeline.pipeline import Pipeline
from curvprune.run.data import check_data
from curvprune.run.models import build_model
from curvprune.run.partial import PARTIAL_SUFFIX
from curvprune.run.paths import check_run_name, existing_file, new_folder, user_folder
from curvprune.structure.graph import attach_structures
from curvprune.tensors.layout import ParamLayout

__all__ = ["StaticCheck", "modules_to_import", "static_checks"]


@attrs.frozen
class StaticCheck:
    """What the static checks found: the model (random weights) and its selected parameters."""

    model: nn.Module
    layout: ParamLayout
    num_classes: int


def modules_to_import(model_name: str) -> list[str]:
    """The user modules a ``[model] name`` imports (``module:pkg.mod:factory`` → ``pkg.mod``)."""
    if model_name.startswith("module:"):
        return [model_name.split(":", 2)[1]]
    return []


def static_checks(
    pipeline: Pipeline,
    *,
    out: str | Path | None = None,
    name: str | None = None,
    cache: str | Path | None = None,
    num_classes: int | None = None,
) -> StaticCheck:
    """Run every check that needs neither training nor data; return the model it built.

    Args:
        pipeline: the validated pipeline of the run.
        out, name, cache: the CLI's ``--out``, ``--name`` and cache folder, if given.
        num_classes: the classifier width when the caller knows it (else from ``[model]``, or
            the data's when knowable without loading, else ``[data] num_classes``).

    Raises:
        ConfigError, UnsupportedModelError: the first problem, in one line naming its field.
    """
    cfg = pipeline.config
    user_folder(out if out is not None else cfg.run.out, "the output folder",
                "--out" if out is not None else "run.out")
    if name is not None:
        check_run_name(name, "--name")
    explicit = name if name is not None else cfg.run.name
    if explicit is not None:  # the user's name must be free: it is never suffixed
        folder = Path(out if out is not None else cfg.run.out)
        where = "--name" if name is not None else "run.name"
        new_folder(folder / explicit, f"run directory {explicit!r}", where)
        if os.path.lexists(folder / f"{explicit}{PARTIAL_SUFFIX}"):
            raise ConfigError(
                f"an interrupted run {explicit!r} exists: continue it with curvprune run "
                f"--resume {folder / (explicit + PARTIAL_SUFFIX)} @ {where}"
            )
    if cache is not None:
        user_folder(cache, "the cache folder", "cache")
    known = check_data(cfg.data, model=cfg.model.name)
    if num_classes is None:
        num_classes = cfg.model.num_classes or known or cfg.data.num_classes
    if cfg.model.checkpoint is not None:
        existing_file(cfg.model.checkpoint, "model checkpoint", "model.checkpoint")
    model = build_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    layout = attach_structures(pipeline.mask, pipeline.select(model), model)
    return StaticCheck(model=model, layout=layout, num_classes=num_classes)
