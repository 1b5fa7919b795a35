"""Export of a run on an ``hf:`` model as a Hugging Face folder.

:func:`curvprune.run.export.export_run` calls :func:`export_huggingface` for a run whose
``[model] name`` is ``hf:<folder>``. The export folder is what ``save_pretrained`` writes
(``config.json``, ``model.safetensors``, ``generation_config.json``; safetensors only, so loading
never runs code), with

* the tokenizer's files, when the run's tokenizer folder has a tokenizer (``[data] tokenizer``,
  else the model's folder): ``AutoTokenizer.from_pretrained(out)`` loads it;
* ``masks.safetensors``: uint8 keep-masks (1 = kept) of the pruned parameters, named like the
  run's parameters (to hold the zeros through further training);
* ``manifest.json``: kind ``huggingface``, the sparsity and the SHA-256 of every file.

``AutoModelForCausalLM.from_pretrained(out)`` (or the class the config names) loads the pruned
model: pruned weights are exact zeros, tied weights (GPT-2's ``lm_head`` and ``wte``) stay tied.
Before anything is moved into place the export is reloaded and checked: every tensor of the
reloaded model equals the run model's, the masked weights are zero, ties hold, and the logits on
a probe sequence are equal.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvprune.errors import ConfigError
from curvprune.run.files import atomic_directory
from curvprune.run.text import TOKENIZER_FILES

__all__ = ["export_huggingface", "tokenizer_source"]


def tokenizer_source(model_name: str, config: Mapping[str, Any]) -> Path | None:
    """The folder whose tokenizer goes with the export, None when it holds no tokenizer files.

    The run's ``[data] tokenizer``, else the ``hf:`` model's folder.
    """
    data = config.get("data", {})
    given = data.get("tokenizer") if isinstance(data, Mapping) else None
    folder = Path(given or model_name.split(":", 1)[1]).expanduser()
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    return None


def _save_model(model: nn.Module, folder: Path) -> None:
    save = model.save_pretrained  # type: ignore[operator]
    # transformers 4 takes safe_serialization (True by default since 4.35); 5 always saves it
    options = {"safe_serialization": True} if "safe_serialization" in inspect.signature(
        save).parameters else {}
    save(str(folder), **options)
    if not any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        raise ConfigError(f"save_pretrained did not write safetensors only @ {folder}")


def _tied(model: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    inp, out = get_in(), get_out()
    return inp is not None and out is not None and out.weight is inp.weight


def _probe(model: nn.Module) -> Tensor:
    config = model.config  # type: ignore[attr-defined]
    vocab = int(getattr(config, "vocab_size", 2))
    positions = int(getattr(config, "n_positions", None)
                    or getattr(config, "max_position_embeddings", None) or 16)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, min(16, positions)), generator=generator)


def _check_reloaded(
    model: nn.Module, reloaded: nn.Module, masks: Mapping[str, Tensor], where: Path
) -> None:
    ours, theirs = model.state_dict(), reloaded.state_dict()
    for name, value in ours.items():
        other = theirs.get(name)
        if other is None or other.shape != value.shape or not torch.equal(other.cpu(), value.cpu()):
            raise ConfigError(f"the exported {name!r} differs from the run's @ {where}")
    for name, mask in masks.items():
        if bool((theirs[name].cpu()[mask == 0] != 0).any()):
            raise ConfigError(f"exported weights of {name!r} are not zero where masked @ {where}")
    if _tied(model) and not _tied(reloaded):
        raise ConfigError(f"the exported model lost its tied embeddings @ {where}")
    probe = _probe(model)
    with torch.no_grad():
        ours_out, theirs_out = model(probe), reloaded(probe)
    logits = getattr(ours_out, "logits", ours_out)
    other_logits = getattr(theirs_out, "logits", theirs_out)
    if isinstance(logits, Tensor) and not torch.equal(logits, other_logits):
        raise ConfigError(f"the exported model does not reproduce the run's outputs @ {where}")


def export_huggingface(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    record: Mapping[str, Any],
    config: Mapping[str, Any],
    final: Path,
) -> Path:
    """Write ``model`` (the pruned run model, on the CPU) as a Hugging Face folder at ``final``.

    Args:
        model: the run's pruned transformers model, loaded from the run directory.
        masks: its keep-masks (``masks.safetensors`` of the run).
        record: the run's ``result.json`` content.
        config: the run's resolved config (``config.toml``), for the tokenizer's folder.
        final: the export folder (must not exist).

    Raises:
        ConfigError: a model without ``save_pretrained``, or a failed check (nothing written).
    """
    from safetensors.torch import save

    if not callable(getattr(model, "save_pretrained", None)):
        raise ConfigError(f"{type(model).__name__} has no save_pretrained @ model.name")
    name = record["model"]["name"]
    tokenizer = tokenizer_source(name, config)
    model = model.cpu().eval()
    with atomic_directory(final, "export folder") as staging:
        _save_model(model, staging)
        if tokenizer is not None:
            import transformers

            transformers.AutoTokenizer.from_pretrained(
                str(tokenizer), local_files_only=True).save_pretrained(str(staging))
        (staging / "masks.safetensors").write_bytes(
            save({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}))
        reloaded = type(model).from_pretrained(str(staging), local_files_only=True).eval()
        _check_reloaded(model, reloaded, masks, final)
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        manifest = {
            "model": {"name": name, "class": type(model).__name__},
            "kind": "huggingface",
            "sparsity": record["sparsity"],
            "tokenizer": str(tokenizer) if tokenizer is not None else None,
            "files": {f: hashlib.sha256((staging / f).read_bytes()).hexdigest() for f in files},
            "load": "transformers.AutoModelForCausalLM.from_pretrained(export_folder) (or the "
                    "class config.json names); AutoTokenizer.from_pretrained(export_folder)",
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return final
