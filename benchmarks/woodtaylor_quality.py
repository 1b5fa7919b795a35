"""Accuracy right after one-shot pruning: ``obs`` vs ``woodtaylor`` (exact and default).

The digits CNN is trained once; one set of per-sample gradients feeds one ``woodfisher``
estimator; then, for each sparsity and scorer, the same dense weights are scored, masked by the
``global`` applier, compensated by the scorer and evaluated on the test set. Nothing but the
scorer differs between the columns.

Usage::

    python benchmarks/woodtaylor_quality.py            # 15 epochs, m = 256
    python benchmarks/woodtaylor_quality.py --quick    # 3 epochs, m = 64 (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch

from curvprune import GradientSource, PruneContext, create, select_parameters
from curvprune.config import DataConfig, TrainConfig
from curvprune.run.data import build_data, make_loaders
from curvprune.run.models import DigitsCNN
from curvprune.run.training import evaluate, train
from curvprune_woodfisher import WoodTaylorConfig, WoodTaylorScorer

from _machine import describe

LEVELS = (0.5, 0.7, 0.8, 0.9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs and m = 64")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--num-grads", type=int, default=None)
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: robust to other processes on a shared CPU)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 15)
    num_grads = args.num_grads or (64 if args.quick else 256)

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    data_cfg = DataConfig(name="digits")
    train_loader, grad_loader, test_loader = make_loaders(
        build_data(data_cfg), data_cfg, seed=args.seed
    )
    model = DigitsCNN()
    started = time.perf_counter()
    train(model, train_loader, TrainConfig(epochs=epochs, lr=0.05), device=device)
    dense_state = copy.deepcopy(model.state_dict())
    dense_acc, _ = evaluate(model, test_loader, device=device)

    layout = select_parameters(model)
    weights = layout.gather(model).detach().clone()
    estimator = create(
        "estimator",
        "woodfisher",
        block_size=args.block_size,
        damping=args.damping,
        num_grads=num_grads,
    )
    estimator.setup(layout.sizes)
    source = GradientSource(model, layout)
    for chunk in source.iter_grads(grad_loader, num_grads):
        estimator.update(chunk)
    mean_grad = source.mean()
    mask = create("mask", "global")
    dense_mask = torch.ones_like(weights, dtype=torch.bool)

    scorers = {
        "obs": lambda: create("scorer", "obs"),
        "woodtaylor exact": lambda: WoodTaylorScorer(WoodTaylorConfig(normalize_update=False)),
        "woodtaylor first_order r=0.003": lambda: WoodTaylorScorer(WoodTaylorConfig(
            normalize_update=True, normalize="first_order", normalize_update_mult=0.003)),
    }
    rows = []
    for level in LEVELS:
        row = [f"{level:.0%}"]
        for build in scorers.values():
            scorer = build()
            ctx = PruneContext(
                model=model,
                layout=layout,
                weights=weights.clone(),
                mask=dense_mask,
                target_sparsity=level,
                estimator=estimator,
                mean_grad=mean_grad,
            )
            keep = mask.select(scorer.score(ctx), dense_mask, level, layout)
            delta = scorer.compensate(ctx, dense_mask & ~keep)
            pruned = weights if delta is None else weights + delta.to(weights.dtype)
            model.load_state_dict(dense_state)
            layout.scatter_(model, pruned * keep)
            accuracy, _ = evaluate(model, test_loader, device=device)
            row.append(f"{accuracy:.1%}")
        rows.append(row)
    elapsed = time.perf_counter() - started

    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, Python {platform.python_version()}")
    print(
        f"digits CNN, {epochs} epochs, dense accuracy {dense_acc:.1%}; woodfisher "
        f"B = {args.block_size}, damping = {args.damping:g}, m = {num_grads} per-sample "
        f"gradients; global mask, one shot; {elapsed:.1f} s"
    )
    print()
    print("| sparsity | " + " | ".join(scorers) + " |")
    print("|---" * (len(scorers) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
