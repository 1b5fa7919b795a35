"""M-FAC pruning quality and time: digits MLP and CNN, one-shot OBS at 90/95/98 % in 8 steps.

Methods, all at equal m (``num_grads``) and damping 1e-5: ``mfac`` unblocked (one block over all
selected weights), ``mfac`` with 128-wide blocks, ``woodfisher`` with 128-wide blocks (if the
plugin is installed), and global magnitude. Each dense model is trained once (Adam, fixed seed);
every method prunes a copy of it with the same gradient batches. Reported: test accuracy right
after pruning (no fine-tuning) and the wall time of ``Pipeline.prune`` (gradients, curvature,
scores, updates)::

    python benchmarks/mfac_accuracy.py           # both models, 90/95/98 %, 8 steps
    python benchmarks/mfac_accuracy.py --quick   # MLP, 90/95 %, 2 steps
"""

from __future__ import annotations

import argparse
import copy
import os
import platform

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import curvprune
from curvprune.config import DataConfig
from curvprune.data import build_data
from curvprune.models import DigitsCNN, DigitsMLP


def train(model: torch.nn.Module, dataset, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def accuracy(model: torch.nn.Module, dataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def methods(num_grads: int) -> dict[str, dict | None]:
    common = {"num_grads": num_grads, "damping": 1e-5, "fisher_mini_batch": 16}
    out: dict[str, dict | None] = {
        "mfac unblocked": {"name": "mfac", **common},
        "mfac B=128": {"name": "mfac", "block_size": 128, **common},
    }
    if "woodfisher" in curvprune.get_plugin_manager().registry.names("estimator"):
        out["woodfisher B=128"] = {"name": "woodfisher", "block_size": 128, **common}
    out["magnitude"] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["digits-mlp", "digits-cnn"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-grads", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sparsities, args.steps, args.epochs = ["digits-mlp"], [0.9, 0.95], 2, 3
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}; steps {args.steps}, num_grads {args.num_grads}")
    bundle = build_data(DataConfig(name="digits"))
    factories = {"digits-mlp": DigitsMLP, "digits-cnn": DigitsCNN}
    for name in args.models:
        dense = train(factories[name](), bundle.train, args.epochs)
        print(f"{name}: dense accuracy {accuracy(dense, bundle.test):.4f}")
        for sparsity in args.sparsities:
            for label, estimator in methods(args.num_grads).items():
                cfg = {"prune": {"sparsity": sparsity},
                       "schedule": {"name": "oneshot", "steps": args.steps},
                       "scorer": {"name": "obs" if estimator else "magnitude"}}
                if estimator:
                    cfg["estimator"] = estimator
                model = copy.deepcopy(dense)
                loader = DataLoader(bundle.train, batch_size=128, shuffle=True,
                                    generator=torch.Generator().manual_seed(0))
                result = curvprune.Pipeline.from_config(cfg).prune(model, loader)
                print(f"{name} sparsity {sparsity:.2f} {label}: accuracy "
                      f"{accuracy(model, bundle.test):.4f}, time {result.seconds:.2f} s")


if __name__ == "__main__":
    main()
