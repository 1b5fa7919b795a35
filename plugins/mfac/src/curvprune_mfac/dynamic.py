"""The dynamic M-FAC algorithm: F⁻¹ products over a sliding window of the last m gradients.

Frantar, Kurtic & Alistarh (NeurIPS 2021), Sec. 3.2. The state is

* G, the m×d ring buffer of the window's gradients (slot ``position`` holds the oldest);
* K = GGᵀ, the m×m Gram matrix, kept in float64;
* the lower Cholesky factor C of A = s·I + K/λ (s the 1/s scaling of F, see below).

Adding a gradient g overwrites the oldest slot j and refreshes row and column j of K with one
m×d matrix-vector product, Gg (O(d·m)); C is then refactored once, lazily, before the next
query (O(m³)). By Woodbury,

    F⁻¹x = x/λ − Gᵀ A⁻¹ (Gx) / λ²                                        (M-FAC Eq. for IHVP)

costs two passes over G and two m×m triangular solves: O(d·m + m²). K's entries are whole dot
products, recomputed (never accumulated) when a slot changes, so the state after any sequence of
pushes equals a recompute from the window's gradients: there is no drift. The paper's GPU form
(pivot-free LU of A and a triangular coefficient matrix B) is the same algebra; PyTorch has no
pivot-free LU on the CPU, and the Cholesky form needs none.

The scaling s: the damped Fisher averages over the gradients held, s = min(seen, m) (the
estimator's convention), or, with ``zero_padded``, over the full window s = m as if unfilled
slots held zero gradients (the reference optimizer starts from an all-zero buffer). Unfilled
slots hold zero rows either way, which add nothing to K and decouple in A.

Everything is batched over independent diagonal blocks: ``[b, m, W]`` (b = 1, W = d unblocked).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from curvprune_mfac.static import capacitance_cholesky

__all__ = ["SlidingWindow"]

#: Pieces in which :meth:`SlidingWindow.diagonal` forms Ŵ (bounds its temporary to m·d/8).
DIAGONAL_PIECES = 8


class SlidingWindow:
    """Ring buffer of the last ``window`` gradients per block, with IHVPs by Woodbury.

    Args:
        n_blocks: b, independent diagonal blocks.
        window: m, the gradients held.
        width: W, the (padded) block width.
        damping: λ > 0.
        dtype: storage dtype of G (and of the O(d·m) passes); the m×m algebra is float64.
        device: where the state lives.
        zero_padded: scale F by 1/m even before the window is full (the reference optimizer);
            otherwise by 1/(gradients held).
    """

    def __init__(
        self,
        n_blocks: int,
        window: int,
        width: int,
        *,
        damping: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        zero_padded: bool = False,
    ) -> None:
        self.window = window
        self.damping = damping
        self.zero_padded = zero_padded
        self.grads = torch.zeros(n_blocks, window, width, dtype=dtype, device=device)
        self.gram = torch.zeros(n_blocks, window, window, dtype=torch.float64, device=device)
        self.position = 0
        self.seen = 0
        self._factor: Tensor | None = None

    # -- state --------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Gradients in the window: min(seen, m)."""
        return min(self.seen, self.window)

    @property
    def scale(self) -> int:
        """The s of F = λI + (1/s)·Σ ggᵀ: m if ``zero_padded``, else :attr:`count`."""
        return self.window if self.zero_padded else self.count

    def state_dict(self) -> dict[str, Any]:
        """The window (G, K, next slot, gradients seen); the factor is recomputed on load."""
        return {"grads": self.grads, "gram": self.gram, "position": self.position,
                "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (shapes must match this window's)."""
        for key in ("grads", "gram"):
            mine, theirs = getattr(self, key), state[key]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(
                    f"window state {key!r} has shape {tuple(theirs.shape)}, expected "
                    f"{tuple(mine.shape)}"
                )
            mine.copy_(theirs)
        self.position, self.seen = int(state["position"]), int(state["seen"])
        self._factor = None

    # -- updates ------------------------------------------------------------------------------
    def push(self, new: Tensor) -> Tensor:
        """Add gradients ``new`` ``[b, k, W]`` in order, each evicting the oldest: O(k·d·m).

        Returns:
            G_new·newᵀ restricted to the rows kept, ``[b, m, k']`` in the storage dtype (with
            k' = min(k, m)): the projections :meth:`ihvp` needs for those gradients.
        """
        k = new.shape[1]
        kept = new[:, max(0, k - self.window) :]
        first = max(0, k - self.window)
        slots = (self.position + first + torch.arange(kept.shape[1], device=new.device)) % self.window
        self.grads.index_copy_(1, slots, kept)
        cross = self.grads @ kept.mT  # [b, m, k'] = new rows of K (one matvec per gradient)
        cross64 = cross.to(torch.float64)
        self.gram.index_copy_(2, slots, cross64)
        self.gram.index_copy_(1, slots, cross64.mT)
        self.position = (self.position + k) % self.window
        self.seen += k
        self._factor = None
        return cross

    def mask_columns_(self, keep: Tensor) -> None:
        """Zero the window's gradients where ``keep`` ``[b, W]`` is False; recompute K, O(d·m²).

        Removed coordinates then satisfy F e_q = λ e_q, so (F⁻¹x)_q = x_q/λ exactly.
        """
        self.grads.mul_(keep[:, None, :].to(self.grads.dtype))
        self.gram.copy_((self.grads @ self.grads.mT).to(torch.float64))
        self._factor = None

    # -- queries ------------------------------------------------------------------------------
    def factor(self) -> Tensor:
        """C, the Cholesky factor of A = s·I + K/λ (float64 ``[b, m, m]``), cached: O(m³)."""
        if self._factor is None:
            self._factor = capacitance_cholesky(self.gram, max(self.scale, 1), self.damping)
        return self._factor

    def factor_ex(self) -> tuple[Tensor, Tensor]:
        """C and LAPACK's ``info`` (``[b]``, 0 where C exists), with no host sync: O(m³).

        The device-side form of :meth:`factor` for loops that must not wait on the device (the
        M-FAC optimizer): the caller decides what a non-zero ``info`` means. Not cached.
        """
        m = self.gram.shape[-1]
        eye = torch.eye(m, dtype=torch.float64, device=self.gram.device)
        capacitance = self.gram / self.damping + float(max(self.scale, 1)) * eye
        return torch.linalg.cholesky_ex(capacitance)

    def ihvp(self, x: Tensor, projections: Tensor | None = None,
             factor: Tensor | None = None) -> Tensor:
        """F⁻¹x = x/λ − Gᵀ A⁻¹ (Gx)/λ² for ``x`` ``[n, b, W]``: O(n·(d·m + m²)).

        Args:
            x: the vectors.
            projections: Gx as ``[b, m, n]`` if already known (the optimizer reuses what
                :meth:`push` returned), saving one pass over G.
            factor: C if already known (:meth:`factor_ex`); default :meth:`factor`.
        """
        if projections is None:
            projections = self.grads @ x.permute(1, 2, 0)  # [b, m, n]
        if factor is None:
            factor = self.factor()
        coeff = torch.cholesky_solve(projections.to(torch.float64), factor)
        coeff = (coeff / self.damping**2).to(self.grads.dtype)
        back = self.grads.mT @ coeff  # [b, W, n]
        return x / self.damping - back.permute(2, 0, 1)

    def scaled_rows(self) -> Tensor:
        """Ŵ = C⁻¹G/λ, ``[b, m, W]`` (F⁻¹ = I/λ − ŴᵀŴ, as in the static algorithm): O(d·m²)."""
        factor = self.factor()
        eye = torch.eye(self.window, dtype=torch.float64, device=factor.device)
        coeff = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
        return (coeff / self.damping).to(self.grads.dtype) @ self.grads

    def diagonal(self) -> Tensor:
        """[F⁻¹]_qq = 1/λ − ‖C⁻¹G_:q‖²/λ², ``[b, W]``: O(d·m²).

        Ŵ's columns are formed in :data:`DIAGONAL_PIECES` pieces, so the temporary is
        ``m·d/DIAGONAL_PIECES`` numbers instead of a second copy of the window (measured: forming
        Ŵ whole doubled the estimator's peak memory).
        """
        factor = self.factor()
        eye = torch.eye(self.window, dtype=torch.float64, device=factor.device)
        coeff = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
        coeff = (coeff / self.damping).to(self.grads.dtype)
        width = self.grads.shape[-1]
        step = -(-width // DIAGONAL_PIECES)
        out = torch.empty(self.grads.shape[0], width, dtype=self.grads.dtype, device=self.grads.device)
        for start in range(0, width, step):  # a fixed number of pieces, not a loop over weights
            piece = coeff @ self.grads[..., start : start + step]  # [b, m, step] columns of Ŵ
            out[:, start : start + step] = 1.0 / self.damping - piece.square().sum(dim=-2)
        return out

    def columns(self, block: Tensor, position: Tensor) -> Tensor:
        """Ŵ's columns at ``position`` ``[n, k]`` of blocks ``block`` ``[n]``: ``[n, k, m]``.

        Solves C·Ŵ_:q = G_:q/λ for the gathered columns only: O(n·k·m²).
        """
        gathered = self.grads.mT[block[:, None], position].to(torch.float64)  # [n, k, m]
        factor = self.factor()[block]  # [n, m, m]
        solved = torch.linalg.solve_triangular(factor, gathered.mT, upper=False)  # [n, m, k]
        return (solved.mT / self.damping).to(self.grads.dtype)
