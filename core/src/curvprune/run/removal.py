"""Physical channel removal inside ``curvprune run`` (``channel`` mask with ``remove = true``).

The run prunes with masks as usual, then, before fine-tuning, removes the pruned structures
(:meth:`curvprune.Pipeline.remove`); fine-tuning builds its optimizer on the smaller model. The
run records ``structure`` in ``result.json`` (parameters and FLOPs before and after, kept
channels per group, the fraction removed per layer, and the largest output difference between
the masked and the removed model on one batch, which should be round-off, and the measured
inference latency of both at batch 1 and 32 with the speed-up, :mod:`curvprune.run.latency`), and writes
``structure.json`` (the kept channel indices, what :func:`curvprune.apply_removal` needs to
rebuild the smaller architecture for loading ``model.safetensors``) and ``layer_ratios.png``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvprune.pipeline.pipeline import Pipeline
from curvprune.roles.reports import PruneResult
from curvprune.run.latency import latency_record
from curvprune.run.render import plot_layer_ratios
from curvprune.structure.norms import kept_statistics
from curvprune.structure.removal import _SCHEMA, RemovalResult

__all__ = ["STRUCTURE_FILE", "STRUCTURE_SCHEMA", "removal_requested", "remove_for_run",
           "write_structure_files"]

STRUCTURE_FILE = "structure.json"
STRUCTURE_SCHEMA = _SCHEMA


def removal_requested(pipeline: Pipeline) -> bool:
    """Whether the mask applier asks for physical removal."""
    mask = pipeline.mask
    return mask.granularity == "channel" and bool(getattr(mask.config, "remove", False))


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        out = model(x)
        return getattr(out, "logits", out).detach().double()  # a transformers model's output
    finally:
        model.train(was_training)


def remove_for_run(
    pipeline: Pipeline, model: nn.Module, result: PruneResult, example_input: Tensor
) -> tuple[RemovalResult, dict[str, Any]]:
    """Remove the pruned structures of ``model`` in place; return the removal and its record.

    The record is the ``structure`` entry of ``result.json``. Where LayerNorms read removed
    channels, their statistics change with the removal (:mod:`curvprune.structure.norms`): the
    reference of ``max_output_difference`` is then the masked model with those statistics over
    the kept channels, ``renormalised`` names the LayerNorms and ``masked_output_difference``
    is the difference to the plain masked model.
    """
    layout = result.masks.layout
    renorms: list[str] = []
    reference: Any = contextlib.nullcontext()
    if layout.structures is not None:
        keep = layout.alive_structures(result.masks.flat.to(layout.structure_index().device))
        renorms = sorted({n for g in layout.structures.groups for n in g.renorms})
        if renorms:
            reference = kept_statistics(model, layout.structures, keep)
    with reference:
        before = _outputs(model, example_input)
    plain = _outputs(model, example_input) if renorms else before
    dense = copy.deepcopy(model)  # full width (zeros cost as much as any weight): the dense speed
    removal = pipeline.remove(model, result.masks, example_input=example_input)
    after = _outputs(model, example_input)
    record = removal.to_json()
    record["max_output_difference"] = float((after - before).abs().max()) if before.numel() else 0.0
    if renorms:
        record["renormalised"] = renorms
        record["masked_output_difference"] = float((after - plain).abs().max())
    record["latency"] = latency_record(dense, model, example_input)
    return removal, record


def write_structure_files(folder: Path, record: dict[str, Any], removal: RemovalResult) -> None:
    """Write ``structure.json`` and ``layer_ratios.png`` into a run's staging folder.

    ``record`` is the run's ``result.json`` content (with its ``structure`` entry).
    """

    content = {"schema": STRUCTURE_SCHEMA, "kept_indices": removal.kept_indices}
    (folder / STRUCTURE_FILE).write_text(json.dumps(content, indent=2))
    plot_layer_ratios(record, folder / "layer_ratios.png")
