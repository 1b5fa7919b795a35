"""``curvprune export``: a run's pruned model and masks as standalone safetensors files.

The export folder (``RUN_DIR/export`` by default) holds ``model.safetensors`` (the full state dict,
pruned weights stored as zeros), ``masks.safetensors`` (uint8 keep-masks of the pruned
parameters) and ``manifest.json`` (how to rebuild the model, sparsity, SHA-256 of each file).
Before writing, the export is checked: the masks match the zeros of the weights, and a fresh model
loaded from the export reproduces the run model's outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from curvprune.errors import ConfigError
from curvprune.models import build_model
from curvprune.runs import atomic_directory, read_result

__all__ = ["export_run"]


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Export the run in ``run_dir``; return the export folder.

    Raises:
        ConfigError: not a run directory, missing or corrupt files, or a failed check.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    run_dir = Path(run_dir)
    record = read_result(run_dir)
    try:
        state = load_file(str(run_dir / "model.safetensors"))
        masks = load_file(str(run_dir / "masks.safetensors"))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise ConfigError(f"cannot read the run's safetensors files ({exc}) @ {run_dir}") from None
    for name, mask in masks.items():
        weight = state.get(name)
        if weight is None or weight.shape != mask.shape:
            raise ConfigError(f"mask {name!r} does not match the model's weights @ {run_dir}")
        if bool((weight[mask == 0] != 0).any()):
            raise ConfigError(f"weights of {name!r} are not zero where masked @ {run_dir}")
    spec = record["model"]
    model = build_model(spec["name"], num_classes=spec["num_classes"], **spec.get("kwargs", {}))
    model.load_state_dict(state)
    model.eval()
    final = Path(out) if out is not None else run_dir / "export"
    with atomic_directory(final) as staging:
        files = {
            "model.safetensors": save({k: v.contiguous() for k, v in state.items()}),
            "masks.safetensors": save(masks),
        }
        for fname, blob in files.items():
            (staging / fname).write_bytes(blob)
        fresh = build_model(spec["name"], num_classes=spec["num_classes"], **spec.get("kwargs", {}))
        fresh.load_state_dict(load_file(str(staging / "model.safetensors")))
        fresh.eval()
        probe = _probe_input(model)
        if probe is not None:
            with torch.no_grad():
                if not torch.equal(model(probe), fresh(probe)):
                    raise ConfigError(f"the exported model does not reproduce the run's outputs @ {final}")
        manifest = {
            "model": {k: spec[k] for k in ("name", "num_classes", "kwargs") if k in spec},
            "sparsity": record["sparsity"],
            "files": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()},
            "load": "model = curvprune.models.build_model(name, num_classes=..., **kwargs); "
                    "model.load_state_dict(safetensors.torch.load_file('model.safetensors'))",
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return final


def _probe_input(model: torch.nn.Module) -> torch.Tensor | None:
    """A small input for the output check, inferred from the first layer."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return torch.randn(2, module.in_channels, 8, 8, generator=generator)
        if isinstance(module, torch.nn.Linear):
            return torch.randn(2, module.in_features, generator=generator)
    return None
