"""WoodFisher block inverse: ``gram`` against the raw-torch floor and ``woodbury``; peak memory.

For a ResNet-20-sized parameter set (the 20 conv/linear weights of ResNet-20: d = 268,336, so
2,097 blocks of B = 128, one of them short) and m random float32 gradients:

* **gram vs floor**: the estimator end to end (``setup``, ``update`` in chunks of 128 rows, first
  query: Gram accumulation, batched Cholesky, inverse) against the floor of raw torch ops for the
  same work on gradients already packed into blocks: one ``bmm`` Gram, one batched
  ``cholesky``, and the inverse by ``cholesky_inverse`` or by a triangular solve + GEMM (both
  shown; the estimator uses the latter);
* **gram vs woodbury**: the paper's rank-1 recursion over the same gradients, and the largest
  difference of the two inverses (``inverse_diagonal`` and one ``ihvp``), relative;
* **memory**: each algorithm runs in a fresh subprocess; its peak resident memory above the
  baseline (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with the gradient
  chunk already allocated) against ``memory_bytes``.

Timings are the minimum over ``--repeats`` runs in this one process (``woodbury`` once: it is
slow). Batched small-matrix LAPACK on CPU slows down many-fold when other processes compete for
the cores, so run it on a quiet machine; the load average is printed before and after::

    python benchmarks/woodfisher_inverse.py            # m = 256 and 1024, 3 repeats
    python benchmarks/woodfisher_inverse.py --quick    # CI-sized smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from curvprune import BlockLayout
from curvprune_woodfisher import WoodFisherConfig, WoodFisherEstimator

from _machine import describe

#: the suite's headline: gram against floor and woodbury (python -m benchmarks)
HEADLINE = r"^m = .*$"

#: ResNet-20 (CIFAR): stem 3→16, 6 convs 16→16, 16→32 + 5 × 32→32, 32→64 + 5 × 64→64, fc 64→10.
RESNET20_SIZES = (432, *[2304] * 6, 4608, *[9216] * 5, 18432, *[36864] * 5, 640)
QUICK_SIZES = (48, 576, 576, 1152, 160)
DAMPING = 1e-5
CHUNK = 128


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--grads", type=int, nargs="+", default=[256, 1024], help="values of m")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of gram and floor")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--quick", action="store_true",
                        help="small CI-sized run: d = 2,512, B = 32, m = 32, 1 repeat")
    parser.add_argument("--memory-child", nargs=2, metavar=("ALGORITHM", "M"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = RESNET20_SIZES
    if args.quick:
        args.sizes, args.grads, args.block_size, args.repeats = QUICK_SIZES, [32], 32, 1
    if args.repeats < 1 or args.block_size < 1 or min(args.grads) < 1:
        parser.error("--repeats, --block-size and --grads must be >= 1")
    return args


# -- measurement helpers -----------------------------------------------------------------------
def best_of(repeats: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def config(algorithm: str, m: int, block_size: int) -> WoodFisherConfig:
    return WoodFisherConfig(algorithm=algorithm, num_grads=m, block_size=block_size,
                            damping=DAMPING)


def fit(algorithm: str, sizes: Sequence[int], grads: Tensor, block_size: int
        ) -> WoodFisherEstimator:
    """setup, update in CHUNK-row chunks, first query (which inverts, for gram)."""
    est = WoodFisherEstimator(config(algorithm, grads.shape[0], block_size))
    est.setup(sizes)
    for start in range(0, grads.shape[0], CHUNK):
        est.update(grads[start : start + CHUNK])
    est.inverse_diagonal()
    return est


def floor(packed: Tensor, m: int, inverse: str) -> Tensor:
    """Raw ops: Gram of pre-packed [n_blocks, m, B] gradients, Cholesky, inverse."""
    gram = torch.bmm(packed.mT, packed)
    gram.div_(m).diagonal(dim1=-2, dim2=-1).add_(DAMPING)
    chol = torch.linalg.cholesky(gram)
    del gram
    if inverse == "cholesky_inverse":
        return torch.cholesky_inverse(chol)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype).expand_as(chol)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return chol_inv.mT @ chol_inv


def gradients(m: int, d: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen) * 1e-3


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- memory (fresh process) --------------------------------------------------------------------
def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def memory_child(algorithm: str, m: int, sizes: Sequence[int], block_size: int) -> None:
    """Print peak RSS above baseline (bytes) for one estimator run, as JSON."""
    d = sum(sizes)
    chunk = gradients(min(CHUNK, m), d)
    # Warm up on a small problem first: thread pools and LAPACK workspaces are not the estimator's.
    fit(algorithm, [4 * block_size], gradients(m, 4 * block_size), block_size)
    est = WoodFisherEstimator(config(algorithm, m, block_size))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    baseline = _kib("VmRSS")
    est.setup(sizes)
    fed = 0
    while fed < m:
        rows = min(chunk.shape[0], m - fed)
        est.update(chunk[:rows])
        fed += rows
    est.inverse_diagonal()
    peak = (_kib("VmHWM") - baseline) * 1024
    print(json.dumps({"peak": peak, "memory_bytes": WoodFisherEstimator.memory_bytes(
        sizes, est.config)}))


def measure_memory(args: argparse.Namespace, algorithm: str, m: int) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--memory-child", algorithm, str(m),
           "--block-size", str(args.block_size)]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.sizes,
                     args.block_size)
        return 0
    blocks = BlockLayout.build(args.sizes, args.block_size)
    d = sum(args.sizes)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, float32")
    print(f"d = {d:,}, B = {args.block_size}, n_blocks = {blocks.n_blocks}, "
          f"damping = {DAMPING}, chunks of {CHUNK} rows")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    for m in args.grads:
        grads = gradients(m, d)
        packed = blocks.pack(grads).transpose(0, 1).contiguous()  # [n_blocks, m, B]
        fit("gram", args.sizes, grads, args.block_size)  # warm-up
        t_gram = best_of(args.repeats, partial(fit, "gram", args.sizes, grads, args.block_size))
        t_floor_ci = best_of(args.repeats, partial(floor, packed, m, "cholesky_inverse"))
        t_floor_ts = best_of(args.repeats, partial(floor, packed, m, "triangular"))
        del packed
        start = time.perf_counter()
        woodbury = fit("woodbury", args.sizes, grads, args.block_size)
        t_woodbury = time.perf_counter() - start
        gram = fit("gram", args.sizes, grads, args.block_size)
        v = gradients(1, d, seed=1)[0]
        agree = max(relative_difference(woodbury.inverse_diagonal(), gram.inverse_diagonal()),
                    relative_difference(woodbury.ihvp(v), gram.ihvp(v)))
        del woodbury, gram, grads
        mem = {alg: measure_memory(args, alg, m) for alg in ("gram", "woodbury")}
        row = {
            "m": m, "gram_s": t_gram, "floor_cholesky_inverse_s": t_floor_ci,
            "floor_triangular_s": t_floor_ts, "woodbury_s": t_woodbury,
            "gram_over_floor": t_gram / min(t_floor_ci, t_floor_ts),
            "woodbury_over_gram": t_woodbury / t_gram, "relative_difference": agree,
            **{f"{alg}_peak_bytes": mem[alg]["peak"] for alg in mem},
            **{f"{alg}_memory_bytes": mem[alg]["memory_bytes"] for alg in mem},
        }
        rows.append(row)
        print(f"m = {m}: gram {t_gram:.3f} s | floor {t_floor_ts:.3f} s (triangular) "
              f"{t_floor_ci:.3f} s (cholesky_inverse) | woodbury {t_woodbury:.2f} s | "
              f"gram/floor {row['gram_over_floor']:.2f}x | woodbury/gram "
              f"{row['woodbury_over_gram']:.1f}x | max rel. difference {agree:.1e}")
        for alg in ("gram", "woodbury"):
            peak, plan = mem[alg]["peak"], mem[alg]["memory_bytes"]
            print(f"  memory {alg}: peak {peak / 2**20:.1f} MiB vs memory_bytes "
                  f"{plan / 2**20:.1f} MiB ({peak / plan:.2f}x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": describe(), "torch": torch.__version__, "d": d,
                       "block_size": args.block_size, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
