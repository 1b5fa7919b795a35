"""Models by name: the built-in digits models, torchvision models and users' own factories.

* ``digits-mlp``: 64 → 128 → 64 → 10, ReLU (8×8 digit images, flattened).
* ``digits-cnn``: two 3×3 conv layers with BatchNorm, max-pooling and a two-layer classifier.
* ``torchvision:<name>``: any ``torchvision.models`` builder, always with ``weights=None``
  (nothing is downloaded); ``num_classes`` sets the classifier width.
* ``module:package.module:factory``: ``factory(**kwargs)`` from an importable module (with
  ``num_classes`` passed when given).
* ``hf:<folder>``: a Hugging Face transformers model saved in a local folder (``config.json``
  and its weights, e.g. by ``save_pretrained``), loaded with ``local_files_only`` (nothing is
  downloaded): the class named in its ``config.json`` (``architectures``, what
  ``save_pretrained`` wrote), else ``AutoModelForCausalLM``, else ``AutoModel``; the folder's
  config decides the heads (``num_classes`` is not passed); ``kwargs`` go to
  ``from_pretrained``. Needs the ``hf`` extra (transformers).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvprune.errors import ConfigError, closest

__all__ = ["BUILTIN_MODELS", "DigitsCNN", "DigitsMLP", "build_model"]


class DigitsMLP(nn.Sequential):
    """A small MLP for the 8×8 digits: Flatten, 64→128→64→``num_classes``."""

    def __init__(self, num_classes: int = 10, hidden: tuple[int, int] = (128, 64)) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(64, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], num_classes),
        )


class DigitsCNN(nn.Sequential):
    """A small CNN for 1×8×8 digits: conv-BN-ReLU ×2, max-pool, 512→64→``num_classes``."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits-mlp": DigitsMLP,
    "digits-cnn": DigitsCNN,
}


def build_model(name: str, *, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name (see the module docstring for the forms).

    Raises:
        ConfigError: unknown name (with the closest built-in or torchvision name), a factory
            that cannot be imported, or one that fails on the given arguments.
    """
    if num_classes is not None:
        kwargs = {"num_classes": num_classes, **kwargs}
    if name in BUILTIN_MODELS:
        return _call(BUILTIN_MODELS[name], kwargs, name)
    if name.startswith("torchvision:"):
        import torchvision.models as tvm

        arch = name.split(":", 1)[1]
        available = tvm.list_models()
        if arch not in available:
            hint = closest(arch, available)
            more = f"; did you mean 'torchvision:{hint}'?" if hint else ""
            raise ConfigError(f"torchvision has no model {arch!r}{more} @ model.name")
        return _call(lambda **kw: tvm.get_model(arch, weights=None, **kw), kwargs, name)
    if name.startswith("module:"):
        target = name.split(":", 1)[1]
        modname, _, attr = target.partition(":")
        if not modname or not attr:
            raise ConfigError(f"expected 'module:package.module:factory', got {name!r} @ model.name")
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            raise ConfigError(f"cannot import {modname!r}: {exc} @ model.name") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ConfigError(f"{modname!r} has no callable {attr!r} @ model.name")
        return _call(factory, kwargs, name)
    if name.startswith("hf:"):
        return _huggingface(name.split(":", 1)[1], kwargs)
    choices = [*BUILTIN_MODELS, "torchvision:<name>", "module:<pkg.mod>:<factory>", "hf:<folder>"]
    hint = closest(name, list(BUILTIN_MODELS))
    more = f"; did you mean {hint!r}?" if hint else ""
    raise ConfigError(f"unknown model {name!r} (choose {', '.join(choices)}){more} @ model.name")


def _huggingface(folder_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A transformers model from a local folder, never downloaded."""
    folder = Path(folder_name).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"no model folder {folder_name!r}: hf: takes a local folder holding config.json and "
            "the weights (nothing is downloaded) @ model.name"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder_name!r} is not a Hugging Face model folder (no config.json) @ model.name"
        )
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "hf: models need transformers: pip install 'curvprune-core[hf]' @ model.name"
        ) from None
    kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}  # the config has the heads
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        # the class that saved the folder (config.architectures), else a causal LM, else the
        # bare model: what was saved is what is pruned
        saved = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        candidates = [saved] if isinstance(saved, type) else [
            transformers.AutoModelForCausalLM, transformers.AutoModel]
        failure: Exception | None = None
        for cls in candidates:
            try:
                return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
            except ValueError as exc:  # this Auto class does not cover the config: the next
                failure = exc
        raise failure or ValueError("no model class")
    except (OSError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise ConfigError(
            f"cannot load the model in {folder_name!r} ({reason}) @ model.name"
        ) from None


def _call(factory: Callable[..., Any], kwargs: dict[str, Any], name: str) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} rejected its arguments: {exc} @ model") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} factory returned {type(model).__name__} @ model.name")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
