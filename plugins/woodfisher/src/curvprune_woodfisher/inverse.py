"""The damped block inverse of the ``gram`` algorithm: ``(λI + G/m)⁻¹`` per block, in place.

Batched small-matrix LAPACK on the CPU is where the time of the inversion goes, and where
thread contention hurts: torch runs a batched ``cholesky`` or ``cholesky_inverse`` block after
block and lets MKL thread each 128×128 call, which gains nothing with 2 threads and, while
another process holds a core, slowed the batch 5–30× here (docs/benchmarks.md, WoodFisher).
:func:`damped_block_inverse` goes through the blocks in small pieces instead, each factorised
and inverted while it is in cache and written back over its own Gram blocks, with the pieces
shared among worker threads that each run LAPACK on one intra-op thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from curvprune import NumericalError

__all__ = ["INVERT_PIECE_BYTES", "damped_block_inverse"]


def damped_block_inverse(gram: Tensor, m: int, damping: float) -> Tensor:
    """``(λI + G/m)⁻¹`` for a batch of Gram blocks, by Cholesky, in place: returns ``gram``.

    With ``LLᵀ = λI + G/m``, ``torch.cholesky_inverse`` forms ``(LLᵀ)⁻¹`` (LAPACK ``potri``).
    The blocks go through in pieces of :data:`INVERT_PIECE_BYTES`, each piece's inverse
    written over its own damped blocks, so the peak is the batch plus a few pieces (not two
    batches). On the CPU the pieces are shared among ``torch.get_num_threads()`` worker threads,
    each running LAPACK on one intra-op thread: torch runs a batched small-matrix LAPACK call
    block after block and lets MKL thread each 128×128 call, which gains nothing and, while
    another process holds a core, slowed the batch 5–30× (docs/benchmarks.md, WoodFisher).
    Measured against the raw-torch floor (``benchmarks/woodfisher_floor.py``).

    A Gram block summed in precision eps is only known to ±eps·‖G‖: when λ is below that, its
    null directions can come out slightly negative and the Cholesky of λI + G/m breaks down
    (large float32 gradients with λ = 1e-5 do this). Those blocks alone are redone in float64
    with the eigenvalues of G/m clamped at 0, i.e. the inverse for the nearest positive
    semidefinite Gram, a change within the Gram's own rounding error.

    Args:
        gram: ``[n_blocks, B, B]`` sums Σᵢ gᵢgᵢᵀ; overwritten by the inverses.
        m: number of gradients summed into ``gram``.
        damping: λ > 0.

    Returns:
        ``gram``, now holding the block inverses. Raises :class:`curvprune.NumericalError` if
        the Gram matrix overflowed (gradients too large for the dtype).

    """
    gram.div_(m).diagonal(dim1=-2, dim2=-1).add_(damping)
    n_blocks = gram.shape[0]
    step = max(1, INVERT_PIECE_BYTES // max(1, gram[0].numel() * gram.element_size()))
    pieces = [(lo, min(lo + step, n_blocks)) for lo in range(0, n_blocks, step)]
    workers = torch.get_num_threads() if gram.device.type == "cpu" else 1
    retries: list[tuple[Tensor, Tensor]] = []
    if workers > 1 and len(pieces) > 1:
        shares = [pieces[w::workers] for w in range(workers)]
        try:
            with ThreadPoolExecutor(workers) as pool:
                for found in pool.map(_invert_pieces_single_thread, [gram] * workers, shares):
                    retries += found
        finally:
            torch.set_num_threads(workers)  # MKL's thread count is process-wide: restore it
    else:
        retries = _invert_pieces(gram, pieces)
    if retries:
        failed = torch.cat([index for index, _ in retries])
        damped = torch.cat([blocks for _, blocks in retries])
        if not bool(torch.isfinite(damped).all()):
            raise NumericalError(
                f"the Gram matrix of {failed.numel()} woodfisher block(s) overflowed in "
                f"{gram.dtype}; use dtype = 'float64'"
            )
        gram[failed] = _clamped_inverse(damped, damping).to(gram.dtype)
    return gram


#: Bytes of blocks inverted at a time by :func:`damped_block_inverse`. Its work space is one
#: such piece per worker thread on the CPU (the Cholesky factor) and two elsewhere (the inverse
#: and its selection); small pieces cost nothing measurable (LAPACK runs block by block anyway).
INVERT_PIECE_BYTES = 2**20


def _invert_pieces(gram: Tensor, pieces: list[tuple[int, int]], per_piece: bool | None = None
                   ) -> list[tuple[Tensor, Tensor]]:
    """Invert the damped blocks ``gram[lo:hi]`` of each piece in place, by Cholesky.

    Returns ``(block indices, float64 damped blocks)`` of the blocks whose Cholesky failed,
    read before their slots are overwritten. With ``per_piece`` (the default on the CPU, where
    a host sync costs nothing) the failures are read per piece and ``cholesky_inverse`` writes
    straight into the piece; otherwise the inverse is selected with ``torch.where`` (failed
    blocks keep their damped matrix) and one host sync at the end finds them.
    """
    if per_piece is None:
        per_piece = gram.device.type == "cpu"
    retries: list[tuple[Tensor, Tensor]] = []
    infos: list[Tensor] = []
    for lo, hi in pieces:
        part = gram[lo:hi]
        chol, info = torch.linalg.cholesky_ex(part)
        if per_piece:
            bad = info.nonzero().squeeze(1)
            if bad.numel():
                retries.append((bad + lo, part[bad].to(torch.float64)))
                chol[bad] = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
            torch.cholesky_inverse(chol, out=part)
        else:
            ok = (info == 0).view(-1, 1, 1)
            eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
            chol.copy_(torch.where(ok, chol, eye))  # failed factors: a placeholder, unused
            inverse = torch.cholesky_inverse(chol)
            del chol  # two pieces alive at most: the inverse and the selection
            part.copy_(torch.where(ok, inverse, part))
            infos.append(info)
    if infos:
        info = torch.cat(infos)
        starts = torch.cat([torch.full((hi - lo,), lo, device=info.device)
                            for lo, hi in pieces])
        offsets = torch.cat([torch.arange(hi - lo, device=info.device) for lo, hi in pieces])
        bad = info.nonzero().squeeze(1)  # one host sync
        if bad.numel():
            index = starts[bad] + offsets[bad]
            retries.append((index, gram[index].to(torch.float64)))
    return retries


def _invert_pieces_single_thread(gram: Tensor, pieces: list[tuple[int, int]]
                                 ) -> list[tuple[Tensor, Tensor]]:
    """:func:`_invert_pieces` with LAPACK on one intra-op thread (run in a worker thread)."""
    torch.set_num_threads(1)
    return _invert_pieces(gram, pieces)


def _clamped_inverse(damped: Tensor, damping: float) -> Tensor:
    """``(λI + G₊/m)⁻¹`` from ``damped = λI + G/m``, G₊ the PSD part of G (float64 eigh)."""
    gram = damped - damping * torch.eye(damped.shape[-1], dtype=damped.dtype,
                                        device=damped.device)
    eigvals, eigvecs = torch.linalg.eigh(gram)
    scale = (damping + eigvals.clamp_min(0)).rsqrt()
    root = eigvecs * scale.unsqueeze(-2)
    return root @ root.mT
