"""Where ``woodbury`` beats ``gram``: the crossover behind ``algorithm = "auto"``.

Times the ``woodfisher`` estimator end to end (``setup``, ``update``, first query) with both
algorithms for a few m per block width B, at a ResNet-20-sized d, float32, in this one process
(minimum of ``--repeats`` runs). ``auto`` picks ``woodbury`` when ``m · AUTO_WOODBURY_RATIO <= B``;
the table shows the measured ratio woodbury/gram next to that rule::

    python benchmarks/woodfisher_auto.py                # B = 32, 128; m = 2 ... 64
    python benchmarks/woodfisher_auto.py --quick        # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch

from curvprune_woodfisher import WoodFisherConfig, WoodFisherEstimator
from curvprune_woodfisher.estimator import AUTO_WOODBURY_RATIO, choose_algorithm

from _machine import describe

D = 268_336


def fit_seconds(algorithm: str, d: int, block_size: int, grads: torch.Tensor, repeats: int
                ) -> float:
    config = WoodFisherConfig(algorithm=algorithm, block_size=block_size,
                              num_grads=grads.shape[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        est = WoodFisherEstimator(config)
        est.setup([d])
        est.update(grads)
        est.inverse_diagonal()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--grads", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="d = 4,096, m = 2 and 8, 1 repeat")
    args = parser.parse_args(argv)
    d = D
    if args.quick:
        d, args.grads, args.blocks, args.repeats = 4096, [2, 8], [32], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, d = {d:,}, float32")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| B | m | woodbury s | gram s | woodbury/gram | auto picks |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for block in args.blocks:
        for m in args.grads:
            grads = torch.randn(m, d, generator=gen) * 1e-3
            fit_seconds("gram", d, block, grads, 1)  # warm-up
            t_wb = fit_seconds("woodbury", d, block, grads, args.repeats)
            t_gram = fit_seconds("gram", d, block, grads, args.repeats)
            pick = choose_algorithm(WoodFisherConfig(num_grads=m), block)
            print(f"| {block} | {m} | {t_wb:.3f} | {t_gram:.3f} | {t_wb / t_gram:.2f} | {pick} |")
    print(f"load average after: {os.getloadavg()[0]:.2f} (rule: woodbury iff m·"
          f"{AUTO_WOODBURY_RATIO} <= B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
