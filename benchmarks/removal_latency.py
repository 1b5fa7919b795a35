"""Measured CPU speed-up of physically removed channels: ResNet-50 and MobileNetV2 at 50 %.

torchvision's ResNet-50 and MobileNetV2 (``weights=None``, 1000 classes) are pruned to 50 % of
their channel structures with the ``magnitude`` scorer (channel L1 norms, normalised per group)
and the ``channel`` mask (``scope = "layerwise"``), the pruned structures are removed
(``Pipeline.remove``), and the full-width and the smaller model are timed on 224×224 inputs at
batch 1 and 32 with :func:`curvprune.run.latency.latency_record` (alternating rounds, medians),
the thread count of the machine. FLOPs and parameters come from the removal record.

Run it from the repository root on a quiet machine::

    python benchmarks/removal_latency.py            # both models at 224×224 (a few minutes)
    python benchmarks/removal_latency.py --quick    # MobileNetV2 at 64×64, batch 1 and 4
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torchvision

from _machine import describe

HEADLINE = r"^ratio\b.*$"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    from curvprune import Pipeline
    from curvprune.run.latency import latency_record

    names, size, batches = ("resnet50", "mobilenet_v2"), 224, (1, 32)
    if args.quick:
        names, size, batches = ("mobilenet_v2",), 64, (1, 4)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"threads {torch.get_num_threads()}; input {size}×{size}, 50 % of channel structures")
    print()
    print("| model | parameters before → after | FLOPs before → after | batch | dense (ms) | "
          "pruned (ms) | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    headline = []
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        example = torch.randn(2, 3, size, size)
        pipeline = Pipeline.from_config({
            "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1",
                       "extent": "producers"},
            "mask": {"name": "channel", "scope": "layerwise"},
            "prune": {"sparsity": 0.5, "loss_samples": 0},
        })
        result = pipeline.prune(model, None)
        dense = copy.deepcopy(model)
        removal = pipeline.remove(model, result.masks, example_input=example)
        record = removal.to_json()
        latency = latency_record(dense, model, example, batch_sizes=batches)
        for b, figures in latency["batch_sizes"].items():
            print(f"| {name} | {record['params_before'] / 1e6:.1f} M → "
                  f"{record['params_after'] / 1e6:.1f} M | {record['flops_before'] / 1e9:.2f} G → "
                  f"{record['flops_after'] / 1e9:.2f} G | {b} | {figures['dense_ms']:.1f} | "
                  f"{figures['pruned_ms']:.1f} | {figures['speedup']:.2f}× |")
            headline.append(f"{name} batch {b}: {figures['speedup']:.2f}x")
    print()
    print("ratio measured speed-up (dense / pruned latency): " + ", ".join(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
