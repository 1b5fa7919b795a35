"""Sequential calibration: one pruning step run stage by stage, each stage calibrated on the
outputs of the stages already pruned (OBC §6 and SparseGPT §4, "sequential" mode).

Layer-wise methods (SparseGPT, OBC, WANDA) prune a layer from the inputs it receives. In the
papers' sequential mode a layer's calibration inputs come through the layers before it *after*
those were pruned, so each layer compensates the errors already made upstream. A step then runs
stage by stage (:class:`Stage`), every role seeing one stage as if it were the whole model:
``PruneContext.model`` runs the stage and ``PruneContext.batches`` yields the stage's inputs.

Two ways to feed a stage, chosen per stage by :func:`plan_stages`:

* **cached block inputs** (transformer blocks, the reference's driver): the model's repeated
  blocks (the ``nn.ModuleList`` holding most selected weights, e.g. GPT-2's ``transformer.h``,
  Llama's ``model.layers``, BERT's ``encoder.layer``) are pruned one after another. The inputs
  of the first block are captured once (a pre-hook records the positional and keyword arguments
  of every calibration batch and stops the forward); each block is calibrated on the cached
  hidden states, pruned, then run once more to turn them into the next block's inputs. Only one
  block's inputs are held: ``samples × tokens × width`` values.
* **prefix forward** (any other layer, and every layer with ``stages = "layer"``): the whole
  model runs on the calibration batches and stops right after the stage's layer (a forward hook
  raises), so the layer sees the outputs of the already-pruned layers before it. No activation
  is stored; the cost is one forward of the prefix per stage.

The stage's model mirrors the module paths of the real model (a stage over ``transformer.h.3``
is a module whose ``named_modules()`` holds ``transformer.h.3.attn.c_attn``, the very
module), so components resolve parameter names exactly as on the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from curvprune.errors import CheckpointError, ConfigError
from curvprune.roles.reports import StepReport
from curvprune.tensors import distributed
from curvprune.tensors.layout import ParamLayout

__all__ = ["OneShotProgress", "SequentialCalibration", "Stage", "StagePlan", "plan_stages"]

StageUnit = Literal["block", "layer"]


@attrs.define(kw_only=True)
class OneShotProgress:
    """Where a one-shot prune with sequential calibration stands after a stage (to resume).

    ``Pipeline.prune(..., on_stage=f)`` calls ``f`` with it after every stage;
    ``Pipeline.prune(..., resume=progress)`` continues from it, on a model holding the weights
    of that moment: the next stage's inputs are recomputed through the stages already pruned,
    so the masks end identical to an uninterrupted run.

    Attributes:
        levels: the sparsity of each step of the prune.
        level_index: the step in progress.
        stages_done: stages of that step already pruned.
        masks: the flat keep-mask after them.
        reports: the reports of the steps completed before.
        loss_before: the step's audit loss before its first stage.
        times: the step's seconds so far, per phase.
        rng: torch's CPU generator state at that moment (None: not recorded); a resumed prune
            restores it right before the next step, after its own set-up (the audit samples,
            the plan) has drawn from it, so shuffled data are drawn as in an uninterrupted run.
        data_rng: the state of the data's own generator (a DataLoader's ``generator``), which
            a shuffled loader advances once per pass; restored likewise (None: it has none).
    """

    levels: list[float]
    level_index: int
    stages_done: int
    masks: Tensor
    reports: list[StepReport] = attrs.field(factory=list)
    loss_before: float | None = None
    times: dict[str, float] = attrs.field(factory=dict)
    rng: Tensor | None = None
    data_rng: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (for ``torch.save(..., weights_only)`` files)."""
        return {
            "levels": [float(x) for x in self.levels],
            "level_index": int(self.level_index),
            "stages_done": int(self.stages_done),
            "masks": self.masks.detach().cpu().clone(),
            "reports": [r.to_dict() for r in self.reports],
            "loss_before": self.loss_before,
            "times": {k: float(v) for k, v in self.times.items()},
            "rng": None if self.rng is None else self.rng.clone(),
            "data_rng": None if self.data_rng is None else self.data_rng.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], where: str = "checkpoint") -> OneShotProgress:
        """The inverse of :meth:`state_dict`."""
        try:
            return cls(
                levels=[float(x) for x in state["levels"]],
                level_index=int(state["level_index"]),
                stages_done=int(state["stages_done"]),
                masks=state["masks"].to(torch.bool),
                reports=[StepReport.from_dict(r) for r in state["reports"]],
                loss_before=state["loss_before"],
                times=dict(state["times"]),
                rng=state.get("rng"),
                data_rng=state.get("data_rng"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise CheckpointError(
                f"the one-shot progress is unreadable ({reason}) @ {where}"
            ) from None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the stage's part of it has run."""


@attrs.frozen
class Stage:
    """One stage of a sequential step.

    Attributes:
        label: what the progress bar and the report show (``transformer.h.3``, ``fc1``).
        indices: positions in the run's layout of the parameters pruned in this stage.
        modules: module paths of the layers owning them.
        block: index of the block in :attr:`StagePlan.blocks` (cached block inputs), or None
            (prefix forward).
    """

    label: str
    indices: tuple[int, ...]
    modules: tuple[str, ...]
    block: int | None = None


@attrs.frozen
class StagePlan:
    """The stages of a sequential step, in execution order.

    Attributes:
        stages: the stages.
        blocks: module path of the repeated blocks (``transformer.h``), or None.
        n_blocks: how many blocks that list has (every block is run, pruned or not).
    """

    stages: tuple[Stage, ...]
    blocks: str | None = None
    n_blocks: int = 0


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _block_list(model: nn.Module, layout: ParamLayout) -> tuple[str, int] | None:
    """The ``nn.ModuleList`` of ≥ 2 modules of one class holding the most selected weights."""
    best: tuple[int, str, int] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or not path:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        held = sum(1 for n in layout.names if n.startswith(path + "."))
        if held and (best is None or held > best[0]):
            best = (held, path, len(module))
    return None if best is None else (best[1], best[2])


def plan_stages(model: nn.Module, layout: ParamLayout, unit: StageUnit = "block") -> StagePlan:
    """Split the selected parameters into stages, ordered as ``model.named_modules()``.

    ``unit = "block"``: one stage per repeated block (see the module docstring), one per layer
    elsewhere; ``"layer"``: one stage per layer, all fed by the prefix forward.

    Raises:
        ConfigError: a selected parameter belongs to the model itself (no layer to stop after).
    """
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    found = _block_list(model, layout) if unit == "block" else None
    by_key: dict[tuple[int, str], list[int]] = {}
    block_of: dict[str, int] = {}
    for i, name in enumerate(layout.names):
        owner = _owner(name)
        if owner not in order or not owner:
            raise ConfigError(
                f"sequential calibration prunes layer by layer, but {name!r} is a parameter of "
                "the model itself, not of a layer; leave it out with prune.ignore "
                "@ schedule.calibration"
            )
        if found is not None and owner.startswith(found[0] + "."):
            index = int(owner[len(found[0]) + 1 :].split(".")[0])
            key = f"{found[0]}.{index}"
            block_of[key] = index
        else:
            key = owner
        by_key.setdefault((order[key], key), []).append(i)
    stages = []
    for (_, key), indices in sorted(by_key.items()):
        modules = tuple(dict.fromkeys(_owner(layout.names[i]) for i in indices))
        stages.append(Stage(key, tuple(indices), modules, block_of.get(key)))
    if found is None:
        return StagePlan(tuple(stages))
    return StagePlan(tuple(stages), found[0], found[1])


def _mirror(modules: dict[str, nn.Module]) -> nn.Module:
    """A module whose ``named_modules()`` holds each of ``modules`` at its path (empty
    containers in between), sharing the modules themselves."""
    root = nn.Module()
    for path, module in modules.items():
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], module)
    return root


