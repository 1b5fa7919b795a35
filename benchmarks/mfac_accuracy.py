"""M-FAC pruning quality: digits MLP and CNN, one-shot OBS at 90/95/98 % in 8 geometric steps.

Methods, all with the same m (``num_grads``), mini-batch and damping: ``mfac`` unblocked (one
block over all selected weights), ``mfac`` with 128-wide blocks, ``woodfisher`` with 128-wide
blocks (if the plugin is installed; same F⁻¹ as ``mfac`` at equal blocks), and global magnitude.
Each dense model is trained once (Adam, fixed seed); every method prunes a deep copy of it, and
every seed draws the same gradient batches for every method. Reported per run: test accuracy
right after pruning (no fine-tuning), the summed predicted (Σ OBS saliency) and measured loss
change over the steps on the audit samples, and the wall time of ``Pipeline.prune``::

    python benchmarks/mfac_accuracy.py            # both models, 90/95/98 %, 8 steps
    python benchmarks/mfac_accuracy.py --seeds 3  # mean and range over 3 gradient draws
    python benchmarks/mfac_accuracy.py --quick    # MLP, 95 %, 2 steps, m = 64, 5 epochs

The last lines are a Markdown table (mean test accuracy; with several seeds, min–max too).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune.config import DataConfig
from curvprune.run.data import build_data
from curvprune.run.models import DigitsCNN, DigitsMLP

from _digits import accuracy, train_adam
from _machine import describe

MODELS = {"digits-mlp": DigitsMLP, "digits-cnn": DigitsCNN}


def methods(args: argparse.Namespace) -> dict[str, dict[str, Any] | None]:
    """Label → ``[estimator]`` table (None: magnitude, no estimator)."""
    common = {"num_grads": args.num_grads, "damping": args.damping,
              "fisher_mini_batch": args.fisher_mini_batch}
    blocked = {"block_size": args.block_size, **common}
    out: dict[str, dict[str, Any] | None] = {
        "mfac unblocked": {"name": "mfac", **common, "block_size": None},
        # per-parameter blocks, as the figures in docs/benchmarks.md ("alive": fidelity.py)
        f"mfac B={args.block_size}": {"name": "mfac", "blocks": "fixed", **blocked},
    }
    if "woodfisher" in curvprune.get_plugin_manager().registry.names("estimator"):
        out[f"woodfisher B={args.block_size}"] = {"name": "woodfisher", **blocked}
    out["magnitude"] = None
    return out


def prune(dense: nn.Module, train_set: TensorDataset, estimator: dict[str, Any] | None,
          sparsity: float, steps: int, seed: int) -> tuple[nn.Module, curvprune.PruneResult]:
    """Prune a copy of ``dense`` one-shot to ``sparsity`` in ``steps`` geometric sub-steps."""
    cfg: dict[str, Any] = {
        "prune": {"sparsity": sparsity},
        "schedule": {"name": "oneshot", "steps": steps, "spacing": "geometric"},
        "scorer": {"name": "obs" if estimator else "magnitude"},
        "run": {"seed": seed},
    }
    if estimator:
        cfg["estimator"] = estimator
    model = copy.deepcopy(dense)
    loader = DataLoader(train_set, batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    result = curvprune.Pipeline.from_config(cfg).prune(model, loader)
    return model, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-grads", type=int, default=256)
    parser.add_argument("--fisher-mini-batch", type=int, default=32)
    parser.add_argument("--damping", type=float, default=1e-6)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=1, help="gradient draws per cell")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sparsities, args.steps = ["digits-mlp"], [0.95], 2
        args.epochs, args.num_grads, args.seeds = 5, 64, 1
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; steps {args.steps} (geometric), num_grads {args.num_grads}, "
          f"fisher_mini_batch {args.fisher_mini_batch}, damping {args.damping:g}, "
          f"block_size {args.block_size}, epochs {args.epochs}, seeds {args.seeds}")
    bundle = build_data(DataConfig(name="digits"))
    table: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    dense_acc: dict[str, float] = {}
    labels = list(methods(args))
    for name in args.models:
        torch.manual_seed(0)  # the initialisation, so the dense model is the same every run
        dense = train_adam(MODELS[name](), bundle.train, args.epochs)
        dense_acc[name] = accuracy(dense, bundle.test)
        print(f"{name}: dense accuracy {dense_acc[name]:.4f}", flush=True)
        for sparsity in args.sparsities:
            for label, estimator in methods(args).items():
                for seed in range(args.seeds):
                    model, result = prune(dense, bundle.train, estimator, sparsity, args.steps, seed)
                    acc = accuracy(model, bundle.test)
                    table[name, sparsity, label].append(acc)
                    predicted = sum(s.predicted_loss_change or 0.0 for s in result.steps)
                    measured = sum(s.measured_loss_change or 0.0 for s in result.steps)
                    print(f"{name} sparsity {sparsity:.2f} {label} seed {seed}: accuracy {acc:.4f}, "
                          f"loss change predicted {predicted:.3g} measured {measured:.3g}, "
                          f"time {result.seconds:.2f} s", flush=True)
    print()
    print("| model | sparsity | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name in args.models:
        print(f"| {name} | dense | " + " | ".join(f"{dense_acc[name]:.3f}" for _ in labels) + " |")
        for sparsity in args.sparsities:
            cells = []
            for label in labels:
                accs = table[name, sparsity, label]
                cell = f"{statistics.fmean(accs):.3f}"
                if len(accs) > 1:
                    cell += f" ({min(accs):.3f}–{max(accs):.3f})"
                cells.append(cell)
            print(f"| {name} | {sparsity:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
