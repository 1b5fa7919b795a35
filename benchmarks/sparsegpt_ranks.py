"""Sequential SparseGPT split over ranks: one process against two gloo ranks, one thread each.

A GPT-2-shaped model built from ``transformers.GPT2Config`` (``--blocks`` blocks of width
``--width``, 8 heads, a 1000-token vocabulary; random weights, nothing is downloaded) is pruned
to 50 % unstructured (``layerwise``) with the ``sparsegpt`` estimator and the ``obs`` scorer,
sequential calibration block by block, on ``--samples`` sequences of ``--seq`` random tokens:

* in **one process**, no process group, one thread;
* in **two gloo ranks**, one thread each: every rank caches and forwards half of the
  calibration samples; each block's four layers get one owner each, balanced by the sweep's
  cost (``rows·d² + d³``), each layer's Σxxᵀ is reduced to its owner alone, the owners sweep
  their layers and one all-gather per block gives every rank all results.

Each side runs in its own processes (fresh peaks), ``--rounds`` rounds one after the other,
medians. Reported: wall seconds of ``Pipeline.prune`` (the slower rank), CPU seconds of the
busier rank, the wall and CPU seconds inside the sweeps (the factorizations and sweeps a rank
ran: one process, all layers; a rank, its own), the peak resident set during the prune per
process and its growth over the prune, and the plan per rank::

    python benchmarks/sparsegpt_ranks.py            # 4 blocks of width 512, 64 × 128 tokens
    python benchmarks/sparsegpt_ranks.py --quick    # 2 blocks of width 64 (smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from _machine import describe

HEADLINE = r"^ratio .*$"
MiB = 2**20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 blocks of width 64, 1 round")
    parser.add_argument("--side", choices=("one", "two"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.samples, args.seq, args.rounds = 2, 64, 8, 32, 1
    return args


def _setup(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    import transformers

    from curvprune import Pipeline

    config = transformers.GPT2Config(n_layer=args.blocks, n_embd=args.width, n_head=8,
                                     vocab_size=1000, n_positions=args.seq,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1000, (args.samples, args.seq),
                        generator=torch.Generator().manual_seed(0))
    batches = [(ids[i : i + 8], ids[i : i + 8]) for i in range(0, args.samples, 8)]
    pipeline = Pipeline.from_config({
        "estimator": {"name": "sparsegpt", "num_grads": args.samples},
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot"},
        "mask": {"name": "layerwise"},
        "prune": {"sparsity": 0.5, "loss_samples": 0},
    })
    return model, batches, pipeline


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _count_sweep_cpu(into: list[float]) -> None:
    """Add the CPU seconds of every layer's factorization and sweep to ``into[0]`` (the wall
    time the estimator reports counts the waits of a machine shared with other work)."""
    from curvprune_sparsegpt.estimator import SparseGPTEstimator

    def counted(method: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                into[0] += time.process_time() - started

        return run

    for name in ("_factor", "_prune_layer"):
        setattr(SparseGPTEstimator, name, counted(getattr(SparseGPTEstimator, name)))


def _prune(args: argparse.Namespace) -> dict[str, Any]:
    """One prune in this process (alone or as one rank); its figures."""
    from curvprune import distributed
    from curvprune.run.measure import peak_memory, reset_peak_rss

    sweep_cpu = [0.0]
    _count_sweep_cpu(sweep_cpu)
    model, batches, pipeline = _setup(args)
    world = distributed.world_size()
    plan = pipeline.plan(model, world_size=world, example=batches[0])
    distributed.barrier()  # the ranks start the clock together
    before = _rss()
    reset = reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    result = pipeline.prune(model, batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    step = result.steps[-1]
    if step.ranks:  # the per-rank meter resets the high-water mark at every phase: its peaks
        mine = step.ranks[distributed.rank()]
        peak = max(mine.get("collect_peak_bytes") or 0, mine.get("answer_peak_bytes") or 0)
    else:
        peak, _ = peak_memory(torch.device("cpu"), reset)
    return {
        "wall": wall, "cpu": cpu,
        "sweeps": getattr(pipeline.estimator, "inner_seconds", math.nan),  # nan before #17
        "sweep_cpu": sweep_cpu[0],
        "fit": step.times["gradients"], "peak": peak, "before": before,
        "plan": plan.total_bytes, "plan_estimator": plan.memory["estimator"],
        "selected": plan.layout.d, "sparsity": step.sparsity,
        "weights": result.masks.flat.sum().item(),
    }


def _worker(rank: int, world_size: int, argv: list[str]) -> dict[str, Any]:
    return _prune(parse_args(argv))


def _one_process(argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__)), *argv, "--side", "one"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.side == "one":
        print(json.dumps(_prune(args)))
        return 0
    import transformers

    from curvprune.testing.distributed import run_distributed

    one, two = [], []
    for _ in range(args.rounds):
        one.append(_one_process(argv))
        two.append(run_distributed(_worker, (argv,), world_size=2, timeout=3000))
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, one thread per "
          f"process; GPT-2 {args.blocks} blocks of width {args.width} ({one[0]['selected']:,} "
          f"selected weights), {args.samples} sequences of {args.seq} tokens; {args.rounds} "
          f"round(s), medians")
    assert all(r["weights"] == one[0]["weights"] for pair in two for r in pair)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    wall1, wall2 = med([o["wall"] for o in one]), med([max(a["wall"] for a in t) for t in two])
    cpu1, cpu2 = med([o["cpu"] for o in one]), med([max(a["cpu"] for a in t) for t in two])
    print()
    print("| run | rank | wall (s) | CPU (s) | sweeps: wall (s) | sweeps: CPU (s) | fit + "
          "calibration (s) | peak RSS (MiB) | growth over the prune (MiB) | plan per rank (MiB) "
          "| plan: estimator (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [("1 process", 0, one)] + [("2 ranks", r, [t[r] for t in two]) for r in range(2)]
    for label, rank, runs in rows:
        print(f"| {label} | {rank} | {med([x['wall'] for x in runs]):.2f} | "
              f"{med([x['cpu'] for x in runs]):.2f} | {med([x['sweeps'] for x in runs]):.2f} | "
              f"{med([x['sweep_cpu'] for x in runs]):.2f} | "
              f"{med([x['fit'] for x in runs]):.2f} | {med([x['peak'] for x in runs]) / MiB:.0f} | "
              f"{med([x['peak'] - x['before'] for x in runs]) / MiB:.0f} | "
              f"{runs[0]['plan'] / MiB:.1f} | {runs[0]['plan_estimator'] / MiB:.1f} |")
    sweeps1 = med([o["sweep_cpu"] for o in one])
    sweeps2 = med([max(a["sweep_cpu"] for a in t) for t in two])
    growth1 = med([o["peak"] - o["before"] for o in one])
    growth2 = med([max(a["peak"] - a["before"] for a in t) for t in two])
    print()
    print(f"ratio 2 ranks / 1 process: wall {wall2 / wall1:.2f}×, CPU of the busier rank "
          f"{cpu2 / cpu1:.2f}×, CPU in the sweeps of the busier rank "
          f"{sweeps2 / max(sweeps1, 1e-9):.2f}×, "
          f"growth of the resident set over the prune {growth2 / max(growth1, 1):.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
