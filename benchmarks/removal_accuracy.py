"""Accuracy right after removing 50 % of the channels (no fine-tuning): curvprune vs Torch-Pruning.

Two models, each trained per seed (Adam, lr 3e-3 with cosine decay, batch 64; 15 epochs for
the CNN, 10 for ResNet-20) on scikit-learn's bundled digits
(the fixed 75/25 split; accuracy on the held-out 25 %):

* the digits CNN (``curvprune.testing.digits.DigitsCNN``: conv 16, conv 32, linear 64 and the
  classifier, 1×8×8 inputs);
* ResNet-20 (3 stages of 3 basic blocks, 16/32/64 wide; option-B 1×1 conv + BN shortcuts where
  the width changes, so both tools can follow the residual streams) on the digits upsampled
  bilinearly to 3×32×32.

Each method prunes a copy of the same dense model to 50 % of its channels and the pruned model
is evaluated at once, without fine-tuning. curvprune methods (``channel`` mask, physical removal
after; ``min_channels = 1``):

* ``magnitude (group)``: ``magnitude``, ``granularity = "channel"``, ``norm = "l2"``,
  ``extent = "group"`` (every parameter the removal deletes: all coupled producers' rows, BN
  γ/β, consumers' input columns), ``normalize = "mean"``, one global ranking;
* ``magnitude (filter)``: the same with ``extent = "producers"`` (producers' rows only);
* ``magnitude (group, raw)``: ``extent = "group"``, ``normalize = "none"``;
* ``SOSP-H``, ``SOSP-I``: ``sosp-h`` (exact gate-space Hessian) and ``sosp-i`` (GGN, greedy),
  N = 512 training samples, global ranking;
* ``GReg-1``: the ``greg`` schedule, variant 1, filter mode with the reference's residual rule
  (only block-internal channels of ResNet-20 are pruned, 50 % of each prunable layer), in a
  short regularised SGD phase before the removal; its schedule is scaled down (see below);
  ``GReg-1 +affine`` also penalises the pruned filters' BN γ/β (``reg_affine``, not in the paper).

Torch-Pruning (``tp.pruner.BasePruner``, ``pruning_ratio = 0.5``, ``global_pruning = True``,
the classifier in ``ignored_layers``, model in eval mode):

* ``TP magnitude``: ``MagnitudeImportance()`` (p = 2, mean over the group's members, mean
  normaliser);
* ``TP Taylor``: ``TaylorImportance()`` (|w·∂L/∂w|, mean over members, mean normaliser), with
  the gradient of the loss summed over the same N = 512 training samples;
* ``TP group norm``: ``GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None,
  bias=True)``, the raw group L2 norm of DepGraph (Torch-Pruning 1.6 has no class named
  ``GroupNormImportance``; its ``GroupNormPruner`` ranks with this importance).

GReg-1 schedules (reference values in parentheses, docs/methods/greg.md): digits CNN, the
examples' reduced schedule: K_u = 1 (5), δλ = 1e-3 (1e-4), τ = 1, K_s = 300 (40 000), lr_prune
1e-3 (1e-3), momentum 0.9, weight decay 1e-4, batch 64. ResNet-20: K_u = 1, δλ = 1e-2, τ = 1,
K_s = 100, lr_prune 5e-3 (≈ 200 SGD steps; the same overall shrink factor
exp(−lr/(1−m)·Σλ) ≈ e⁻⁸ as the digits schedule).

Params and FLOPs are counted by the GReg rules (Conv/Linear weights and biases; BN excluded),
"structures" are curvprune's traced channel structures of the pruned model (a coupled residual
channel counts once), both relative to the dense model.

Usage::

    python benchmarks/removal_accuracy.py --seeds 3     # full (about 25 CPU minutes, 1 thread)
    python benchmarks/removal_accuracy.py --quick       # smoke run: tiny sizes, 1 seed
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from greg_filter_digits import greg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune.config import DataConfig
from curvprune.run.data import build_data
from curvprune.testing.digits import DigitsCNN

from _digits import accuracy
from _machine import describe
from _models import ResNet20

HEADLINE = r"^(ratio|right after).*$"
FULL_ARGS = ("--seeds", "3")

MAG = {"name": "magnitude", "granularity": "channel", "norm": "l2"}
OURS: dict[str, dict[str, Any]] = {
    "magnitude (group)": {**MAG, "extent": "group"},
    "magnitude (filter)": {**MAG, "extent": "producers"},
    "magnitude (group, raw)": {**MAG, "extent": "group", "normalize": "none"},
    "SOSP-H": {"name": "sosp-h"},
    "SOSP-I": {"name": "sosp-i"},
}
TP_METHODS = ("TP magnitude", "TP Taylor", "TP group norm")
GREG = ("GReg-1", "GReg-1 +affine")


def digits(side: int | None) -> tuple[TensorDataset, TensorDataset]:
    """The digits split; ``side``: upsample to 3×side×side (bilinear, grey copied to 3)."""
    bundle = build_data(DataConfig(name="digits"))
    if side is None:
        return bundle.train, bundle.test

    def up(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return TensorDataset(x.repeat(1, 3, 1, 1).contiguous(), y)

    return up(bundle.train), up(bundle.test)


def train(model: nn.Module, data: TensorDataset, epochs: int, seed: int) -> nn.Module:
    """Adam (lr 3e-3, cosine to 0, batch 64), shuffled with ``seed``; returns the model in eval
    mode (the decay settles the BatchNorm statistics, which a constant lr left noisy)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(data, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            decay.step()
    return model.eval()


def structures_of(model: nn.Module) -> int:
    """Traced prunable channel structures (coupled channels once), classifier excluded."""
    layout = curvprune.select_parameters(model)
    return curvprune.StructureGraph.trace(model).structures(layout).n_structures


def samples(data: TensorDataset, n: int, seed: int) -> DataLoader:
    """The first ``n`` training samples in a seeded order, batches of 64."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = data.tensors
    return DataLoader(TensorDataset(x[order], y[order]), batch_size=64)


def prune_ours(model: nn.Module, scorer: dict[str, Any], data: TensorDataset, n: int,
               seed: int, fraction: float) -> None:
    scorer = dict(scorer)
    if scorer["name"].startswith("sosp"):
        scorer["num_samples"] = n
    pipeline = curvprune.Pipeline.from_config({
        "prune": {"sparsity": fraction, "loss_samples": 0},
        "scorer": scorer,
        "schedule": {"name": "oneshot"},
        "mask": {"name": "channel", "min_channels": 1, "remove": True},
    })
    result = pipeline.prune(model, samples(data, n, seed))
    pipeline.remove(model, result.masks)


def prune_greg(model: nn.Module, schedule: dict[str, Any], data: TensorDataset,
               test: TensorDataset, seed: int, fraction: float) -> None:
    pipeline = curvprune.Pipeline.from_config({
        "prune": {"sparsity": fraction, "loss_samples": 0},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1"},
        "schedule": schedule,
        "mask": {"name": "channel", "scope": "layerwise", "remove": True},
    })
    result, _, _ = greg(model, pipeline, data, test, seed)
    pipeline.remove(model, result.masks)


def prune_tp(model: nn.Module, label: str, data: TensorDataset, n: int, seed: int,
             example: torch.Tensor, classifier: nn.Module, fraction: float) -> None:
    import torch_pruning as tp

    model.eval()
    if label == "TP magnitude":
        importance = tp.importance.MagnitudeImportance()
    elif label == "TP Taylor":
        importance = tp.importance.TaylorImportance()
        model.zero_grad()
        for x, y in samples(data, n, seed):
            F.cross_entropy(model(x), y).backward()
    else:
        importance = tp.importance.GroupMagnitudeImportance(
            p=2, group_reduction="sum", normalizer=None, bias=True)
    pruner = tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=fraction,
                                  global_pruning=True, ignored_layers=[classifier])
    pruner.step()
    model.zero_grad(set_to_none=True)


def run_model(name: str, build: Callable[[], nn.Module], side: int | None, epochs: int,
              seeds: int, n: int, greg_schedule: dict[str, Any], subset: int | None,
              fraction: float) -> dict[str, Any]:
    train_set, test_set = digits(side)
    if subset:
        train_set = TensorDataset(*(t[:subset] for t in train_set.tensors))
        test_set = TensorDataset(*(t[:subset] for t in test_set.tensors))
    example = test_set.tensors[0][:1]
    rows: dict[str, dict[str, list[float]]] = {}
    dense_acc = []
    started = time.perf_counter()
    for seed in range(seeds):
        torch.manual_seed(seed)
        dense = train(build(), train_set, epochs, seed)
        dense_acc.append(accuracy(dense, test_set))
        print(f"{name} seed {seed} dense: {dense_acc[-1]:.4f}", file=sys.stderr)
        flops0, params0 = curvprune.count_flops_params(dense, example)
        s0 = structures_of(dense)
        methods: list[tuple[str, Callable[[nn.Module], None]]] = []
        for label, scorer in OURS.items():
            methods.append((label, lambda m, s=scorer: prune_ours(m, s, train_set, n, seed,
                                                                  fraction)))
        for label in GREG:
            sched = {**greg_schedule, "reg_affine": label.endswith("+affine")}
            methods.append((label, lambda m, s=sched: prune_greg(m, s, train_set, test_set,
                                                                 seed, fraction)))
        for label in TP_METHODS:
            methods.append((label, lambda m, lb=label: prune_tp(
                m, lb, train_set, n, seed, example, classifier_of(m), fraction)))
        for label, prune in methods:
            model = copy.deepcopy(dense)
            tick = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prune(model)
            seconds = time.perf_counter() - tick
            flops, params = curvprune.count_flops_params(model, example)
            row = rows.setdefault(label, {"acc": [], "params": [], "flops": [], "structures": [],
                                          "seconds": []})
            row["acc"].append(accuracy(model, test_set))
            row["params"].append(params / params0)
            row["flops"].append(flops / flops0)
            row["structures"].append(structures_of(model) / s0)
            row["seconds"].append(seconds)
            print(f"{name} seed {seed} {label}: {row['acc'][-1]:.4f} "
                  f"(params {row['params'][-1]:.3f}, {seconds:.1f} s)", file=sys.stderr)
    return {"rows": rows, "dense": dense_acc, "params0": params0, "flops0": flops0,
            "structures0": s0, "seconds": time.perf_counter() - started}


def classifier_of(model: nn.Module) -> nn.Module:
    """The last Linear layer (the classifier)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def pm(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed (CI)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="fraction of the channels removed (default 0.5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    try:
        import torch_pruning as tp
    except ImportError:  # a peer, never a dependency: the `bench` extra
        print("skipped: Torch-Pruning is not installed (pip install -e '.[bench]'); this table "
              "sets curvprune beside it")
        return 0

    if args.quick:
        seeds, n, side, subset = args.seeds or 1, 64, 16, 256
        cnn_epochs, resnet_epochs = 2, 1
        cnn_greg = {"name": "greg", "variant": 1, "update_reg_interval": 1,
                    "reg_granularity_prune": 0.25, "stabilize_reg_interval": 4, "lr_prune": 1e-2}
        resnet_greg = cnn_greg
    else:
        seeds, n, side, subset = args.seeds or 3, 512, 32, None
        cnn_epochs, resnet_epochs = 15, 10
        cnn_greg = {"name": "greg", "variant": 1, "update_reg_interval": 1,
                    "reg_granularity_prune": 1e-3, "stabilize_reg_interval": 300,
                    "lr_prune": 1e-3}
        resnet_greg = {"name": "greg", "variant": 1, "update_reg_interval": 1,
                       "reg_granularity_prune": 1e-2, "stabilize_reg_interval": 100,
                       "lr_prune": 5e-3}
    print(f"machine: {describe()}")
    print(f"versions: torch {torch.__version__}, torch-pruning {version('torch-pruning')} "
          f"(tp.__version__ {tp.__version__}), curvprune {curvprune.__version__}; "
          f"{args.threads} thread(s)")
    print(f"{100 * args.fraction:.0f} % of the channels removed; seeds {seeds}; N = {n} scoring "
          f"samples; digits CNN {cnn_epochs} epochs, ResNet-20 {resnet_epochs} epochs at "
          f"{side}×{side}" + (f"; first {subset} samples" if subset else ""))
    results = {
        "digits CNN": run_model("digits CNN", DigitsCNN, None, cnn_epochs, seeds, n, cnn_greg,
                                subset, args.fraction),
        "ResNet-20": run_model("ResNet-20", lambda: ResNet20(shortcut="B"), side, resnet_epochs,
                               seeds, n, resnet_greg, subset, args.fraction),
    }
    for name, res in results.items():
        print()
        print(f"{name}: dense accuracy {pm(res['dense'])} %, {res['params0']:,} params, "
              f"{res['flops0']:,} FLOPs/sample, {res['structures0']} structures; "
              f"{res['seconds']:.0f} s")
        print()
        print("| method | accuracy right after removal (%) | params kept (%) | FLOPs kept (%) | "
              "structures kept (%) | prune time (s) |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| dense | {pm(res['dense'])} | 100 | 100 | 100 | – |")
        for label, row in res["rows"].items():
            print(f"| {label} | {pm(row['acc'])} | {pm(row['params'])} | {pm(row['flops'])} | "
                  f"{pm(row['structures'])} | {statistics.fmean(row['seconds']):.1f} |")
    print()
    for name, res in results.items():
        rows = res["rows"]
        best = max(rows, key=lambda k: statistics.fmean(rows[k]["acc"]))
        print(f"right after removal of {100 * args.fraction:.0f} %, {name}: best {best} "
              f"{pm(rows[best]['acc'])} %; "
              f"magnitude (group) {pm(rows['magnitude (group)']['acc'])} % vs "
              f"TP magnitude {pm(rows['TP magnitude']['acc'])} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
