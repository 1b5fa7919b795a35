"""WoodFisher ``gram`` streams its gradients: peak memory of one prune beyond the blocks, in chunks.

One process, one ``Pipeline.prune`` step (per-sample gradients, ``woodfisher`` gram B = 128 with
m = 1024 gradients, ``obs`` scores with the OBS update, 50 % global) on an MLP 784-h-10 whose
selected weights number d ≈ 1.6 M (``--d``). Tensor memory is measured as the plan-accuracy
benchmark does (:func:`curvprune.pipeline.memprobe.peak_allocated`: ``torch.profiler``
allocation events on CPU, ``max_memory_allocated`` on CUDA), above what exists before the step
(the model and the data). The figure (issue #17): the peak beyond the ``[n_blocks, B, B]``
block batch, against one chunk of gradient rows (``[C, d]``, C from the pipeline's chunk rule);
the m × d gradient matrix would be m / C chunks. Measured twice: the gradient phase alone as
the pipeline runs it (``GradientSource.iter_grads`` chunks fed to ``update``, then the first
query, which inverts), and the whole step (which adds the weights' snapshot and the scorer's
global selection); ``plan``'s total is printed beside it.

    python benchmarks/woodfisher_memory.py            # d ≈ 1.6 M, m = 1024 (a minute or two)
    python benchmarks/woodfisher_memory.py --quick    # d ≈ 0.1 M, m = 128
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import nn

from curvprune import BlockLayout, GradientSource, Pipeline
from curvprune.pipeline.memprobe import peak_allocated
from curvprune.tensors.gradients import default_chunk_size
from curvprune_woodfisher import WoodFisherConfig, WoodFisherEstimator

from _machine import describe

HEADLINE = r"^ratio .*$"
DEVICES = ("cpu", "cuda")
MiB = 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=float, default=1.6e6)
    parser.add_argument("--grads", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.d, args.grads = 1e5, 128
    device = torch.device(args.device)
    hidden = max(1, round(args.d / 794))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(device)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(128, 784, generator=gen).to(device),
             torch.randint(0, 10, (128,), generator=gen).to(device))
            for _ in range(-(-args.grads // 128))]
    pipeline = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0},
        "estimator": {"name": "woodfisher", "algorithm": "gram", "block_size": 128,
                      "num_grads": args.grads, "damping": 1e-4},
        "scorer": {"name": "obs"},
    })
    plan = pipeline.plan(model, device=device)
    layout = pipeline.select(model)
    d = layout.d
    blocks = BlockLayout.build(layout.sizes, 128)
    batch = blocks.n_blocks * blocks.width**2 * 4
    rows = default_chunk_size(d)
    chunk = rows * d * 4
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, device {device}, float32, torch threads "
          f"{torch.get_num_threads()}")
    print(f"sizes: MLP 784-{hidden}-10, d = {d:,} selected weights, B = 128 "
          f"({blocks.n_blocks} blocks: {batch / MiB:.1f} MiB), m = {args.grads}, chunks of "
          f"{rows} rows ({chunk / MiB:.1f} MiB; m x d would be {args.grads * d * 4 / MiB:.0f} MiB)")
    def stream() -> None:
        """The pipeline's gradient phase through the public API, then the inversion."""
        estimator = WoodFisherEstimator(WoodFisherConfig(
            algorithm="gram", block_size=128, num_grads=args.grads, damping=1e-4))
        estimator.setup(layout.sizes, device=device)
        source = GradientSource(model, layout)
        for rows in source.iter_grads(data, args.grads):
            estimator.update(rows)
            del rows  # as the pipeline does: not alive while the next chunk is computed
        source.check_finite()
        estimator.inverse_diagonal()

    _, streamed = peak_allocated(stream, device)
    _, peak = peak_allocated(lambda: pipeline.prune(model, data), device)
    print(f"plan total {plan.total_bytes / MiB:.1f} MiB "
          f"({', '.join(f'{k} {v / MiB:.1f}' for k, v in plan.memory.items())})")
    print(f"gradients streamed into the Gram and inverted: peak {streamed / MiB:.1f} MiB, "
          f"beyond the block batch {(streamed - batch) / MiB:.1f} MiB")
    print(f"whole prune step: peak {peak / MiB:.1f} MiB (peak / plan "
          f"{peak / plan.total_bytes:.2f}), beyond the block batch {(peak - batch) / MiB:.1f} MiB")
    print(f"ratio streamed peak beyond the blocks / one gradient chunk: "
          f"{(streamed - batch) / chunk:.2f}")
    print(f"ratio step peak beyond the blocks / one gradient chunk: {(peak - batch) / chunk:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
