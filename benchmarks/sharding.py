"""Sharded curvature state: a one-shot prune in 2 gloo processes against 1 process.

The same prune (one step to 50 %, global OBS mask, ``curvprune.Pipeline`` on an MLP with
``--width`` hidden units: 784-W-W/2-10, ≥ 1 M selected weights at the default W = 1024) runs

* in **one process** (no process group: the whole estimator on one rank), one thread;
* in **two gloo processes**, one thread each, with ``[prune] shard = "auto"``: every rank
  computes half of the per-sample gradients, receives its columns of all of them (one
  all-to-all per round) and holds half of the curvature state.

Two estimators: WoodFisher (gram, B = 128, m = ``--wf-grads``) and unblocked static M-FAC
(m = ``--mfac-grads``, coupled sharding: one all-reduce of the m×m Gram matrix, one of Ŵx per
product). The one-process side runs on rank 0 inside ``curvprune.distributed.local()`` while
rank 1 waits at a barrier, interleaved with the two-process side round by round; medians.

Reported per estimator: the wall seconds of ``Pipeline.prune`` (the two-process figure is the
slower rank's), the CPU seconds of the busier rank (robust to other load on the machine), the
bytes of estimator state held after the step (``tensor_bytes`` of the estimator: WoodFisher's
block inverses, M-FAC's Ŵ) and the plan's predicted estimator peak per rank::

    python benchmarks/sharding.py            # W = 1024 (1.33 M weights), 3 rounds
    python benchmarks/sharding.py --quick    # W = 128, small m, 1 round: smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvprune import Pipeline, distributed
from curvprune.pipeline.memprobe import tensor_bytes
from curvprune.testing.distributed import run_distributed

from _machine import describe

HEADLINE = r"^ratio .*$"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--width", type=int, default=1024, help="first hidden layer width W")
    parser.add_argument("--wf-grads", type=int, default=512, help="m of woodfisher (gram)")
    parser.add_argument("--mfac-grads", type=int, default=256, help="m of unblocked mfac")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--quick", action="store_true", help="W = 128, small m, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.wf_grads, args.mfac_grads, args.rounds = 128, 64, 32, 1
    return args


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(),
                         nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, 10))


def _data(n: int) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)


def _configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    common = {"scorer": {"name": "obs"}, "schedule": {"name": "oneshot"},
              "mask": {"name": "global"},
              "prune": {"sparsity": 0.5, "loss_samples": 0, "gradient_chunk": 32}}
    return {
        "woodfisher gram, B = 128": {
            **common, "estimator": {"name": "woodfisher", "algorithm": "gram", "block_size": 128,
                                    "num_grads": args.wf_grads, "damping": 1e-4}},
        "mfac static, unblocked": {
            **common, "estimator": {"name": "mfac", "algorithm": "static", "block_size": None,
                                    "num_grads": args.mfac_grads, "fisher_mini_batch": 1,
                                    "damping": 1e-4}},
    }


def _one(config: dict[str, Any], args: argparse.Namespace, world: int) -> dict[str, float]:
    model = _model(args.width)
    pipeline = Pipeline.from_config(config)
    planned = pipeline.plan(model, world_size=world).memory["estimator"]
    data = _data(max(args.wf_grads, args.mfac_grads))
    wall, cpu = time.perf_counter(), time.process_time()
    pipeline.prune(model, data)
    return {
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "held": float(tensor_bytes(pipeline.estimator)),
        "planned": float(planned),
        "weights": float(sum(p.numel() for p in model.parameters() if p.dim() > 1)),
    }


def _worker(rank: int, world_size: int, argv: list[str]) -> dict[str, list[dict[str, float]]]:
    args = parse_args(argv)
    out: dict[str, list[dict[str, float]]] = {}
    for name, config in _configs(args).items():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            if rank == 0:
                with distributed.local():
                    single = _one(config, args, 1)
            distributed.barrier()
            sharded = _one(config, args, world_size)
            if round_:
                out.setdefault(f"{name}|one", []).append(single if rank == 0 else {})
                out.setdefault(f"{name}|two", []).append(sharded)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    ranks = run_distributed(_worker, (list(argv or sys.argv[1:]),), world_size=2, timeout=3000)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; MLP 784-{args.width}-{args.width // 2}-10, one thread per "
          f"process, {args.rounds} rounds (medians)")
    print()
    print("| estimator | selected weights | 1 process (s) | 2 ranks (s) | wall ratio | CPU ratio "
          "(busier rank) | state held, 1 process | per rank | memory ratio | planned per rank "
          "(1 → 2) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = []
    for name in _configs(args):
        one = ranks[0][f"{name}|one"]
        two = [ranks[r][f"{name}|two"] for r in range(2)]

        def med(rows: list[dict[str, float]], key: str) -> float:
            return statistics.median(row[key] for row in rows)

        wall1 = med(one, "wall")
        wall2 = statistics.median(max(a["wall"], b["wall"]) for a, b in zip(*two, strict=True))
        cpu1 = med(one, "cpu")
        cpu2 = statistics.median(max(a["cpu"], b["cpu"]) for a, b in zip(*two, strict=True))
        held1 = med(one, "held")
        held2 = max(med(two[0], "held"), med(two[1], "held"))
        plan1, plan2 = med(one, "planned"), med(two[0], "planned")
        mib = 2**20
        print(f"| {name} | {int(one[0]['weights']):,} | {wall1:.2f} | {wall2:.2f} | "
              f"{wall2 / wall1:.2f}× | {cpu2 / cpu1:.2f}× | {held1 / mib:.0f} MiB | "
              f"{held2 / mib:.0f} MiB | {held2 / held1:.2f}× | {plan1 / mib:.0f} → "
              f"{plan2 / mib:.0f} MiB |")
        lines.append(f"ratio {name}: 2 ranks take {wall2 / wall1:.2f}× the wall time "
                     f"({cpu2 / cpu1:.2f}× the CPU time of the busier rank) and hold "
                     f"{held2 / held1:.2f}× the estimator state per rank of 1 process")
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
