"""M-FAC speed: static IHVP against two plain matrix-vector products, dynamic scaling in m.

1. Static IHVP at d, m (default d = 1e6, m = 1024, float32): the ``mfac`` estimator's ``ihvp``
   of one vector against ``G @ x`` followed by ``G.T @ y`` over a d×m matrix of the same size,
   measured in the same process (the IHVP is two such passes over Ŵ, so the ratio should be
   close to 1).
2. Dynamic window across m = 64…1024 at d (default 1e5): time to push one gradient and refactor
   (O(d·m + m³)) and one IHVP (O(d·m + m²)).

Timings: warm-up, then ``--repeats`` runs, median reported. Run it on a quiet machine::

    python benchmarks/mfac_speed.py            # full sizes (needs ~9 GB of memory)
    python benchmarks/mfac_speed.py --quick    # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

import curvprune

from _machine import describe, median_time

#: the suite's headline: IHVP against two matvecs (python -m benchmarks)
HEADLINE = r"^static IHVP .*$"


def static_vs_matvec(d: int, m: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(m, d, generator=g) * 1e-3
    est = curvprune.create("estimator", "mfac", num_grads=m, damping=1e-5, block_size=None)
    est.setup([d])
    est.update(grads)
    x = torch.randn(d, generator=g)
    start = time.perf_counter()
    est.ihvp(x)  # builds Ŵ in place of G (the one-time precompute)
    precompute = time.perf_counter() - start
    plain = torch.randn(m, d, generator=g)  # a second d×m matrix for the baseline
    t_ihvp = median_time(lambda: est.ihvp(x), repeats)
    t_two = median_time(lambda: plain.T @ (plain @ x), repeats)
    print(f"static precompute d={d} m={m}: {precompute:.3f} s")
    print(f"static IHVP d={d} m={m}: {t_ihvp * 1e3:.2f} ms; two matvecs: {t_two * 1e3:.2f} ms; "
          f"ratio {t_ihvp / t_two:.2f}x")


def dynamic_scaling(d: int, ms: list[int], repeats: int) -> None:
    g = torch.Generator().manual_seed(1)
    for m in ms:
        est = curvprune.create("estimator", "mfac", algorithm="dynamic", num_grads=m,
                               damping=1e-5)
        est.setup([d])
        est.update(torch.randn(m, d, generator=g) * 1e-3)
        new = torch.randn(1, d, generator=g) * 1e-3
        x = torch.randn(d, generator=g)

        def push() -> None:
            est.update(new)
            est._window.factor()  # the O(m³) refactorization an update implies

        t_push = median_time(push, repeats)
        t_ihvp = median_time(lambda: est.ihvp(x), repeats)
        print(f"dynamic d={d} m={m}: update {t_push * 1e3:.2f} ms, IHVP {t_ihvp * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--dynamic-d", type=int, default=100_000)
    parser.add_argument("--ms", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="d = 1e4, m ≤ 128, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.d, args.m, args.dynamic_d, args.ms, args.repeats = 10_000, 64, 10_000, [32, 64], 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, float32")
    static_vs_matvec(args.d, args.m, args.repeats)
    dynamic_scaling(args.dynamic_d, args.ms, args.repeats)


if __name__ == "__main__":
    main()
