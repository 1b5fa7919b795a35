"""Physical channel removal: parameters, FLOPs and forward time of masked vs removed ResNets.

Prunes torchvision ResNets (random weights; the figures do not depend on training) with the
core ``channel`` mask over traced structures (L1 filter norms, the same fraction of every
channel group, residual streams included), then removes the pruned channels. Reports the trace
and removal times, parameters and FLOPs (GReg counting rules) before and after, the largest
output difference between the masked and the removed model, and the forward time of both,
timed interleaved (masked, removed, masked, ...) so that load from other processes hits both
alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curvprune  # noqa: E402

from _machine import describe  # noqa: E402

HEADLINE = r"^ratio\b.*$"


def interleaved(fns: Sequence, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, calling them in turn ``repeats`` times (one warm-up)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(arch: str, fraction: float, batch: int, side: int, repeats: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    pipe = curvprune.Pipeline.from_config({
        "prune": {"sparsity": fraction, "loss_samples": 0},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1",
                   "extent": "producers"},
        "mask": {"name": "channel", "scope": "layerwise", "remove": True},
    })
    tick = time.perf_counter()
    graph = curvprune.StructureGraph.trace(model)
    trace_s = time.perf_counter() - tick
    result = pipe.prune(model, None)
    x = torch.randn(batch, 3, side, side)
    removed = copy.deepcopy(model)
    tick = time.perf_counter()
    removal = pipe.remove(removed, result.masks, example_input=x[:1])
    remove_s = time.perf_counter() - tick  # includes counting FLOPs before and after
    with torch.no_grad():
        diff = float((removed(x) - model(x)).abs().max())

        def run_masked() -> None:
            model(x)

        def run_removed() -> None:
            removed(x)

        masked_s, removed_s = interleaved([run_masked, run_removed], repeats)
    return {
        "arch": arch, "fraction": fraction, "groups": len(graph.groups),
        "coupled": sum(g.coupled for g in graph.groups), "trace_s": trace_s,
        "remove_s": remove_s, "removal": removal, "diff": diff,
        "masked_s": masked_s, "removed_s": removed_s,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        archs, fractions, batch, side, repeats = ["resnet18"], [0.5], 2, 16, 2
    else:
        archs, fractions, batch, side, repeats = ["resnet18", "resnet50"], [0.3, 0.5], 32, 32, 9
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; input [{batch}, 3, {side}, {side}], {repeats} interleaved "
          "repeats; random weights")
    rows = [measure(a, f, batch, side, repeats) for a in archs for f in fractions]
    print()
    print("| model | channels removed | groups (coupled) | params before → after | "
          "FLOPs/sample before → after | trace s | remove s | max output diff | "
          "forward masked s | forward removed s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rm = r["removal"]
        print(
            f"| {r['arch']} | {100 * r['fraction']:.0f} % per group | "
            f"{r['groups']} ({r['coupled']}) | "
            f"{rm.params_before / 1e6:.2f} M → {rm.params_after / 1e6:.2f} M | "
            f"{rm.flops_before / 1e6:.0f} M → {rm.flops_after / 1e6:.0f} M | "
            f"{r['trace_s']:.2f} | {r['remove_s']:.2f} | {r['diff']:.1e} | "
            f"{r['masked_s']:.4f} | {r['removed_s']:.4f} | {r['masked_s'] / r['removed_s']:.2f}× |"
        )
    print()
    for r in rows:
        rm = r["removal"]
        print(f"ratio FLOPs before / after, {r['arch']} at {100 * r['fraction']:.0f} %: "
              f"{rm.flops_before / rm.flops_after:.2f}x; forward masked / removed: "
              f"{r['masked_s'] / r['removed_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
