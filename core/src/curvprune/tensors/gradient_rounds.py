"""How one round of gradient chunks travels between ranks (a mixin of ``GradientSource``).

Under torch.distributed rank r computes chunk r of every round of W chunks
(:meth:`curvprune.tensors.gradients.GradientSource.iter_grads`). At the end of a round:

* ``gather=True``: every chunk is all-gathered (the rows, with the losses as one more column);
* ``columns`` (sharded curvature, :mod:`curvprune.pipeline.sharding`): each rank receives its
  own columns of every chunk, by one all-to-all of the rows, or — when the rows come in closed
  form (an all-``nn.Linear`` model, :mod:`curvprune.tensors.linear_rows`) — by one all-gather
  of each layer's inputs x and output gradients g, from which each rank forms its columns
  itself: (in + out) numbers per position travel instead of in·out per row, and each rank's
  GEMMs cover its share of W only.

One small all-reduce per round agrees whether any rank failed and, for the closed form, that
every rank's chunk has the same positions per row (else the rows travel).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvprune.tensors import distributed
from curvprune.tensors.linear_rows import LinearFactors

if TYPE_CHECKING:
    from curvprune.tensors.layout import ParamLayout

__all__ = ["COVERED_BY", "RoundExchange"]

#: Attribute of a yielded chunk naming the source whose check_finite covers it (see covering).
COVERED_BY = "_curvprune_finite_check_by"


class RoundExchange:
    """The exchanges of :class:`~curvprune.tensors.gradients.GradientSource`'s rounds.

    The host class provides ``model``, ``layout``, ``_pruned``, ``_closed_form`` (the Linear
    owners of the selected parameters) and the running sums' ``_track``, ``_track_losses``
    and ``_track_columns``.
    """

    model: nn.Module
    layout: ParamLayout
    _pruned: Tensor | None
    _closed_form: list[tuple[nn.Linear, str]] | None

    def _track(self, flat: Tensor, losses: Tensor, column_sum: Tensor | None = None) -> None:
        raise NotImplementedError

    def _track_losses(self, losses: Tensor) -> None:
        raise NotImplementedError

    def _track_columns(self, piece: Tensor, lo: int) -> None:
        raise NotImplementedError

    def _gather_round(
        self,
        mine: tuple[Tensor, Tensor, Tensor | None] | None,
        counts: list[int],
        device: torch.device,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """All-gather one round of chunks (rank r's is chunk r of the round); yield them in order.

        The per-row losses travel as one extra column, so a round costs one collective.
        """
        d = self.layout.d
        if mine is None:
            dtype = self.layout.parameters(self.model)[0].dtype
            local = torch.zeros(0, d + 1, dtype=dtype, device=device)
        else:
            flat, losses = mine[0], mine[1]
            local = torch.cat([flat, losses.to(flat.dtype).unsqueeze(1)], dim=1)
        every = distributed.all_gather_rows(local, counts)
        start = 0
        for n in counts:
            if n:
                yield every[start : start + n, :d], every[start : start + n, d]
            start += n

    def _exchange_round(
        self,
        mine: tuple[Tensor, Tensor, Tensor | None] | None,
        counts: list[int],
        columns: Sequence[tuple[int, int]],
        device: torch.device,
    ) -> Iterator[Tensor]:
        """This rank's columns of one round's chunks (its own chunk counted in the sums)."""
        if mine is None:
            dtype = self.layout.parameters(self.model)[0].dtype
            rows = torch.zeros(0, self.layout.d, dtype=dtype, device=device)
        else:
            self._track(*mine)
            rows = mine[0]
        # the finiteness of every row is in the synchronized sums (check_finite)
        out = distributed.all_to_all_columns(rows, counts, columns)
        start = 0
        for n in counts:
            if n:
                piece = out[start : start + n]
                setattr(piece, COVERED_BY, self)
                yield piece
            start += n

    @property
    def _owners(self) -> list[tuple[nn.Linear, str]]:
        owners = self._closed_form  # set by iter_grads for the model's closed form
        assert owners is not None
        return owners

    def _agree(
        self, failed: bool, mine: Any, factors: bool
    ) -> tuple[bool, list[int] | None]:
        """One small all-reduce per round: did any rank fail, and (exchanging factors) the
        layers' positions per row, None unless every rank's chunk has the same."""
        if not factors:
            return distributed.any_rank(failed), None
        ours = mine.positions() if isinstance(mine, LinearFactors) else None
        n = len(dict.fromkeys(m for m, _ in self._owners))
        fell_back = mine is not None and ours is None
        big = float(2**52)  # "no chunk this round": neither the maximum nor the minimum
        top = ours if ours is not None else [-big] * n
        bottom = [-p for p in ours] if ours is not None else [-big] * n
        agreed = distributed.max_over_ranks([float(failed), float(fell_back), *top, *bottom])
        highest, lowest = agreed[2 : 2 + n], [-v for v in agreed[2 + n :]]
        if agreed[0] > 0:
            return True, None
        if agreed[1] > 0 or highest != lowest:
            return False, None
        return False, [int(p) for p in highest]

    def _factor_round(
        self,
        mine: LinearFactors | None,
        counts: list[int],
        columns: Sequence[tuple[int, int]],
        positions: list[int],
        device: torch.device,
    ) -> Iterator[Tensor]:
        """This rank's columns of one round's chunks, formed from every chunk's x and g.

        One all-gather of (in + out)·positions numbers per row replaces the all-to-all of the
        rows' d columns; each rank then forms its own columns of every row (the same GEMMs as
        one process, on its share of W). The sums count this rank's columns of every row and
        its own chunk's losses, so :meth:`synchronize` adds up to one process's.
        """
        owners = self._owners
        modules = list(dict.fromkeys(m for m, _ in owners))
        width = 1 + sum(p * (m.in_features + m.out_features)
                        for m, p in zip(modules, positions, strict=True))
        dtype = self.layout.parameters(self.model)[0].dtype
        if mine is None:
            local = torch.zeros(0, width, dtype=dtype, device=device)
        else:
            local = mine.packed()
            self._track_losses(mine.losses)
        every = distributed.all_gather_rows(local, counts)
        lo, hi = columns[distributed.rank()]
        pruned = None if self._pruned is None else self._pruned[lo:hi].to(device)
        start = 0
        for n in counts:
            if n:
                chunk = LinearFactors.unpacked(every[start : start + n], modules, positions)
                piece = chunk.columns(self.layout, owners, lo, hi)
                if pruned is not None:
                    piece.masked_fill_(pruned, 0)
                self._track_columns(piece, lo)
                setattr(piece, COVERED_BY, self)
                yield piece
                del piece, chunk  # one piece at a time: freed before the next is formed
            start += n
