"""Block Gram accumulation over gradient chunks without copying them.

The estimator keeps its blocks as one padded batch ``[n_blocks, B, B]``. Most blocks are full
(``B`` wide) and adjacent in the flat vector, so a chunk ``[k, d]`` restricted to a run of them
is already a strided view ``[k, n, B]``: the block Gram matrices ``Σᵢ gᵢgᵢᵀ`` of the run are one
batched GEMM on that view, with no gather. Only the short last block of a parameter (at most one
per parameter) is gathered and zero-padded. Measured at d = 270k, B = 128: gathering every block
(:meth:`curvprune.BlockLayout.pack`) costs 4× the GEMM itself; the views cost nothing.

The Python loop in :meth:`BlockRuns.accumulate_` runs over *runs* of blocks (at most one per
parameter, plus one for all short blocks), never over blocks.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from curvprune import BlockLayout

__all__ = ["BlockRuns"]


@attrs.frozen(eq=False)
class BlockRuns:
    """The blocks of a :class:`curvprune.BlockLayout`, grouped for copy-free batched GEMMs.

    Attributes:
        width: the padded block width B.
        runs: ``(first_block, n_blocks, flat_start)`` for each maximal run of full-width blocks
            that are adjacent in the flat vector.
        short_blocks: indices of the blocks narrower than ``width``, long ``[n_short]``.
        short_index: flat index of each of their slots, ``[n_short, width]`` (padding slots
            point at coordinate 0 and are zeroed by ``short_valid``).
        short_valid: bool ``[n_short, width]``, True where a slot holds a real coordinate.

    """

    width: int
    runs: tuple[tuple[int, int, int], ...]
    short_blocks: Tensor
    short_index: Tensor
    short_valid: Tensor

    @classmethod
    def build(cls, layout: BlockLayout, device: torch.device | str | None = None) -> BlockRuns:
        """Group ``layout``'s blocks into runs (host-side, once per :meth:`setup`)."""
        width = layout.width
        starts, lengths = layout.starts, layout.lengths
        full = lengths == width
        follows = torch.zeros_like(full)
        follows[1:] = full[1:] & full[:-1] & (starts[1:] == starts[:-1] + width)
        run_heads = (full & ~follows).nonzero().squeeze(1)
        run_ids = torch.cumsum((full & ~follows).long(), 0) - 1
        counts = torch.bincount(run_ids[full], minlength=run_heads.numel())
        heads, firsts = run_heads.tolist(), starts[run_heads].tolist()
        runs = tuple(zip(heads, counts.tolist(), firsts, strict=True))
        short = (~full).nonzero().squeeze(1)
        valid = layout.valid()[short]
        index = torch.where(valid, layout.padded_index()[short], 0)
        return cls(width, runs, short.to(device), index.to(device), valid.to(device))

    def accumulate_(self, gram: Tensor, grads: Tensor, *, overwrite: bool = False) -> None:
        """Add the block Gram matrices of ``grads`` to ``gram`` in place.

        Args:
            gram: ``[n_blocks, B, B]``, updated as ``gram[b] += Σᵢ gᵢ[b] gᵢ[b]ᵀ``.
            grads: ``[k, d]`` contiguous rows, same dtype and device as ``gram``.
            overwrite: set ``gram[b] = Σᵢ gᵢ[b] gᵢ[b]ᵀ`` instead: every block is written (the
                runs and the short blocks cover them all, once each) and the old contents are
                never read (``baddbmm`` with β = 0 ignores them, NaN included), so ``gram`` may
                be uninitialised memory (``torch.empty``) before the first chunk.

        """
        k, width = grads.shape[0], self.width
        beta = 0.0 if overwrite else 1.0
        for first, count, start in self.runs:
            x = grads[:, start : start + count * width].view(k, count, width).transpose(0, 1)
            gram[first : first + count].baddbmm_(x.transpose(1, 2), x, beta=beta)
        if self.short_blocks.numel():
            x = (grads[:, self.short_index] * self.short_valid).transpose(0, 1)
            products = torch.bmm(x.transpose(1, 2), x)
            if overwrite:
                gram.index_copy_(0, self.short_blocks, products)
            else:
                gram.index_add_(0, self.short_blocks, products)
