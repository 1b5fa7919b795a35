"""Second-order one-shot pruning of ResNet-20 (WoodFisher, m = 1024, B = 128) against one training epoch.

What is timed, interleaved in each round so that both see the same machine load:

* **prune**: ``Pipeline.prune`` of ResNet-20 (He et al., 2016; 268,336 conv/linear weights) to
  90 % in one step with ``woodfisher`` (``block_size`` 128, ``num_grads`` 1024 per-sample
  gradients, ``gram``) and ``obs``: the per-sample gradients, the block Gram matrices and their
  inverses, the OBS scores, the global mask and the compensating update (the loss audit is off),
  with ``[prune] gradient_chunk`` = 64 samples per vectorised per-sample-gradient call
  (``--gradient-chunk``; 0 keeps the pipeline's default, 32 rows at this d: its floor, since
  8-row chunks were about 5× slower for this CNN on CPU than 32-128, see docs/benchmarks.md);
* **epoch**: one epoch of SGD (momentum 0.9, batch 128) over 50,000 32×32 images, **estimated**:
  ``--steps`` training steps (forward, backward, optimizer step) are timed and their median is
  scaled by ⌈50,000 / 128⌉ = 391 steps. Data loading is not included (the images are random
  tensors already in memory), which favours the epoch.

The issue expects the one-shot prune to cost at most 0.1× an epoch. Run:

    python benchmarks/oneshot_vs_epoch.py            # 3 rounds of (10 steps, 1 prune)
    python benchmarks/oneshot_vs_epoch.py --quick    # m = 32, B = 32, 2 steps: smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from curvprune import Pipeline

from _machine import describe
from _models import ResNet20

#: the suite runs this on CUDA with --device cuda (python -m benchmarks)
DEVICES = ("cpu", "cuda")
HEADLINE = r"^ratio .*$"

EPOCH_IMAGES, BATCH = 50_000, 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_steps(model: nn.Module, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` SGD steps on random batches of 128 (after one warm-up)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    times = []
    for i in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        _sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return times


def time_prune(model: nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[float, dict]:
    """Seconds of one ``Pipeline.prune`` call and the step's phase times."""
    pipeline = Pipeline.from_config({
        "prune": {"sparsity": 0.9, "loss_samples": 0,
                  **({"gradient_chunk": args.gradient_chunk} if args.gradient_chunk else {})},
        "estimator": {"name": "woodfisher", "block_size": args.block_size,
                      "num_grads": args.num_grads, "damping": 1e-5, "algorithm": "gram"},
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot", "steps": 1},
    })
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.num_grads, 3, 32, 32, generator=g).to(device)
    labels = torch.randint(0, 10, (args.num_grads,), generator=g).to(device)
    batches = [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, args.num_grads, BATCH)]
    _sync(device)
    start = time.perf_counter()
    result = pipeline.prune(model, batches)
    _sync(device)
    return time.perf_counter() - start, result.steps[0].times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-grads", type=int, default=1024, help="m, per-sample gradients")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (steps, one prune)")
    parser.add_argument("--gradient-chunk", type=int, default=64,
                        help="[prune] gradient_chunk (0: the pipeline's default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="m = 32, B = 32, 2 steps, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_grads, args.block_size, args.steps, args.rounds = 32, 32, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = ResNet20().to(device)
    d = sum(m.weight.numel() for m in base.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    epoch_steps = math.ceil(EPOCH_IMAGES / BATCH)
    print(f"machine: {describe()}" + (f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(f"torch {torch.__version__}, device {device}, float32")
    print(f"sizes: ResNet-20, d = {d:,} selected weights; prune: woodfisher gram B = {args.block_size}, "
          f"m = {args.num_grads} per-sample gradients in chunks of "
          f"{args.gradient_chunk or 'default'}, obs, 90 % global, 1 step; epoch: "
          f"{epoch_steps} steps of batch {BATCH} (estimated from {args.steps} timed steps per round), "
          f"{args.rounds} round(s), interleaved")
    step_times, prune_times, phases = [], [], []
    for r in range(args.rounds):
        step_times += time_training_steps(copy.deepcopy(base), args.steps, device)
        seconds, times = time_prune(copy.deepcopy(base), args, device)
        prune_times.append(seconds)
        phases.append(times)
        print(f"round {r}: step median {statistics.median(step_times):.3f} s, prune {seconds:.2f} s "
              f"(gradients {times['gradients']:.2f} s, scores incl. inverse {times['scores']:.2f} s, "
              f"update {times['update']:.2f} s)")
    step = statistics.median(step_times)
    prune = statistics.median(prune_times)
    epoch = step * epoch_steps
    print()
    print("| what | seconds |")
    print("|---|---:|")
    print(f"| one training step (batch {BATCH}, median of {len(step_times)}) | {step:.3f} |")
    print(f"| one epoch, estimated ({epoch_steps} × step) | {epoch:.1f} |")
    print(f"| one-shot prune (median of {len(prune_times)}) | {prune:.2f} |")
    print(f"| of which per-sample gradients | {statistics.median(p['gradients'] for p in phases):.2f} |")
    print(f"| of which inverse, scores and mask | {statistics.median(p['scores'] for p in phases):.2f} |")
    print()
    verdict = "meets" if prune <= 0.1 * epoch else "misses"
    print(f"ratio one-shot prune / one epoch: {prune / epoch:.3f}x ({verdict} the ≤ 0.1x target; "
          f"m = {args.num_grads}, B = {args.block_size}, gradient chunk "
          f"{args.gradient_chunk or 'default'}, {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