class _BlockStage(nn.Module):
    """Runs one block on cached hidden states, with each batch's other arguments."""

    def __init__(self, path: str, block: nn.Module, cache: _BlockCache) -> None:
        super().__init__()
        self.mirror = _mirror({path: block})
        self.training = block.training  # this wrapper only; the block's mode stays as it is
        self._block = [block]  # not a child: names come from the mirror only
        self._cache = cache

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        return self.mirror.named_modules(*args, **kwargs)

    def forward(self, hidden: Tensor) -> Any:
        args, kwargs = self._cache.extras(hidden)
        return self._block[0](hidden, *args, **kwargs)


class _PrefixStage(nn.Module):
    """Runs the whole model and stops after the stage's layers have run."""

    def __init__(self, model: nn.Module, stops: Sequence[nn.Module]) -> None:
        super().__init__()
        self._model = [model]
        self._stops = list(stops)
        self.mirror = _mirror(dict(model.named_children()))
        self.training = model.training

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        return self.mirror.named_modules(*args, **kwargs)

    def forward(self, x: Any) -> None:
        pending = set(range(len(self._stops)))

        def stop_when_all_ran(index: int) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                pending.discard(index)
                if not pending:
                    raise _StopForward

            return hook

        handles = [m.register_forward_hook(stop_when_all_ran(i)) for i, m in enumerate(self._stops)]
        try:
            self._model[0](x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()


@attrs.define
class _Entry:
    hidden: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _BlockCache:
    """The current block's inputs for every calibration batch (this rank's slices)."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self._by_id: dict[int, _Entry] = {}

    def reset(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self._by_id = {id(e.hidden): e for e in entries}

    def extras(self, hidden: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        entry = self._by_id.get(id(hidden))
        if entry is None:
            for candidate in self.entries:  # a leading cut of a cached batch
                if candidate.hidden.data_ptr() == hidden.data_ptr():
                    take, full = hidden.shape[0], candidate.hidden.shape[0]
                    return _cut(candidate.args, take, full), _cut(candidate.kwargs, take, full)
            raise ConfigError(
                "a stage was run on inputs that are not its cached calibration batches @ schedule"
            )
        return entry.args, entry.kwargs

    def batches(self, num_samples: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        seen = 0
        for entry in self.entries:
            if num_samples is not None and seen >= num_samples:
                return
            n = entry.hidden.shape[0]
            hidden = entry.hidden
            if num_samples is not None and seen + n > num_samples:
                hidden = hidden[: num_samples - seen]
            seen += n
            yield hidden, torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)


def _cut(value: Any, take: int, full: int) -> Any:
    """``value`` with every tensor whose leading dimension is the batch cut to ``take``."""
    if isinstance(value, Tensor):
        return value[:take] if value.dim() and value.shape[0] == full else value
    if isinstance(value, tuple):
        return tuple(_cut(v, take, full) for v in value)
    if isinstance(value, list):
        return [_cut(v, take, full) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v, take, full) for k, v in value.items()}
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _hidden_of(output: Any) -> Tensor:
    """A block's output hidden states: the tensor, or the first item of a tuple/list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ConfigError(
        f"a block returned {type(output).__name__}, not hidden states (a tensor or a tuple "
        "starting with one); use stages = 'layer' @ schedule.stages"
    )


