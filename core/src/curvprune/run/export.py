"""``curvprune export`` and :func:`load_pruned`: a run's pruned model as standalone safetensors.

The export folder (``RUN_DIR/export`` by default) holds

* ``model.safetensors``: the pruned model's full state dict. For weight and unremoved channel
  masks this is the dense model with the pruned weights stored as exact zeros; for a run that
  removed channels physically (a run directory with ``structure.json``) it is the physically
  smaller model, rebuilt on loading by :func:`curvprune.apply_removal`;
* ``masks.safetensors``: uint8 keep-masks (1 = kept) of the pruned parameters, named like them;
* ``structure.json`` (structured removal only): the kept channel indices of every group;
* ``manifest.json``: how to rebuild the model (name, arguments), the kind (``masked`` or
  ``removed``), sparsity, and the SHA-256 of every file.

A run on an ``hf:`` model is exported as a Hugging Face folder instead (``save_pretrained``,
with its tokenizer and masks; :mod:`curvprune.run.export_hf`), which
``AutoModelForCausalLM.from_pretrained`` loads. Only tensors are stored (safetensors), so loading
never runs code. Before anything is written
the export is checked: the masks match the zeros of the weights, and a fresh model loaded from
the export folder reproduces the run model's outputs exactly. The folder is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvprune.errors import ConfigError
from curvprune.run.checkpoint_files import check_state_fits, read_safetensors
from curvprune.run.export_hf import export_huggingface
from curvprune.run.files import atomic_directory, read_result
from curvprune.run.latency import latency_record
from curvprune.run.models import build_model
from curvprune.run.onnx_export import export_onnx
from curvprune.structure.removal import apply_removal

__all__ = ["export_run", "load_pruned"]

_STRUCTURE = "structure.json"


def _read_tensors(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path, path.name)


def _read_structure(folder: Path) -> Any | None:
    path = folder / _STRUCTURE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{_STRUCTURE} is corrupt ({exc}) @ {path}") from None


def _apply_removal(model: nn.Module, structure: Any, where: Path) -> None:
    """Shrink ``model`` to the kept channels that ``structure.json`` records."""

    apply_removal(model, structure)  # takes structure.json's content as it is


def _check_masks(state: Mapping[str, Tensor], masks: Mapping[str, Tensor], where: Path) -> None:
    for name, mask in masks.items():
        weight = state.get(name)
        if weight is None or weight.shape != mask.shape:
            raise ConfigError(f"mask {name!r} does not match the model's weights @ {where}")
        if bool((weight[mask == 0] != 0).any()):
            raise ConfigError(f"weights of {name!r} are not zero where masked @ {where}")


def load_pruned(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a pruned model from a run directory or an export folder into ``model``.

    ``model`` is a freshly built instance of the run's architecture (e.g.
    ``curvprune.run.models.build_model(name, num_classes=...)``, or your own class). For a run that
    removed channels physically, ``model`` is first shrunk in place to the kept channels
    (``structure.json``), then loaded. The model's outputs then equal the pruned model's.

    Args:
        path: a run directory (``model.safetensors`` and ``result.json``) or an export folder.
        model: the fresh model, loaded in place (left untouched on any error).

    Returns:
        ``model``, in eval mode.

    Raises:
        ConfigError: missing or corrupt files, weights that do not fit ``model``, or weights that
            are not zero where masked.
    """
    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / "result.json").is_file():
        raise ConfigError(
            "a Hugging Face export folder: load it with transformers, "
            f"AutoModelForCausalLM.from_pretrained(folder) @ {folder}"
        )
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"not a run directory or export folder (no model.safetensors) @ {folder}")
    state = _read_tensors(folder / "model.safetensors")
    has_masks = (folder / "masks.safetensors").is_file()
    masks = _read_tensors(folder / "masks.safetensors") if has_masks else {}
    structure = _read_structure(folder)
    if structure is None:
        check_state_fits(model, state, folder)
        _check_masks(state, masks, folder)
    else:  # check on a shrunk copy first: the user's model stays whole on any error
        import copy

        trial = copy.deepcopy(model)
        _apply_removal(trial, structure, folder)
        check_state_fits(trial, state, folder)
        _apply_removal(model, structure, folder)
    model.load_state_dict(state)
    return model.eval()


def export_run(run_dir: str | Path, out: str | Path | None = None, *, onnx: bool = False) -> Path:
    """Export the run in ``run_dir``; return the export folder.

    ``onnx``: also write ``model.onnx``, checked against PyTorch's output with onnxruntime
    (:mod:`curvprune.run.onnx_export`; the ``onnx`` extra).

    Raises:
        ConfigError: not a run directory, missing or corrupt files, or a failed check.
    """
    from safetensors.torch import save

    run_dir = Path(run_dir)
    record = read_result(run_dir)
    state = _read_tensors(run_dir / "model.safetensors")
    masks = _read_tensors(run_dir / "masks.safetensors")
    structure = _read_structure(run_dir)
    spec = record["model"]

    def fresh() -> nn.Module:
        return build_model(spec["name"], num_classes=spec["num_classes"], **spec.get("kwargs", {}))

    final = Path(out) if out is not None else run_dir / "export"
    if spec["name"].startswith("hf:"):
        if onnx:
            raise ConfigError(
                "--onnx exports curvprune's own and torchvision models; export the Hugging Face "
                f"folder and convert it with Optimum (optimum-cli export onnx) @ {run_dir}"
            )
        if structure is not None:
            raise ConfigError(
                "a run that removed channels of an hf: model cannot be saved as a Hugging Face "
                f"folder (its config.json holds the full widths) @ {run_dir}"
            )
        model = load_pruned(run_dir, fresh())
        return export_huggingface(model, masks, record, _read_config(run_dir), final)
    model = load_pruned(run_dir, fresh())
    with atomic_directory(final, "export folder") as staging:
        files = {
            "model.safetensors": save({k: v.contiguous() for k, v in state.items()}),
            "masks.safetensors": save(masks),
        }
        if structure is not None:
            files[_STRUCTURE] = json.dumps(structure, indent=2).encode()
        for fname, blob in files.items():
            (staging / fname).write_bytes(blob)
        reloaded = load_pruned(staging, fresh())
        probe = _probe_input(model)
        if probe is not None:
            with torch.no_grad():
                if not torch.equal(model(probe), reloaded(probe)):
                    raise ConfigError(
                        f"the exported model does not reproduce the run's outputs @ {final}"
                    )
        latency = None
        if structure is not None and probe is not None:  # what the smaller model buys here
            latency = latency_record(fresh(), reloaded, probe)
        onnx_check = None
        if onnx:
            if probe is None:
                raise ConfigError(f"cannot infer an input for the ONNX export @ {run_dir}")
            onnx_check = export_onnx(reloaded, probe, staging)
        manifest = {
            "model": {k: spec[k] for k in ("name", "num_classes", "kwargs") if k in spec},
            "kind": "removed" if structure is not None else "masked",
            "latency": latency,
            "onnx": onnx_check,
            "sparsity": record["sparsity"],
            "files": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()},
            "load": "model = curvprune.run.models.build_model(name, num_classes=..., **kwargs); "
                    "curvprune.load_pruned(export_folder, model)",
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return final


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.toml`` (empty when it is missing)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = run_dir / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config.toml is corrupt ({exc}) @ {path}") from None


def _probe_input(model: nn.Module) -> Tensor | None:
    """A small input for the output check, inferred from the first layer."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return torch.randn(2, module.in_channels, 8, 8, generator=generator)
        if isinstance(module, nn.Linear):
            return torch.randn(2, module.in_features, generator=generator)
    return None
