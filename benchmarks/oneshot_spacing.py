"""Sub-step levels: ``oneshot`` spacing (geometric vs poly) and ``gradual`` sub-steps (1/4/16).

Part ``spacing``: the digits CNN is trained once (Adam, fixed seed); WoodFisher (128-wide blocks,
m per-sample gradients, λ) with the ``obs`` scorer and the ``global`` mask prunes a copy of it
one-shot to 90 % (and 95, 98 %) in 4 sub-steps, the curvature recomputed before each, with the
sub-step levels spaced ``geometric`` (the default, M-FAC's recomputations), ``poly`` p = 2
(WoodFisher's README, ``--recompute-schedule poly --recompute-degree 2``) and ``poly`` p = 3
(cubic). Every spacing
sees the same gradient draws (seed = gradient loader order); test accuracy right after pruning,
no fine-tuning.

Part ``substeps``: the digits MLP is trained once; a ``gradual`` M-FAC run (block 128, m = 64
mini-batch gradients of 32, λ = 1e-5: the reference pruner's settings) prunes it during SGD
fine-tuning to 95 % in 4 cubic events (the first to 50 %), each in ``substeps`` = 1, 4 or 16
sub-steps (the M-FAC reference's ``--nrecomps 16``), then trains on with the masks held.
Reported: test accuracy after the last event and at the end, and the pruning time. Same seeds
for every setting::

    python benchmarks/oneshot_spacing.py                 # both parts, 3 seeds
    python benchmarks/oneshot_spacing.py --part spacing  # one part
    python benchmarks/oneshot_spacing.py --quick         # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune.config import DataConfig
from curvprune.run.data import build_data
from curvprune.run.models import DigitsCNN, DigitsMLP

from _digits import accuracy, train_adam
from _machine import describe

HEADLINE = r"^(spacing|substeps) .*$"

SPACINGS: dict[str, dict[str, Any]] = {
    "geometric": {"spacing": "geometric"},
    "poly p=2": {"spacing": "poly", "power": 2.0},
    "poly p=3": {"spacing": "poly", "power": 3.0},
}


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def spacing_part(args: argparse.Namespace, bundle: Any) -> None:
    torch.manual_seed(0)
    dense = train_adam(DigitsCNN(), bundle.train, args.cnn_epochs)
    dense_acc = accuracy(dense, bundle.test)
    print(f"digits CNN: dense accuracy {dense_acc:.4f}; woodfisher B=128, m={args.num_grads} "
          f"per-sample, damping {args.damping:g}; obs, global mask, {args.steps} steps",
          flush=True)
    results: dict[tuple[float, str], list[float]] = defaultdict(list)
    levels: dict[tuple[float, str], list[float]] = {}
    for sparsity in args.sparsities:
        for label, spacing in SPACINGS.items():
            for seed in range(args.seeds):
                cfg = {
                    "prune": {"sparsity": sparsity, "loss_samples": 0},
                    "estimator": {"name": "woodfisher", "block_size": 128,
                                  "damping": args.damping, "num_grads": args.num_grads},
                    "scorer": {"name": "obs"},
                    "schedule": {"name": "oneshot", "steps": args.steps, **spacing},
                    "mask": {"name": "global"},
                    "run": {"seed": seed},
                }
                model = copy.deepcopy(dense)
                loader = DataLoader(bundle.train, batch_size=128, shuffle=True,
                                    generator=torch.Generator().manual_seed(seed))
                result = curvprune.Pipeline.from_config(cfg).prune(model, loader)
                acc = accuracy(model, bundle.test)
                results[sparsity, label].append(acc)
                levels[sparsity, label] = [s.target_sparsity for s in result.steps]
                print(f"  {sparsity:.0%} {label} seed {seed}: accuracy {acc:.4f} "
                      f"({result.seconds:.1f} s)", flush=True)
    print()
    print("| sparsity | spacing | sub-step levels | test accuracy, mean (min–max) |")
    print("|---|---|---|---|")
    for (sparsity, label), accs in results.items():
        shown = ", ".join(f"{x:.3f}" for x in levels[sparsity, label])
        print(f"| {sparsity:.0%} | {label} | {shown} | {_cell(accs)} |")
    print()
    for (sparsity, label), accs in results.items():
        print(f"spacing {label}, {args.steps} steps to {sparsity:.0%}: mean accuracy "
              f"{statistics.fmean(accs):.4f} over {len(accs)} seed(s) (dense {dense_acc:.4f})")


def gradual_run(dense: nn.Module, bundle: Any, args: argparse.Namespace, substeps: int,
                seed: int) -> tuple[float, float, float, int]:
    """Accuracy after the last event, at the end, pruning seconds, pruning steps."""
    model = copy.deepcopy(dense).train()
    loader = DataLoader(bundle.train, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    grad_loader = DataLoader(bundle.train, batch_size=128, shuffle=True,
                             generator=torch.Generator().manual_seed(1000 + seed))
    per_epoch = len(loader)
    end = args.prune_epochs * per_epoch - 1
    cfg = {
        "prune": {"sparsity": args.gradual_sparsity, "loss_samples": 0},
        "estimator": {"name": "mfac", "block_size": 128, "num_grads": args.mfac_grads,
                      "fisher_mini_batch": 32, "damping": 1e-5},
        "scorer": {"name": "obs"},
        "schedule": {"name": "gradual", "start": 0, "end": end, "initial_sparsity": 0.5,
                     "frequency": max(1, end // (args.events - 1)), "substeps": substeps},
        "mask": {"name": "global"},
        "run": {"seed": seed},
    }
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    session = curvprune.Pipeline.from_config(cfg).attach(model, optimizer, data=grad_loader)
    after_last = None
    for _ in range(args.prune_epochs + args.after_epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            session.before_optimizer_step()
            optimizer.step()
            if session.step() is not None and session.iteration - 1 == end:
                after_last = accuracy(model, bundle.test)
        model.train()
    result = session.close()
    pruning = sum(s.times.get("total", 0.0) for s in result.steps)
    final = accuracy(model, bundle.test)
    return after_last if after_last is not None else final, final, pruning, len(result.steps)


def substeps_part(args: argparse.Namespace, bundle: Any) -> None:
    torch.manual_seed(0)
    if args.gradual_model == "cnn":
        dense, label = train_adam(DigitsCNN(), bundle.train, args.cnn_epochs), "digits CNN"
    else:
        dense, label = train_adam(DigitsMLP(), bundle.train, args.mlp_epochs), "digits MLP"
    dense_acc = accuracy(dense, bundle.test)
    print(f"{label}: dense accuracy {dense_acc:.4f}; gradual mfac B=128, m={args.mfac_grads} "
          f"x 32, damping 1e-5; {args.events} cubic events (from 50 %) to "
          f"{args.gradual_sparsity:.0%} over "
          f"{args.prune_epochs} epochs of SGD (lr 0.01, momentum 0.9), then "
          f"{args.after_epochs} more", flush=True)
    rows = []
    for substeps in args.substeps:
        last, final, seconds, steps = [], [], [], 0
        for seed in range(args.seeds):
            a, b, s, steps = gradual_run(dense, bundle, args, substeps, seed)
            last.append(a)
            final.append(b)
            seconds.append(s)
            print(f"  substeps {substeps} seed {seed}: after last event {a:.4f}, end {b:.4f}, "
                  f"pruning {s:.1f} s ({steps} steps)", flush=True)
        rows.append((substeps, steps, last, final, seconds))
    print()
    print("| substeps | pruning steps | accuracy after the last event | accuracy at the end | "
          "pruning seconds |")
    print("|---|---|---|---|---|")
    for substeps, steps, last, final, seconds in rows:
        print(f"| {substeps} | {steps} | {_cell(last)} | {_cell(final)} | "
              f"{statistics.fmean(seconds):.1f} |")
    print()
    for substeps, _, last, final, _ in rows:
        print(f"substeps {substeps}: mean accuracy after the last event "
              f"{statistics.fmean(last):.4f}, at the end {statistics.fmean(final):.4f} "
              f"(dense {dense_acc:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=["spacing", "substeps", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-grads", type=int, default=256)
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--cnn-epochs", type=int, default=15)
    parser.add_argument("--mlp-epochs", type=int, default=40)
    parser.add_argument("--gradual-model", choices=["mlp", "cnn"], default="mlp",
                        help="the model of the substeps part")
    parser.add_argument("--gradual-sparsity", type=float, default=0.95)
    parser.add_argument("--mfac-grads", type=int, default=64)
    parser.add_argument("--events", type=int, default=4)
    parser.add_argument("--prune-epochs", type=int, default=4)
    parser.add_argument("--after-epochs", type=int, default=2)
    parser.add_argument("--substeps", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps, args.num_grads, args.cnn_epochs = 1, 2, 16, 1
        args.sparsities = [0.9]
        args.mlp_epochs, args.mfac_grads, args.events = 2, 4, 2
        args.prune_epochs, args.after_epochs, args.substeps = 1, 0, [1, 2]
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; seeds {args.seeds}" + (" (quick)" if args.quick else ""))
    started = time.perf_counter()
    bundle = build_data(DataConfig(name="digits"))
    if args.quick:  # a tenth of the training set keeps the smoke run to seconds
        x, y = bundle.train.tensors
        bundle = attrs.evolve(bundle, train=TensorDataset(x[:192], y[:192]))
    if args.part in ("spacing", "both"):
        spacing_part(args, bundle)
    if args.part in ("substeps", "both"):
        print()
        substeps_part(args, bundle)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