class SequentialCalibration:
    """Feeds the stages of one step: :meth:`enter` before a stage is pruned, :meth:`leave`
    after (which moves the cached inputs through the pruned block).

    Args:
        model: the model being pruned (switched to eval mode by the caller).
        plan: its stages.
        data: the calibration ``(inputs, targets)`` batches.
        num_samples: samples to calibrate on (over all ranks; this rank caches its slices).
        device: where inputs go.
    """

    def __init__(
        self, model: nn.Module, plan: StagePlan, data: Any, num_samples: int, device: torch.device
    ) -> None:
        self.model = model
        self.plan = plan
        self.data = data
        self.num_samples = num_samples
        self.device = device
        self._cache = _BlockCache()
        self._at: int | None = None  # the block whose inputs the cache holds
        self._blocks: nn.ModuleList | None = (
            model.get_submodule(plan.blocks) if plan.blocks is not None else None  # type: ignore[assignment]
        )
        self._last_block_stage = max(
            (s.block for s in plan.stages if s.block is not None), default=None
        )

    def _data_batches(self, num_samples: int | None = None) -> Iterator[tuple[Any, Tensor]]:
        if self.data is None:  # a data-free scorer (magnitude): nothing to calibrate on
            return
        n = self.num_samples if num_samples is None else min(num_samples, self.num_samples)
        for batch in distributed.shard(self.data, n):
            yield _to(batch[0], self.device), _to(batch[1], self.device)

    def enter(self, stage: Stage) -> tuple[nn.Module, Callable[..., Iterator[Any]]]:
        """The stage's model and its ``batches(num_samples=None)`` callable."""
        if stage.block is None:
            modules = dict(self.model.named_modules())
            return _PrefixStage(self.model, [modules[m] for m in stage.modules]), self._data_batches
        assert self._blocks is not None and self.plan.blocks is not None
        if self._at is None:
            self._capture()
        while self._at is not None and self._at < stage.block:  # blocks without a stage
            self._propagate()
        path = f"{self.plan.blocks}.{stage.block}"
        return _BlockStage(path, self._blocks[stage.block], self._cache), self._cache.batches

    def cache_entries(self) -> list[Any]:
        """The cached inputs of the current block (one entry per calibration batch)."""
        return list(self._cache.entries)

    def leave(self, stage: Stage) -> None:
        """Propagate the cached inputs through the stage's (now pruned) block."""
        if stage.block is None:
            return
        if stage.block == self._last_block_stage:
            self._cache.reset([])  # no later block needs inputs: free them
            self._at = None
            return
        self._propagate()

    @torch.no_grad()
    def _capture(self) -> None:
        assert self._blocks is not None
        entries: list[_Entry] = []

        def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            elif "hidden_states" in kwargs:
                hidden, rest = kwargs.pop("hidden_states"), ()
            else:
                raise ConfigError(
                    f"the first block of {self.plan.blocks} got no hidden states; use "
                    "stages = 'layer' @ schedule.stages"
                )
            entries.append(_Entry(hidden.detach(), rest, kwargs))
            raise _StopForward

        handle = self._blocks[0].register_forward_pre_hook(record, with_kwargs=True)
        config = getattr(self.model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if use_cache:  # a key/value cache would grow on every re-run of a block
            config.use_cache = False  # type: ignore[union-attr]
        try:
            for x, _ in self._data_batches():
                try:
                    self.model(x)
                except _StopForward:
                    pass
        finally:
            handle.remove()
            if use_cache:
                config.use_cache = use_cache  # type: ignore[union-attr]
        self._cache.reset(entries)
        self._at = 0

    @torch.no_grad()
    def _propagate(self) -> None:
        assert self._blocks is not None and self._at is not None
        block = self._blocks[self._at]
        for entry in self._cache.entries:  # in place: one batch's outputs beside the cache
            entry.hidden = _hidden_of(block(entry.hidden, *entry.args, **entry.kwargs)).detach()
        self._cache.reset(self._cache.entries)
        self._at += 1
