"""WoodFisher ``gram`` against the raw-torch floor at d ≈ 1.6 M, B = 128, m = 1024, 1 and 2 threads.

The estimator's whole life cycle (``setup``, ``update`` with m gradients in chunks of 128 rows,
the first query: Gram accumulation, damping, batched Cholesky, the block inverse) against the
fastest raw-torch sequence for the same math on the same ``[k, d]`` chunks:

* Gram: per chunk, one ``baddbmm`` per run of adjacent full-width blocks on the chunk's strided
  view ``[n, k, B]`` (no copy), the short blocks gathered and padded;
* ``λI + G/m`` in place, ``torch.linalg.cholesky_ex``;
* the full block inverse (the estimator needs it for OBS joint updates and the diagonal), by
  ``torch.cholesky_inverse`` or by ``solve_triangular`` against I + ``bmm`` (both timed; the
  floor is the faster of the two in each round).

Chunks are fed as a :class:`curvprune.GradientSource` yields them (tagged as covered by a source's
deferred finiteness check, which the pipeline runs once, O(d)); ``--raw-chunks`` feeds untagged
tensors, which the estimator scans for NaN/Inf itself before touching its state (a contract of
``update``, work the floor does not do).

Methods are interleaved within each round (one warm-up round, then ``--rounds``), and the figure
is the median over rounds of the per-round ratio estimator / floor. Batched small LAPACK on CPU
slows down many-fold with 2 threads while other processes compete for the cores
(docs/benchmarks.md, WoodFisher): the load average is printed before and after.

    python benchmarks/woodfisher_floor.py              # d ≈ 1.6 M, m = 1024, threads 1 and 2
    python benchmarks/woodfisher_floor.py --quick      # d ≈ 0.1 M, m = 256, threads 1 (seconds)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvprune import BlockLayout
from curvprune_woodfisher import WoodFisherConfig, WoodFisherEstimator

from _machine import describe

HEADLINE = r"^ratio .*$"
DAMPING = 1e-5
CHUNK = 128


class _Covered:
    """Stands in for the GradientSource that yielded a chunk: its deferred check passes."""

    def check_finite(self) -> None:
        return None


def mlp_sizes(d: float) -> tuple[int, int]:
    """Weights of an MLP 784-h-10 with about ``d`` of them (the peers benchmark's models)."""
    hidden = max(1, round(d / 794))
    return 784 * hidden, hidden * 10


def make_chunks(m: int, d: int, covered: bool) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    chunks = []
    for start in range(0, m, CHUNK):
        chunk = torch.randn(min(CHUNK, m - start), d, generator=gen).mul_(1e-3)
        if covered:
            chunk._curvprune_finite_check_by = _Covered()  # type: ignore[attr-defined]
        chunks.append(chunk)
    return chunks


def estimator(sizes: Sequence[int], chunks: list[Tensor], m: int, block: int) -> Tensor:
    est = WoodFisherEstimator(WoodFisherConfig(algorithm="gram", num_grads=m, block_size=block,
                                               damping=DAMPING))
    est.setup(sizes)
    for chunk in chunks:
        est.update(chunk)
    return est.inverse_diagonal()


def floor(blocks: BlockLayout, chunks: list[Tensor], m: int, inverse: str) -> Tensor:
    """Raw torch: Gram on the chunks' block views, damping, Cholesky, full inverse."""
    nb, width = blocks.n_blocks, blocks.width
    lengths = blocks.lengths.tolist()
    starts = blocks.starts.tolist()
    full = [i for i, n in enumerate(lengths) if n == width]
    short = [i for i, n in enumerate(lengths) if n != width]
    # maximal runs of adjacent full blocks
    runs: list[tuple[int, int, int]] = []
    for i in full:
        if runs and runs[-1][0] + runs[-1][1] == i and starts[i] == starts[i - 1] + width:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((i, 1, starts[i]))
    gram = torch.empty(nb, width, width)
    for j, chunk in enumerate(chunks):
        k = chunk.shape[0]
        beta = 0.0 if j == 0 else 1.0
        for first, count, start in runs:
            x = chunk[:, start : start + count * width].view(k, count, width).transpose(0, 1)
            gram[first : first + count].baddbmm_(x.mT, x, beta=beta)
        for i in short:
            x = chunk[:, starts[i] : starts[i] + lengths[i]]
            block = gram[i, : lengths[i], : lengths[i]]
            if j == 0:
                gram[i].zero_()
                torch.mm(x.mT, x, out=block)
            else:
                block.addmm_(x.mT, x)
    gram.div_(m).diagonal(dim1=-2, dim2=-1).add_(DAMPING)
    for i in short:  # padding slots: λ on the diagonal only (the estimator's convention)
        gram[i, lengths[i]:, lengths[i]:].diagonal().fill_(DAMPING)
    chol, _ = torch.linalg.cholesky_ex(gram)
    del gram
    if inverse == "cholesky_inverse":
        return torch.cholesky_inverse(chol)
    eye = torch.eye(width).expand_as(chol)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    del chol
    return torch.bmm(chol_inv.mT, chol_inv)


def rounds(fns: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Warm up once, then ``n`` interleaved rounds; seconds per method per round."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(n + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                out[name].append(time.perf_counter() - start)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=float, default=1.6e6)
    parser.add_argument("--grads", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--raw-chunks", action="store_true",
                        help="feed untagged chunks (the estimator scans each for NaN/Inf)")
    parser.add_argument("--quick", action="store_true",
                        help="d ≈ 0.1 M, m = 256, 1 round, 1 thread")
    args = parser.parse_args(argv)
    if args.quick:
        args.d, args.grads, args.rounds, args.threads = 1e5, 256, 1, [1]
    sizes = mlp_sizes(args.d)
    d, m, width = sum(sizes), args.grads, args.block_size
    blocks = BlockLayout.build(sizes, width)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, float32")
    print(f"sizes: MLP 784-{sizes[1] // 10}-10 weights, d = {d:,}, B = {width}, "
          f"n_blocks = {blocks.n_blocks}, m = {m} in chunks of {CHUNK}, damping {DAMPING}, "
          f"chunks {'untagged (scanned)' if args.raw_chunks else 'as GradientSource yields them'}")
    chunks = make_chunks(m, d, covered=not args.raw_chunks)
    ref = floor(blocks, chunks, m, "cholesky_inverse").diagonal(dim1=-2, dim2=-1)
    got = blocks.pack(estimator(sizes, chunks, m, width).unsqueeze(0))[0]
    valid = blocks.valid()
    diff = float(((got - ref).abs() * valid).max() / ref.abs().max())
    print(f"estimator vs floor inverse diagonal: max rel. difference {diff:.1e}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        times = rounds({
            "estimator": lambda: estimator(sizes, chunks, m, width),
            "floor cholesky_inverse": lambda: floor(blocks, chunks, m, "cholesky_inverse"),
            "floor triangular": lambda: floor(blocks, chunks, m, "triangular"),
        }, args.rounds)
        best = [min(a, b) for a, b in zip(times["floor cholesky_inverse"],
                                          times["floor triangular"], strict=True)]
        ratios = [e / f for e, f in zip(times["estimator"], best, strict=True)]
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"threads {threads} (load average {load:.2f} -> {os.getloadavg()[0]:.2f}): "
              + ", ".join(f"{name} {t:.2f} s" for name, t in med.items()))
        print(f"ratio estimator / floor, {threads} thread(s): {statistics.median(ratios):.2f} "
              f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
