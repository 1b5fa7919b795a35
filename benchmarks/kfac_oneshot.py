"""One-shot pruning with K-FAC against WoodFisher, the diagonal Fisher and magnitude (digits CNN).

The WoodFisher paper (Singh & Alistarh, NeurIPS 2020, Sec. 6) compares its blockwise inverse with
K-FAC's layerwise Kronecker factorization as the OBS curvature. Here the digits CNN is trained
once; for every sparsity and method a copy of the same dense weights is pruned one-shot with a
``global`` mask through ``Pipeline.prune`` (``obs`` scorer, same damping and number of samples for
every estimator, no fine-tuning) and evaluated on the test set. Prune time (gradients or factors,
inverse, scores, update) is the median over the sparsities, interleaved between methods.

Usage::

    python benchmarks/kfac_oneshot.py            # 15 epochs, m = 256, 1 and 8 steps
    python benchmarks/kfac_oneshot.py --quick    # 2 epochs, m = 32, two levels (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

import torch

from curvprune import Pipeline
from curvprune.config import DataConfig, TrainConfig
from curvprune.run.data import build_data, make_loaders
from curvprune.run.models import DigitsCNN
from curvprune.run.training import evaluate, train

from _machine import describe

HEADLINE = r"^(ratio|accuracy at)\b.*$"


def methods(num_grads: int, damping: float, steps: tuple[int, ...]) -> dict[str, dict]:
    """Pipeline configs by column label (sparsity filled in per level)."""
    out: dict[str, dict] = {"magnitude": {}}
    estimators = {
        "diagfisher": {"name": "diagfisher"},
        "kfac": {"name": "kfac"},
        "woodfisher": {"name": "woodfisher", "block_size": 128},
    }
    for label, est in estimators.items():
        for n in steps if label != "diagfisher" else steps[:1]:
            out[f"{label} ×{n}"] = {
                "estimator": {**est, "damping": damping, "num_grads": num_grads},
                "scorer": {"name": "obs"},
                "schedule": {"name": "oneshot", "steps": n},
            }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, m = 32, two levels")
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust to other processes on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    epochs, num_grads = (2, 32) if args.quick else (15, 256)
    levels = (0.5, 0.9) if args.quick else (0.5, 0.7, 0.8, 0.9, 0.95)
    steps = (1, 2) if args.quick else (1, 8)
    device = torch.device("cpu")

    data_cfg = DataConfig(name="digits")
    train_loader, grad_loader, test_loader = make_loaders(build_data(data_cfg), data_cfg,
                                                          seed=args.seed)
    dense = DigitsCNN()
    train(dense, train_loader, TrainConfig(epochs=epochs, lr=0.05), device=device)
    acc_dense, _ = evaluate(dense, test_loader, device=device)

    configs = methods(num_grads, args.damping, steps)
    accuracy: dict[str, dict[float, float]] = {label: {} for label in configs}
    seconds: dict[str, list[float]] = {label: [] for label in configs}
    for level in levels:  # methods interleaved at each level: contention hits all alike
        for label, cfg in configs.items():
            pipeline = Pipeline.from_config({
                **cfg, "prune": {"sparsity": level, "loss_samples": 0}, "mask": {"name": "global"},
            })
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            pipeline.prune(model, grad_loader)
            seconds[label].append(time.perf_counter() - start)
            accuracy[label][level], _ = evaluate(model, test_loader, device=device)

    import curvlinops

    print(f"machine: {describe()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"curvlinops {curvlinops.__version__ if hasattr(curvlinops, '__version__') else '3.0.1'}")
    print(f"digits CNN, {epochs} epochs, dense test accuracy {100 * acc_dense:.2f} %; "
          f"m = {num_grads} samples, damping {args.damping:g}, WoodFisher B = 128, global mask, "
          f"no fine-tuning, seed {args.seed}")
    print()
    labels = list(configs)
    print("| sparsity | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for level in levels:
        cells = " | ".join(f"{100 * accuracy[label][level]:.2f} %" for label in labels)
        print(f"| {100 * level:.0f} % | {cells} |")
    print()
    print("| method | median prune time (s) |")
    print("|---|---|")
    for label in labels:
        print(f"| {label} | {statistics.median(seconds[label]):.3f} |")
    print()
    top = max(levels)
    one, many = steps[0], steps[-1]
    print(f"accuracy at {100 * top:.0f} %: kfac ×{one} {100 * accuracy[f'kfac ×{one}'][top]:.2f} %, "
          f"woodfisher ×{one} {100 * accuracy[f'woodfisher ×{one}'][top]:.2f} %, "
          f"kfac ×{many} {100 * accuracy[f'kfac ×{many}'][top]:.2f} %, "
          f"woodfisher ×{many} {100 * accuracy[f'woodfisher ×{many}'][top]:.2f} %, "
          f"magnitude {100 * accuracy['magnitude'][top]:.2f} %")
    ratio = statistics.median(seconds[f"kfac ×{one}"]) / statistics.median(
        seconds[f"woodfisher ×{one}"])
    print(f"ratio of prune time, kfac / woodfisher (1 step): {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
