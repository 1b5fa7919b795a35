"""Two gloo processes against one process: gradient collection and estimator update, ResNet-20.

Both sides compute the same thing, on ResNet-20 (He et al., 2016; 268,336 conv/linear weights)
and ``--num-grads`` per-sample gradients of torchvision FakeData 32×32 images:

* **gradients (local rows)**: ``GradientSource.iter_grads`` as the pipeline runs it for a
  ``"sum"`` estimator: every rank computes half of the chunks, and the mean gradient is
  all-reduced once (``synchronize``);
* **gradients + all-gather**: the same for a ``"gather"`` estimator (woodbury, mfac): every rank
  receives every row, in the single-process order, one all-gather per round of chunks;
* **woodfisher gram update**: ``--block-size`` (128) Gram blocks of each rank's rows, one all-reduce
  of the ``[n_blocks, 128, 128]`` batch, then the batched Cholesky inverse (every rank);
* **mfac static update**: every rank stores all rows and builds Ŵ = C⁻¹G/λ at the first query
  (replicated work: a gathering estimator gains only in the gradient phase).

The two-process side runs in two spawned processes with one torch thread each; the
one-process side runs in rank 0 alone (inside ``curvprune.distributed.local()``), with two
threads (the same cores) and with one, while rank 1 waits at a barrier (gloo's barrier sleeps,
it does not spin). Each round times every phase on both sides, interleaved, and the medians are
reported: wall seconds, and CPU seconds (``time.process_time``: this process's threads, gloo's
included) of one process against those of the busier rank, which estimate the speed-up two free
cores would give even when other work shares the machine. Wall-time ratios are distorted on a
busy machine; run it on a quiet one::

    python benchmarks/distributed_speed.py            # m = 256, 3 rounds
    python benchmarks/distributed_speed.py --quick    # m = 16, B = 16, 1 round: smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from curvprune import GradientSource, create, distributed, select_parameters
from curvprune.testing.distributed import run_distributed

from _machine import describe
from _models import ResNet20

HEADLINE = r"^ratio .*$"
PHASES = ("gradients (local rows)", "gradients + all-gather", "woodfisher gram update",
          "mfac static update")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--num-grads", type=int, default=256, help="per-sample gradients m")
    parser.add_argument("--mfac-grads", type=int, default=64, help="m of the mfac static update")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--chunk", type=int, default=32, help="rows per gradient chunk")
    parser.add_argument("--block-size", type=int, default=128, help="woodfisher block size B")
    parser.add_argument("--quick", action="store_true", help="m = 16, B = 16, 1 round: smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_grads, args.mfac_grads, args.rounds, args.chunk = 16, 8, 1, 4
        args.block_size = 16
    for name in ("num_grads", "mfac_grads", "rounds", "chunk", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _loader(n: int) -> DataLoader:
    from torchvision import transforms
    from torchvision.datasets import FakeData

    data = FakeData(n, (3, 32, 32), 10, transforms.ToTensor(), random_offset=0)
    return DataLoader(data, batch_size=64, shuffle=False)


def _phases(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The four timed phases, as closures over one model and one data set (same on all ranks)."""
    torch.manual_seed(0)
    model = ResNet20()
    layout = select_parameters(model, ("Conv2d", "Linear"), ())
    loader = _loader(args.num_grads)
    rows = torch.cat(list(GradientSource(model, layout, chunk_size=args.chunk)
                          .iter_grads(loader, args.num_grads)))

    def gradients(gather: bool) -> Callable[[], object]:
        def run() -> object:
            source = GradientSource(model, layout, chunk_size=args.chunk)
            for _ in source.iter_grads(loader, args.num_grads, gather=gather):
                pass
            source.synchronize()
            return source.mean()
        return run

    def woodfisher() -> object:
        estimator = create("estimator", "woodfisher", algorithm="gram",
                           block_size=args.block_size, num_grads=args.num_grads)
        estimator.setup(layout.sizes)
        lo, hi = distributed.shard_bounds(rows.shape[0])
        for start in range(lo, hi, args.chunk):
            estimator.update(rows[start : min(start + args.chunk, hi)])
        estimator.all_reduce()
        return estimator.inverse_diagonal()

    def mfac() -> object:
        estimator = create("estimator", "mfac", algorithm="static", num_grads=args.mfac_grads)
        estimator.setup(layout.sizes)
        for start in range(0, args.mfac_grads, args.chunk):
            estimator.update(rows[start : min(start + args.chunk, args.mfac_grads)])
        return estimator.inverse_diagonal()

    return dict(zip(PHASES, (gradients(False), gradients(True), woodfisher, mfac), strict=True))


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds (the slower rank's) and the largest CPU seconds of any rank (this process's
    threads, gloo's included) of one distributed call."""
    distributed.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    cpu = time.process_time() - cpu
    distributed.barrier()  # the slower rank sets the time
    wall = time.perf_counter() - start
    every = distributed.all_gather_rows(torch.tensor([[cpu]], dtype=torch.float64),
                                        [1] * distributed.world_size())
    return wall, float(every.max())


def _worker(rank: int, world_size: int, argv: list[str]) -> dict[str, list[float]]:
    args = parse_args(argv)
    phases = _phases(args)
    times: dict[str, list[float]] = {
        f"{kind}{side}:{p}": [] for p in PHASES for side in ("1x2", "1x1", "2x1")
        for kind in ("", "cpu:")
    }
    first = 0 if args.quick else 1  # a warm-up round before the timed ones (not when quick)
    for round_ in range(1 - first, args.rounds + 1):
        for phase, fn in phases.items():
            # quick: no 2-thread side (on a busy machine 2 threads run ~10x slower than 1)
            for side, threads in ((("1x2", 2),) if not args.quick else ()) + (("1x1", 1),):
                if rank == 0:
                    torch.set_num_threads(threads)
                    with distributed.local():
                        start, cpu = time.perf_counter(), time.process_time()
                        fn()
                        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                    torch.set_num_threads(1)
                    if round_:
                        times[f"{side}:{phase}"].append(elapsed)
                        times[f"cpu:{side}:{phase}"].append(cpu)
                distributed.barrier()
            elapsed, cpu = _timed(fn)
            if round_:
                times[f"2x1:{phase}"].append(elapsed)
                times[f"cpu:2x1:{phase}"].append(cpu)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; ResNet-20 (268,336 weights), FakeData 32×32, m = "
          f"{args.num_grads} per-sample gradients in chunks of {args.chunk}, woodfisher B = "
          f"{args.block_size}, mfac m = "
          f"{args.mfac_grads}; {args.rounds} round(s), medians")
    results = run_distributed(_worker, (argv,), world_size=2, timeout=3600)
    times = results[0]
    median = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    print()
    print("| phase | 1 process × 2 threads (s) | 1 process × 1 thread (s) "
          "| 2 processes × 1 thread (s) | speed-up vs 1×2 | speed-up vs 1×1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase in PHASES:
        one2, one1, two = (median[f"{side}:{phase}"] for side in ("1x2", "1x1", "2x1"))
        print(f"| {phase} | {one2:.3f} | {one1:.3f} | {two:.3f} | {one2 / two:.2f}× "
              f"| {one1 / two:.2f}× |")
    print()
    print("CPU seconds (robust to other load; the 2-process figure is the busier rank's, so "
          "1 process ÷ it is the speed-up a quiet machine with 2 free cores would show):")
    print()
    print("| phase | 1 process × 1 thread, CPU s | 2 processes, busier rank CPU s "
          "| CPU-time speed-up |")
    print("|---|---:|---:|---:|")
    for phase in PHASES:
        one1, two = median[f"cpu:1x1:{phase}"], median[f"cpu:2x1:{phase}"]
        print(f"| {phase} | {one1:.3f} | {two:.3f} | {one1 / two:.2f}× |")
    print()
    for phase in PHASES:
        one1, two = median[f"cpu:1x1:{phase}"], median[f"cpu:2x1:{phase}"]
        print(f"ratio {phase} (CPU time): the busier of 2 ranks uses {two / one1:.2f}× the CPU "
              "time of 1 process × 1 thread")
    for phase in PHASES:
        one1, one2, two = (median[f"{side}:{phase}"] for side in ("1x1", "1x2", "2x1"))
        versus_two = f", {two / one2:.2f}× that of 1 process × 2 threads" if one2 == one2 else ""
        print(f"ratio {phase}: 2 processes × 1 thread take {two / one1:.2f}× the time of 1 process "
              f"× 1 thread{versus_two}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
