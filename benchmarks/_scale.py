"""What the one-machine scale benchmarks share (resnet50_scale, bert_scale): one prune measured
by its resident-set growth against the plan, run in one process and in two gloo ranks, one
side per call where memory is short."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from curvprune import Pipeline, distributed
from curvprune.pipeline.rankstats import phase_peak_bytes, reset_phase_peak
from curvprune.testing.distributed import run_distributed

GiB = 2**30


def resident_bytes() -> int:
    """This process's resident set (``VmRSS``)."""
    for line in open("/proc/self/status"):  # noqa: SIM115 - a short read
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_prune(pipeline: Pipeline, model: torch.nn.Module, data: Iterable[Any],
                  world: int) -> dict[str, Any]:
    """Plan ``model``'s prune for one rank of ``world`` (given one batch, as `curvprune plan`
    and `Pipeline.prune` do), run it, and measure the resident set's growth over the prune
    (``VmHWM`` reset before it, minus the resident set before it: the tensors plus the
    allocator's slack, without the interpreter and the model, which exist before)."""
    plan = pipeline.plan(model, world_size=world, example=next(iter(data)))
    before = resident_bytes()
    measured = reset_phase_peak(torch.device("cpu"))
    started = time.perf_counter()
    result = pipeline.prune(model, data)
    seconds = time.perf_counter() - started
    peak = phase_peak_bytes(torch.device("cpu")) if measured else None
    # under torch.distributed each phase restarts the high-water mark (the per-rank report):
    # the prune's peak is the largest of the phases' and what came after the last
    me = [r for step in result.steps for r in (step.ranks or [])
          if r.get("rank") == distributed.rank()]
    for r in me:
        for key in ("collect_peak_bytes", "answer_peak_bytes"):
            if peak is not None and r.get(key) is not None:
                peak = max(peak, int(r[key]))
    return {
        "seconds": seconds, "planned": plan.total_bytes, "memory": dict(plan.memory),
        "growth": None if peak is None else peak - before, "d": plan.layout.d,
        "sparsity": result.sparsity, "kept": int(result.masks.flat.sum()),
        "ranks": result.steps[0].ranks,
    }


def report(name: str, results: list[dict[str, Any]]) -> None:
    """One side's rows, printed (and flushed) as soon as it is measured."""
    for rank, r in enumerate(results):
        growth = r["growth"]
        ratio = "–" if growth is None else f"{growth / r['planned']:.2f}"
        shown = "–" if growth is None else f"{growth / GiB:.2f}"
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in r["memory"].items())
        print(f"| {name} | {rank} | {r['seconds']:.0f} | {r['planned'] / GiB:.2f} ({parts}) | "
              f"{shown} | {ratio} |", flush=True)


def run_sides(args: argparse.Namespace, argv: Sequence[str] | None,
              prune: Callable[[argparse.Namespace, int], dict[str, Any]],
              worker: Callable[..., dict[str, Any]]) -> int:
    """The one-process side (``args.threads`` threads) and the two-rank side (one thread
    each; ``worker(rank, world, argv)`` at module level, pickled by reference), or the one
    ``args.only`` names; prints the table and one ``ratio`` line per rank."""
    print("| run | rank | wall (s) | plan per rank (GiB: parts) | measured growth (GiB) | "
          "measured / plan |")
    print("|---|---:|---:|---|---:|---:|", flush=True)
    rows = []
    if args.only in (None, "one"):
        torch.set_num_threads(args.threads)
        rows.append((f"1 process × {args.threads} threads", [prune(args, 1)]))
        report(*rows[-1])
        gc.collect()  # the one-process state is gone before the ranks start
    if args.only in (None, "two"):
        ranks = run_distributed(worker, (list(argv or sys.argv[1:]),), world_size=2,
                                timeout=7200)
        rows.append(("2 ranks × 1 thread", ranks))
        report(*rows[-1])
    print()
    for name, results in rows:
        for r in results[0]["ranks"] or []:  # the step's per-rank phases (seconds, peaks)
            print(f"{name}, rank {r['rank']}: " + ", ".join(
                f"{k} {v:.1f} s" for k, v in r.items() if isinstance(v, float)))
    print()
    for name, results in rows:
        for rank, r in enumerate(results):
            shown = "–" if r["growth"] is None else f"{r['growth'] / r['planned']:.2f}"
            print(f"ratio {name}, rank {rank}: measured / plan {shown} ({r['seconds']:.0f} s, "
                  f"plan {r['planned'] / GiB:.2f} GiB, d = {r['d']:,}, kept {r['kept']:,})")
    return 0
