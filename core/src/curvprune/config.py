"""Run configuration: TOML or JSON into frozen attrs classes, with one-line errors.

A config has fixed tables (``[model]``, ``[data]``, ``[prune]``, ``[train]``, ``[finetune]``,
``[run]``, ``[plugins]``) and one table per role (``[estimator]``, ``[scorer]``, ``[schedule]``,
``[mask]``) whose ``name`` picks a registered component; the rest of a role's table is structured
into that component's own config class. One private cattrs converter, strict about types and with
unknown keys forbidden, does the structuring; every problem becomes a line
``description @ path``, with the closest valid key or name where there is one, and all problems
of a file are reported together in one :class:`~curvprune.errors.ConfigError`.

One cohesive module (a little over 500 lines): the fixed tables' attrs classes, their validators
and the converter that structures them into those classes share one error-formatting path, so
the whole config contract reads in one place.
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from curvprune.errors import ConfigError, UnknownComponentError, closest
from curvprune.plugin.registry import KINDS, Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ComponentSpec",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PipelineConfig",
    "PluginsConfig",
    "PruneConfig",
    "RunSettings",
    "TrainConfig",
    "dump_config",
    "load_raw_config",
    "make_converter",
    "structure_component",
    "structure_config",
    "unstructure_config",
]


def _in_unit_interval(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value}")


def _open_unit_interval(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1), got {value}")


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _non_negative(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run directory, or None when it can.

    A run name is one folder name inside ``[run] out``: no separator, not ``.`` or ``..``, not
    hidden (a leading ``.`` is kept for curvprune's staging folders), no control characters,
    at most 200 bytes (``.partial`` and temporary suffixes must still fit a file name).
    """
    if not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with '.'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > 200:
        return "is longer than 200 bytes"
    return None


