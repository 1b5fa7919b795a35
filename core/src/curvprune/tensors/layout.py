"""Which parameters are pruned, and how their weights are laid out as one flat vector.

Every role works on the same flat layout: the selected parameters, in ``model.named_parameters()``
order, each flattened row-major (``tensor.reshape(-1)``: output-channel major for Conv and Linear
weights) and concatenated into a vector of length ``d``. A :class:`BlockLayout` cuts that vector
into the estimators' diagonal blocks: consecutive pieces of ``block_size`` within each parameter,
never crossing a parameter, the last piece of a parameter possibly shorter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs
import torch
from torch import Tensor, nn

from curvprune.errors import ConfigError, closest

__all__ = [
    "DEFAULT_TARGETS",
    "EXTERNAL_LAYER_TYPES",
    "BlockLayout",
    "ParamLayout",
    "StructureMap",
    "select_parameters",
]


class StructureMap(Protocol):
    """What the layout needs of channel structures (:class:`curvprune.Structures` has it).

    The tensor layer only maps channels to structure ids; tracing and gating the structures is
    the job of :mod:`curvprune.structure`, which sits above this layer.
    """

    #: the names of the layout the structures were made for.
    layout_names: tuple[str, ...]
    #: long ``[n_channels]``: each output channel's structure id, -1 if never pruned.
    channel_structure: Tensor
    #: long ``[S]``: the group index of each structure.
    structure_group: Tensor

    @property
    def n_structures(self) -> int:
        """S, the number of structures."""

    @property
    def n_groups(self) -> int:
        """The number of structure groups."""

    def gate_masks(self, keep: Tensor) -> dict[str, Tensor]:
        """Keep-masks of the parameters outside the layout that gate each structure (biases,
        normalization affine parameters), for a structure keep-mask ``keep`` (bool ``[S]``)."""


def _torch_module_types() -> dict[str, type[nn.Module]]:
    return {
        name: obj
        for name, obj in vars(nn).items()
        if isinstance(obj, type) and issubclass(obj, nn.Module)
    }


@attrs.frozen(eq=False)
class ParamLayout:
    """The selected parameters and their place in the flat vector.

    Attributes:
        names: parameter names as in ``model.named_parameters()``.
        shapes: their shapes.
        module_types: class name of the module owning each parameter.
        structures: the prunable channel structures (a :class:`curvprune.Structures`: coupled
            channel groups, see :mod:`curvprune.structure.graph`) when the pipeline traced them,
            else None: then every output channel of every selected parameter is its own
            structure.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    module_types: tuple[str, ...]
    structures: StructureMap | None = attrs.field(default=None, kw_only=True)
    #: True for a stage's share of a run's layout (:meth:`subset`): per-parameter options that
    #: name parameters of other stages are not errors there.
    partial: bool = attrs.field(default=False, kw_only=True)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each parameter, in layout order."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat vector, plus ``d`` at the end."""
        out, acc = [0], 0
        for size in self.sizes:
            acc += size
            out.append(acc)
        return tuple(out)

    @property
    def d(self) -> int:
        """Total number of selected weights."""
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.names)

    def slice(self, index: int) -> slice:
        """The slice of parameter ``index`` in the flat vector."""
        off = self.offsets
        return slice(off[index], off[index + 1])

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The selected parameters of ``model``, in layout order."""
        named = dict(model.named_parameters())
        try:
            return [named[n] for n in self.names]
        except KeyError as exc:
            raise ConfigError(f"parameter {exc.args[0]!r} is not in the model @ layout") from None

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (or their leading-batch versions) to ``[..., d]``.

        Each tensor has shape ``shape`` or ``(*batch, *shape)``; the batch dims are kept.
        """
        parts = []
        for tensor, shape in zip(tensors, self.shapes, strict=True):
            batch = tensor.shape[: tensor.dim() - len(shape)]
            parts.append(tensor.reshape(*batch, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split ``flat`` of shape ``[..., d]`` into views shaped like the parameters."""
        batch = flat.shape[:-1]
        pieces = torch.split(flat, list(self.sizes), dim=-1)
        return [p.reshape((*batch, *s)) for p, s in zip(pieces, self.shapes, strict=True)]

    def gather(self, model: nn.Module) -> Tensor:
        """A detached copy of the selected weights as one flat vector ``[d]``."""
        return self.flatten([p.detach() for p in self.parameters(model)]).clone()

    def scatter_(self, model: nn.Module, flat: Tensor) -> None:
        """Write the flat vector ``flat`` ``[d]`` back into the model's parameters in place."""
        with torch.no_grad():
            for param, value in zip(self.parameters(model), self.unflatten(flat), strict=True):
                param.copy_(value)

    # -- structures (output channels) -------------------------------------------------------
    @property
    def channels(self) -> tuple[int, ...]:
        """Number of output channels (dim 0) of each parameter."""
        return tuple(int(s[0]) if len(s) else 1 for s in self.shapes)

    def channel_index(self, device: torch.device | str | None = None) -> Tensor:
        """For every flat coordinate, the index of its output channel among all channels.

        Channels are numbered in layout order: parameter 0's channels first. Shape ``[d]``.
        """
        ids = []
        start = 0
        for size, n_out in zip(self.sizes, self.channels, strict=True):
            per = size // n_out
            ids.append(torch.arange(start, start + n_out, device=device).repeat_interleave(per))
            start += n_out
        return torch.cat(ids)

    def channel_param_index(self, device: torch.device | str | None = None) -> Tensor:
        """For every channel, the index of the parameter it belongs to. Shape ``[n_channels]``."""
        counts = torch.tensor(self.channels, device=device)
        return torch.repeat_interleave(torch.arange(len(self), device=device), counts)

    def subset(self, indices: Sequence[int]) -> ParamLayout:
        """The layout of the parameters ``indices`` (in that order), marked :attr:`partial`.

        Structures are not carried over (a stage prunes single weights); :meth:`subset_index`
        maps the subset's flat vector into this one.
        """
        pick = [int(i) for i in indices]
        return ParamLayout(
            tuple(self.names[i] for i in pick),
            tuple(self.shapes[i] for i in pick),
            tuple(self.module_types[i] for i in pick),
            partial=True,
        )

    def subset_index(self, indices: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Flat positions in this layout of :meth:`subset` ``(indices)``'s flat vector, long."""
        off = self.offsets
        parts = [torch.arange(off[i], off[i + 1], device=device) for i in indices]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def with_structures(self, structures: StructureMap | None) -> ParamLayout:
        """This layout with ``structures`` attached (None: identity structures)."""
        if structures is not None and structures.layout_names != self.names:
            raise ConfigError("structures were made for other parameters than this layout @ layout")
        return attrs.evolve(self, structures=structures)

    @property
    def n_structures(self) -> int:
        """S: the number of channel structures (all output channels without structures)."""
        if self.structures is None:
            return sum(self.channels)
        return self.structures.n_structures

    def structure_index(self, device: torch.device | str | None = None) -> Tensor:
        """For every output channel, its structure id, or -1 if never pruned. ``[n_channels]``.

        Without structures this is the identity: each channel is its own structure.
        """
        if self.structures is None:
            return torch.arange(sum(self.channels), device=device)
        return self.structures.channel_structure.to(device)

    def structure_group(self, device: torch.device | str | None = None) -> Tensor:
        """For every structure, its group: ``[S]`` (without structures, its parameter)."""
        if self.structures is None:
            return self.channel_param_index(device)
        return self.structures.structure_group.to(device)

    @property
    def n_structure_groups(self) -> int:
        """Number of structure groups (parameters, without structures)."""
        return len(self) if self.structures is None else self.structures.n_groups

    def channel_sums(self, values: Tensor) -> Tensor:
        """Sum of ``values`` ``[d]`` over each output channel's weights: ``[n_channels]``.

        One reduction per parameter over its ``[out, -1]`` view (no ``[d]`` index tensor).
        """
        parts = [
            v.reshape(n, -1).sum(1)
            for v, n in zip(self.unflatten(values), self.channels, strict=True)
        ]
        return torch.cat(parts)

    def alive_channels(self, mask: Tensor) -> Tensor:
        """Which output channels still have a kept weight in ``mask`` (bool ``[d]``)."""
        parts = [
            m.reshape(n, -1).any(1) for m, n in zip(self.unflatten(mask), self.channels, strict=True)
        ]
        return torch.cat(parts)

    def expand_channels(self, per_channel: Tensor) -> Tensor:
        """Repeat a value per output channel ``[n_channels]`` over its weights: ``[d]``."""
        pieces = torch.split(per_channel, list(self.channels))
        parts = [
            piece.repeat_interleave(size // n)
            for piece, size, n in zip(pieces, self.sizes, self.channels, strict=True)
        ]
        return torch.cat(parts)

    def structure_sums(self, per_channel: Tensor) -> Tensor:
        """Sum ``per_channel`` ``[n_channels]`` into structures ``[S]`` (id -1 left out)."""
        sid = self.structure_index(per_channel.device)
        valid = sid >= 0
        out = torch.zeros(self.n_structures, dtype=per_channel.dtype, device=per_channel.device)
        return out.index_add_(0, sid[valid], per_channel[valid])

    def alive_structures(self, mask: Tensor) -> Tensor:
        """Which structures still have a kept weight in ``mask`` (bool ``[d]``): bool ``[S]``."""
        return self.structure_sums(self.alive_channels(mask).long()) > 0

    def param_index(self, device: torch.device | str | None = None) -> Tensor:
        """For every flat coordinate, the index of its parameter. Shape ``[d]``."""
        counts = torch.tensor(self.sizes, device=device)
        return torch.repeat_interleave(torch.arange(len(self), device=device), counts)

    def blocks(self, block_size: int | None) -> BlockLayout:
        """The block partition for ``block_size`` (None: one block over everything)."""
        return BlockLayout.build(self.sizes, block_size)


@attrs.frozen(eq=False)
class BlockLayout:
    """Diagonal blocks of the flat vector, as tensors ready for batched linear algebra.

    Attributes:
        starts: first flat index of each block, ``[n_blocks]`` (long).
        lengths: length of each block, ``[n_blocks]`` (long, each <= ``width``).
        width: the padded block width (``block_size``, or the longest block).
        d: total length of the flat vector.
    """

    starts: Tensor
    lengths: Tensor
    width: int
    d: int

    @classmethod
    def build(cls, sizes: Sequence[int], block_size: int | None) -> BlockLayout:
        """Cut each of ``sizes`` into pieces of ``block_size``; None makes one block of all."""
        if block_size is not None and block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size} @ estimator.block_size")
        d = int(sum(sizes))
        if block_size is None or d == 0:
            return cls(torch.tensor([0]), torch.tensor([d]), max(d, 1), d)
        starts, lengths = [], []
        offset = 0
        for size in sizes:
            n_full, rest = divmod(int(size), block_size)
            starts.extend(range(offset, offset + n_full * block_size, block_size))
            lengths.extend([block_size] * n_full)
            if rest:
                starts.append(offset + n_full * block_size)
                lengths.append(rest)
            offset += int(size)
        width = max(lengths) if lengths else 1
        return cls(torch.tensor(starts), torch.tensor(lengths), width, d)

    @property
    def n_blocks(self) -> int:
        """Number of blocks."""
        return int(self.starts.numel())

    def padded_index(self, device: torch.device | str | None = None) -> Tensor:
        """Flat index of each padded block slot, ``[n_blocks, width]``; padding slots hold ``d``."""
        cols = torch.arange(self.width, device=device)
        index = self.starts.to(device)[:, None] + cols
        return torch.where(cols < self.lengths.to(device)[:, None], index, self.d)

    def valid(self, device: torch.device | str | None = None) -> Tensor:
        """Boolean ``[n_blocks, width]``: True where a slot holds a real coordinate."""
        return torch.arange(self.width, device=device) < self.lengths.to(device)[:, None]

    def block_of(self, device: torch.device | str | None = None) -> Tensor:
        """For each flat coordinate, its block index. Shape ``[d]``."""
        return torch.repeat_interleave(
            torch.arange(self.n_blocks, device=device), self.lengths.to(device)
        )

    def group(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Arrange ascending flat indices into one ``-1``-padded row per block that has any.

        This is the ``idx`` argument of :meth:`CurvatureEstimator.inverse_columns` for joint
        updates within blocks.

        Args:
            index: ascending flat indices, long ``[p]`` (so their blocks are non-decreasing).

        Returns:
            ``(groups, row, col)``: ``groups`` ``[n_rows, K]`` holds ``index`` padded with -1,
            one row per block present, and ``groups[row[i], col[i]] == index[i]``.
        """
        block = self.block_of(index.device)[index]
        _, row, counts = torch.unique_consecutive(block, return_inverse=True, return_counts=True)
        col = torch.arange(index.numel(), device=index.device) - (torch.cumsum(counts, 0) - counts)[row]
        width = int(counts.max()) if counts.numel() else 0
        groups = torch.full((counts.numel(), width), -1, dtype=torch.long, device=index.device)
        groups[row, col] = index
        return groups, row, col

    def pack(self, x: Tensor) -> Tensor:
        """Reshape ``x`` ``[..., d]`` into padded blocks ``[..., n_blocks, width]`` (zeros pad)."""
        padded = torch.nn.functional.pad(x, (0, 1))
        return padded[..., self.padded_index(x.device)]

    def unpack(self, blocks: Tensor) -> Tensor:
        """Inverse of :meth:`pack`: ``[..., n_blocks, width]`` back to ``[..., d]``."""
        flat = blocks.reshape(*blocks.shape[:-2], -1)
        return flat[..., self.valid(blocks.device).reshape(-1)]


def _selector_matches(selector: str, pname: str, mname: str, module: nn.Module) -> bool:
    """Whether ``selector`` picks parameter ``pname`` (owned by module ``mname``)."""
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], pname) is not None
    if selector == pname:
        return True
    # A module selector (type name or module name) picks that module's ``weight`` (for
    # ``nn.MultiheadAttention``, its packed ``in_proj_weight``: its heads' rows).
    is_weight = pname.rsplit(".", 1)[-1] in ("weight", "in_proj_weight")
    by_type = any(c.__name__ == selector for c in type(module).__mro__)
    return is_weight and (by_type or selector == mname)


#: Layer types of other libraries that selectors may name without importing them (matched by
#: class name): Hugging Face transformers' ``Conv1D`` (GPT-2's ``y = x @ W + b``, W ``[in, out]``).
EXTERNAL_LAYER_TYPES = frozenset({"Conv1D"})

#: What ``[prune] targets`` selects by default: the weights of convolutions and dense layers.
DEFAULT_TARGETS = ("Conv2d", "Linear", "Conv1D")


def select_parameters(
    model: nn.Module,
    targets: Iterable[str] = DEFAULT_TARGETS,
    ignore: Iterable[str] = (),
    *,
    where: str = "prune",
) -> ParamLayout:
    """Select the parameters to prune.

    A selector is a module type name (``"Conv2d"``: the ``weight`` of every module of that type
    or a subclass), ``"re:<regex>"`` (full match on parameter names such as
    ``"features.0.weight"``), or an exact module or parameter name (``"fc"`` or ``"fc.weight"``).
    ``ignore`` removes what ``targets`` selected, with the same syntax.

    Args:
        model: the model.
        targets: selectors of parameters to prune.
        ignore: selectors of parameters to leave alone.
        where: config path prefix used in error messages.

    Returns:
        The layout of the selected parameters, in ``named_parameters()`` order.

    Raises:
        ConfigError: a selector matches nothing and is not a torch.nn type, a regex is invalid,
            or nothing is selected.
    """
    targets, ignore = list(targets), list(ignore)
    known = {**_torch_module_types(), **dict.fromkeys(EXTERNAL_LAYER_TYPES)}
    owners: dict[str, tuple[str, nn.Module]] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(prefix=mname, recurse=False):
            owners[pname] = (mname, module)
    for field, selectors in (("targets", targets), ("ignore", ignore)):
        for i, sel in enumerate(selectors):
            if sel.startswith("re:"):
                try:
                    re.compile(sel[3:])
                except re.error as exc:
                    raise ConfigError(f"invalid regex {sel!r}: {exc} @ {where}.{field}[{i}]") from None
                continue
            in_model = any(
                sel in (p, m) or any(c.__name__ == sel for c in type(mod).__mro__)
                for p, (m, mod) in owners.items()
            )
            if not in_model and sel not in known:
                names = list(known) + [m for m, _ in owners.values()] + list(owners)
                hint = closest(sel, names)
                more = f" (did you mean {hint!r}?)" if hint else ""
                raise ConfigError(
                    f"{sel!r} is neither a torch.nn module type nor a module or parameter of "
                    f"the model{more} @ {where}.{field}[{i}]"
                )
    chosen = []
    for pname, param in model.named_parameters():
        mname, module = owners[pname]
        hit = any(_selector_matches(s, pname, mname, module) for s in targets)
        if hit and not any(_selector_matches(s, pname, mname, module) for s in ignore):
            chosen.append((pname, param, type(module).__name__))
    if not chosen:
        raise ConfigError(
            f"no parameter of {type(model).__name__} matches targets={targets} "
            f"minus ignore={ignore} @ {where}.targets"
        )
    return ParamLayout(
        names=tuple(n for n, _, _ in chosen),
        shapes=tuple(p.shape for _, p, _ in chosen),
        module_types=tuple(t for _, _, t in chosen),
    )
