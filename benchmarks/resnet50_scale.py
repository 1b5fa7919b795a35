"""ResNet-50 one-shot WoodFisher on one machine: one process against two sharded ranks.

torchvision ``resnet50(weights=None)`` (1000 classes, 25.5 M selected conv/linear weights),
``--num-grads`` per-sample gradients of random 224×224 images (in chunks of ``--chunk``),
WoodFisher ``gram`` with B = 128, one step to 50 % with a global OBS mask, through
``curvprune.Pipeline``:

* **one process** with ``--threads`` torch threads (the whole d×B block state on one rank);
* **two gloo processes** with one thread each and ``[prune] shard = "auto"`` (each holds half
  the blocks and receives its columns of every gradient, one all-to-all per round).

For each it prints the plan's per-rank total against the measured growth of the resident set
over the prune (``VmHWM`` reset before it, minus the resident set before it: the tensors plus
the allocator's slack, without the interpreter and the model, which exist before), and the
wall time. The runs are long (minutes each on 2 cores): run them on a quiet machine, one side
per process where memory is short (the two ranks need about twice the plan per rank beside
each other; the one-process side's freed memory may stay with its process)::

    python benchmarks/resnet50_scale.py --only one      # m = 1024, one process
    python benchmarks/resnet50_scale.py --only two      # m = 1024, two ranks
    python benchmarks/resnet50_scale.py --quick         # a small model, m = 4: smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torchvision

from curvprune import Pipeline

from _machine import describe
from _scale import measure_prune, run_sides

HEADLINE = r"^ratio .*$"
FULL_ARGS = ("--num-grads", "1024")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--num-grads", type=int, default=1024, help="per-sample gradients m")
    parser.add_argument("--image", type=int, default=224, help="image side")
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process")
    parser.add_argument("--only", choices=("one", "two"), help="run one side only")
    parser.add_argument("--block-size", type=int, default=128, help="woodfisher block size B")
    parser.add_argument("--arch", default="resnet50", help="a torchvision classification model")
    parser.add_argument("--chunk", type=int, default=8, help="[prune] gradient_chunk")
    parser.add_argument("--quick", action="store_true",
                        help="mobilenet_v3_small, m = 4, 64×64, B = 16: smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.num_grads, args.image, args.block_size = "mobilenet_v3_small", 4, 64, 16
    return args


class RandomImages:
    """``n`` random images in batches of 32, made batch by batch (the same on every pass and
    every rank), so no rank holds all n images beside its share of the curvature."""

    def __init__(self, n: int, side: int) -> None:
        self.n, self.side = n, side

    def __iter__(self):
        gen = torch.Generator().manual_seed(1)
        for start in range(0, self.n, 32):
            k = min(32, self.n - start)
            yield (torch.randn(k, 3, self.side, self.side, generator=gen),
                   torch.randint(0, 1000, (k,), generator=gen))


def _prune(args: argparse.Namespace, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None).eval()
    data = RandomImages(args.num_grads, args.image)
    pipeline = Pipeline.from_config({
        "estimator": {"name": "woodfisher", "algorithm": "gram", "block_size": args.block_size,
                      "num_grads": args.num_grads, "damping": 1e-4},
        "scorer": {"name": "obs"}, "schedule": {"name": "oneshot"}, "mask": {"name": "global"},
        "prune": {"sparsity": 0.5, "loss_samples": 0, "gradient_chunk": args.chunk},
    })
    return measure_prune(pipeline, model, data, world)


def _worker(rank: int, world_size: int, argv: list[str]) -> dict[str, Any]:
    return _prune(parse_args(argv), world_size)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; {args.arch}, "
          f"m = {args.num_grads}, {args.image}×{args.image}, chunks of {args.chunk}, "
          f"woodfisher gram B = {args.block_size}, 50 % global")
    print()
    return run_sides(args, argv, _prune, _worker)


if __name__ == "__main__":
    sys.exit(main())