def shown(value: str, limit: int = 40) -> str:
    """``repr(value)``, cut to about ``limit`` characters, for one-line messages."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


def _run_name(_: Any, attribute: attrs.Attribute, value: str | None) -> None:
    problem = None if value is None else run_name_problem(value)
    if problem:
        raise ValueError(f"{attribute.name} must be a single folder name ({shown(value)} {problem})")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """``[model]``: what to prune.

    Attributes:
        name: ``digits-mlp``, ``digits-cnn``, ``torchvision:<model>`` or
            ``module:package.module:factory``.
        num_classes: classifier width (defaults to the data's number of classes).
        checkpoint: a state dict to load (``.safetensors`` or a weights-only torch file); without
            one the model is trained from scratch with ``[train]``.
        kwargs: extra keyword arguments for the model factory.
    """

    name: str = "digits-cnn"
    num_classes: int | None = None
    checkpoint: str | None = None
    kwargs: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class DataConfig:
    """``[data]``: where samples come from (never downloaded unless ``download = true``).

    Attributes:
        name: ``digits`` (scikit-learn's bundled digits, offline), ``fake`` (torchvision
            FakeData), ``torchvision:<Dataset>`` (e.g. ``torchvision:CIFAR10``),
            ``imagefolder`` (train/ and val/ folders under ``root``) or ``text`` (token
            sequences of the ``.txt`` text at ``path``, for an ``hf:`` causal language model).
        root: the dataset folder, for torchvision datasets and image folders.
        path: ``text``: a ``.txt`` file or a folder of them.
        tokenizer: ``text``: the folder of a Hugging Face tokenizer; None: the ``hf:`` model's.
        seq_len: ``text``: tokens per sequence.
        holdout: ``text``: fraction of the token stream (its end) held out for evaluation.
        download: let torchvision download a missing dataset.
        batch_size: training and gradient batch size.
        eval_batch_size: evaluation batch size.
        num_workers: DataLoader workers.
        image_size: side of the images for ``fake`` and ``imagefolder``.
        num_samples: number of training samples for ``fake`` (evaluation gets a quarter); at
            most this many calibration sequences for ``text``.
        num_classes: number of classes for ``fake``.
    """

    name: str = "digits"
    root: str | None = None
    download: bool = False
    batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    eval_batch_size: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    num_workers: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    image_size: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    num_samples: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    num_classes: int = attrs.field(default=10, validator=attrs.validators.ge(2))
    path: str | None = None
    tokenizer: str | None = None
    seq_len: int = attrs.field(default=128, validator=attrs.validators.ge(2))
    holdout: float = attrs.field(default=0.1, converter=float, validator=_open_unit_interval)


@attrs.frozen(kw_only=True)
class PruneConfig:
    """``[prune]``: how much and which weights.

    Attributes:
        sparsity: target fraction of removed weights (or channels, for structured masks), [0, 1).
        targets: selectors of parameters to prune: module types (``"Conv2d"``), ``"re:<regex>"``
            on parameter names, or exact module/parameter names.
        ignore: selectors removed from ``targets`` (e.g. the classifier, ``"fc"``).
        loss_samples: samples on which each step's actual loss change is measured (0: off).
        audit_single: weights sampled per pruning step for the single-weight loss-change audit
            (predicted against measured change of removing each alone; 0: off). Needs a scorer
            that predicts a loss change and ``loss_samples`` > 0.
        gradient_chunk: samples per vectorised per-sample-gradient chunk; None sizes chunks to
            keep their gradients under ~256 MiB.
        gradient_micro_batch: with an estimator's ``fisher_mini_batch`` > 1, samples of each
            gradient's mini-batch run through the model at a time (the gradient is the
            size-weighted mean of its micro-batches'); None: the whole mini-batch. Bounds the
            activations of a chunk (BERT-base, 32 sequences of 128 tokens: 2.3 GiB at once).
        shard: under torch.distributed, ``"auto"`` splits the estimator's state over the ranks
            by weights when the estimator can be sharded (each rank holds 1/N of it, see
            docs/distributed.md); ``"off"`` keeps the whole state on every rank.
    """

    sparsity: float = attrs.field(default=0.5, converter=float, validator=_in_unit_interval)
    targets: tuple[str, ...] = ("Conv2d", "Linear", "Conv1D")
    ignore: tuple[str, ...] = ()
    loss_samples: int = attrs.field(default=256, validator=attrs.validators.ge(0))
    audit_single: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    gradient_chunk: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    gradient_micro_batch: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    shard: Literal["auto", "off"] = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "off"))
    )


@attrs.frozen(kw_only=True)
class TrainConfig:
    """``[train]`` (dense training) and ``[finetune]`` (after or during pruning).

    Attributes:
        epochs: passes over the training data (0: skip).
        optimizer: ``sgd`` (with momentum) or ``adam``.
        lr: initial learning rate (cosine-annealed to 0 over the epochs).
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
    """

    epochs: int = attrs.field(default=20, validator=attrs.validators.ge(0))
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = attrs.field(default=0.05, converter=float, validator=_positive)
    momentum: float = attrs.field(default=0.9, converter=float, validator=_non_negative)
    weight_decay: float = attrs.field(default=1e-4, converter=float, validator=_non_negative)


@attrs.frozen(kw_only=True)
class FinetuneConfig(TrainConfig):
    """``[finetune]``: training with masks held, after one-shot pruning or during gradual."""

    epochs: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    lr: float = attrs.field(default=0.01, converter=float, validator=_positive)


@attrs.frozen(kw_only=True)
class RunSettings:
    """``[run]``: where and how.

    Attributes:
        seed: seeds torch, the data split of sampled labels and the data order.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        out: folder under which run directories are created.
        name: run directory name (default: a timestamp and the methods' names).
        memory_limit_gb: refuse runs the plan says need more (default: the device's memory).
        progress: show progress bars on a terminal.
        checkpoint_every: save a checkpoint every this many optimizer steps of a training loop
            that prunes or holds masks (``<out>/<name>.partial/checkpoint.pt``, for
            ``curvprune run --resume``); 0: no checkpoints.
    """

    seed: int = 0
    device: str = "auto"
    out: str = "runs"
    name: str | None = attrs.field(default=None, validator=_run_name)
    memory_limit_gb: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    progress: bool = True
    checkpoint_every: int = attrs.field(default=0, validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class PluginsConfig:
    """``[plugins]``: ``disable`` lists plugin names to block for this run."""

    disable: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class ComponentSpec:
    """A role's table: the component ``name`` and its structured ``config`` (None: no options)."""

    name: str
    config: Any = None


@attrs.frozen(kw_only=True)
class PipelineConfig:
    """A whole, validated configuration."""

    prune: PruneConfig = attrs.field(factory=PruneConfig)
    estimator: ComponentSpec | None = None
    scorer: ComponentSpec = attrs.field(factory=lambda: ComponentSpec(name="magnitude"))
    schedule: ComponentSpec = attrs.field(factory=lambda: ComponentSpec(name="oneshot"))
    mask: ComponentSpec = attrs.field(factory=lambda: ComponentSpec(name="global"))
    model: ModelConfig = attrs.field(factory=ModelConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    finetune: FinetuneConfig = attrs.field(factory=FinetuneConfig)
    run: RunSettings = attrs.field(factory=RunSettings)
    plugins: PluginsConfig = attrs.field(factory=PluginsConfig)


_FIXED: dict[str, type] = {
    "prune": PruneConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
    "run": RunSettings,
    "plugins": PluginsConfig,
}
_ROLES = ("estimator", "scorer", "schedule", "mask")
_DEFAULT_NAMES = {"scorer": "magnitude", "schedule": "oneshot", "mask": "global"}


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
def load_raw_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a TOML, JSON or (if PyYAML is installed) YAML file, or copy a mapping.

    Raises:
        ConfigError: missing file, not UTF-8, or a syntax error (with line and column).
    """
    if isinstance(source, Mapping):
        return _plain(source)
    path = Path(source)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found @ {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file @ {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file is not UTF-8 (byte {exc.start}: {exc.reason}) @ {path}"
        ) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            raw = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise ConfigError(f"YAML configs need PyYAML (pip install pyyaml) @ {path}") from None
            raw = yaml.safe_load(text)
        else:
            raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc} @ {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"JSON syntax error: {exc} @ {path}") from None
    except ConfigError:
        raise
    except Exception as exc:  # YAML errors have no common importable base without PyYAML
        raise ConfigError(f"syntax error: {exc} @ {path}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a table of tables, got {type(raw).__name__} @ {path}")
    return raw


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------
def _strict_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _is_literal(typ: Any) -> bool:
    return typing.get_origin(typ) is Literal


def _structure_literal(value: Any, typ: Any) -> Any:
    choices = typing.get_args(typ)
    if value in choices and type(value) is type(choices[choices.index(value)]):
        return value
    shown = ", ".join(repr(c) for c in choices)
    hint = closest(value, [str(c) for c in choices]) if isinstance(value, str) else None
    more = f"; did you mean {hint!r}?" if hint else ""
    raise ValueError(f"must be one of {shown}, got {value!r}{more}")


def _is_sequence(typ: Any) -> bool:
    return typing.get_origin(typ) in (tuple, list)


def _sequence_hook(conv: cattrs.Converter) -> Any:
    """Lists of values: a bare string is refused (it would split into characters)."""

    def structure(value: Any, typ: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        args = typing.get_args(typ)
        item = args[0] if args else Any
        items = []
        for i, element in enumerate(value):
            try:
                items.append(conv.structure(element, item) if item is not Any else element)
            except Exception as exc:
                raise TypeError(f"item {i}: {exc}") from None
        return tuple(items) if typing.get_origin(typ) is tuple else items

    return structure


def make_converter() -> cattrs.Converter:
    """The private converter: strict scalars, forbidden extra keys, detailed validation."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook_func(_is_literal, _structure_literal)
    conv.register_structure_hook_func(_is_sequence, _sequence_hook(conv))
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], lambda v, _: _plain_dict(v))
    conv.register_unstructure_hook(tuple, list)
    return conv


def _plain_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a table, got {value!r}")
    return dict(value)


_CONVERTER = make_converter()


# --------------------------------------------------------------------------------------------
# Errors: cattrs exception trees to "description @ path" lines
# --------------------------------------------------------------------------------------------
def _error_lines(exc: BaseException, path: str, cls: type | None) -> list[str]:
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        lines = []
        for key in sorted(exc.extra_fields):
            hint = closest(key, valid)
            more = f" (did you mean {hint!r}?)" if hint else (
                f" (valid keys: {', '.join(valid)})" if valid else " (this table takes no keys)"
            )
            lines.append(f"unknown key {key!r}{more} @ {path}")
        return lines
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        lines = []
        for sub in exc.exceptions:
            sub_path = path
            sub_cls = None
            for note in getattr(sub, "__notes__", []):
                name = getattr(note, "name", None)
                index = getattr(note, "index", None)
                if name is not None:
                    sub_path = f"{path}.{name}"
                    sub_cls = getattr(note, "type", None)
                elif index is not None:
                    sub_path = f"{path}[{index}]"
            lines.extend(_error_lines(sub, sub_path, sub_cls))
        return lines
    if isinstance(exc, KeyError):
        return [f"required key missing @ {path}"]
    if isinstance(exc, ValueError) and len(exc.args) >= 2 and isinstance(exc.args[1], attrs.Attribute):
        # attrs' own validators: (message, attribute, bound, value)
        return [f"{exc.args[0]} @ {path}.{exc.args[1].name}"]
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ValueError) and " must " in message:
        field = message.split(" must ", 1)[0].strip("'")
        if cls is None and field.isidentifier() and not path.endswith(f".{field}"):
            return [f"{message} @ {path}.{field}"]
    return [f"{message} @ {path}"]


def _structure(raw: Any, cls: type, path: str, errors: list[str]) -> Any:
    if not isinstance(raw, Mapping):
        errors.append(f"expected a table, got {raw!r} @ {path}")
        return None
    try:
        return _CONVERTER.structure(dict(raw), cls)
    except Exception as exc:
        errors.extend(_error_lines(exc, path, None))
        return None


def structure_component(
    registry: Registry, kind: str, raw: Mapping[str, Any], path: str | None = None
) -> ComponentSpec:
    """Structure one role's table (``name`` plus the component's options).

    Raises:
        ConfigError: unknown name (with the closest installed one) or invalid options.
    """
    errors: list[str] = []
    spec = _structure_component(registry, kind, raw, path or kind, errors)
    if errors:
        raise ConfigError(errors)
    assert spec is not None
    return spec


def _structure_component(
    registry: Registry, kind: str, raw: Any, path: str, errors: list[str]
) -> ComponentSpec | None:
    if not isinstance(raw, Mapping):
        errors.append(f"expected a table with a 'name' key, got {raw!r} @ {path}")
        return None
    options = dict(raw)
    name = options.pop("name", None)
    if name is None:
        errors.append(
            f"missing 'name' (installed: {', '.join(registry.names(kind)) or 'none'}) @ {path}"
        )
        return None
    if not isinstance(name, str):
        errors.append(f"name must be a string, got {name!r} @ {path}.name")
        return None
    try:
        component = registry.get(kind, name)
    except UnknownComponentError as exc:
        errors.append(f"{exc} @ {path}.name")
        return None
    if component.config is None:
        if options:
            errors.append(
                f"{KINDS[kind].title} {name!r} takes no options, got "
                f"{', '.join(sorted(options))} @ {path}"
            )
            return None
        return ComponentSpec(name=name)
    config = _structure(options, component.config, path, errors)
    return None if config is None else ComponentSpec(name=name, config=config)


def structure_config(raw: Mapping[str, Any], registry: Registry) -> PipelineConfig:
    """Structure a raw config (from :func:`load_raw_config`) against the installed components.

    Raises:
        ConfigError: with every problem found, one line each.
    """
    errors: list[str] = []
    known = (*_FIXED, *_ROLES)
    for key, value in raw.items():
        if key not in known:
            hint = closest(key, known)
            more = f" (did you mean [{hint}]?)" if hint else f" (tables: {', '.join(known)})"
            errors.append(f"unknown table [{key}]{more} @ {key}")
        elif not isinstance(value, Mapping):
            errors.append(f"[{key}] must be a table, got {value!r} @ {key}")
    parts: dict[str, Any] = {}
    for key, cls in _FIXED.items():
        if isinstance(raw.get(key), Mapping):
            parts[key] = _structure(raw[key], cls, key, errors)
    for role in _ROLES:
        table = raw.get(role)
        if table is None and role in _DEFAULT_NAMES:
            table = {"name": _DEFAULT_NAMES[role]}
        if isinstance(table, Mapping):
            parts[role] = _structure_component(registry, role, table, role, errors)
    if errors:
        raise ConfigError(errors)
    return PipelineConfig(**{k: v for k, v in parts.items() if v is not None})


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def unstructure_config(config: PipelineConfig) -> dict[str, Any]:
    """A plain dict that :func:`structure_config` turns back into ``config``.

    TOML has no null, so fields set to None are left out (they fall back to their defaults).
    """
    out: dict[str, Any] = {}
    for field in attrs.fields(PipelineConfig):
        value = getattr(config, field.name)
        if isinstance(value, ComponentSpec):
            table = {"name": value.name}
            if value.config is not None:
                table.update(_CONVERTER.unstructure(value.config))
            out[field.name] = table
        elif value is not None:
            out[field.name] = _CONVERTER.unstructure(value)
    return _drop_none(out)


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as TOML text."""
    import tomli_w

    return tomli_w.dumps(unstructure_config(config))
