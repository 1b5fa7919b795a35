"""Digits CNN at 50 % of its channels removed: SOSP-H vs SOSP-I vs L1-filter, one shot.

The digits CNN (conv 16 → conv 32 → linear 64 → classifier; S = 112 prunable structures, the
classifier never pruned) is trained once per seed. For each method the same dense weights are
pruned globally by the core's ``channel`` mask (``min_channels = 1``) to 50 % of the
structures, evaluated (accuracy right after removal), physically shrunk with
:meth:`curvprune.Pipeline.remove` (parameters and FLOPs of the smaller model; its accuracy must
equal the masked one), fine-tuned briefly on the smaller model, and evaluated again.

* ``sosp-h``: |−g + ½H𝟙| with the exact gate-space Hessian H (SOSP-H as the paper's abstract
  describes it: products with the whole Hessian), N = 1024 samples;
* ``sosp-h signed``: the same λ ranked by its signed value (``absolute = false``);
* ``sosp-h ggn``: |−g + ½G𝟙| with the Gauss-Newton matrix G (``hessian = "ggn"``);
* ``sosp-i``: explicit S×S GGN, greedy selection, N = 1024;
* ``sosp-i upper_bound``: |qₛ + ½Qₛₛ| + ½·Σ_{s'≠s}|Q_{ss'}|, ranked globally;
* ``diagonal only``: |qₛ + ½Qₛₛ| (``sosp-i``, ``selection = "diagonal"``): SOSP without the
  correlations. On this ReLU/max-pool network the loss is piecewise linear in any single gate
  through the logits, so the exact Hessian's diagonal equals the GGN's;
* ``l1``: the core's ``magnitude`` scorer, ``granularity = "channel"``, ``norm = "l1"``,
  ``extent = "producers"`` (the filters' rows only), with the same global mask, and with
  ``scope = "layerwise"`` (every layer loses 50 %): the L1-filter criterion of Li et al.
  (2017), which ranks within each layer.

Usage::

    python benchmarks/sosp_digits.py            # 15 epochs, 3 seeds, fine-tune 2 epochs
    python benchmarks/sosp_digits.py --quick    # 3 epochs, 1 seed, fine-tune 1 epoch
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings

import torch

from curvprune import Pipeline
from curvprune.config import DataConfig, TrainConfig
from curvprune.run.data import build_data, make_loaders
from curvprune.run.models import DigitsCNN
from curvprune.run.training import evaluate, train

from _machine import describe

HEADLINE = r"^(ratio|right after).*$"
FULL_ARGS = ("--seeds", "3")
L1 = {"name": "magnitude", "granularity": "channel", "norm": "l1", "extent": "producers"}
#: method label -> (scorer table, mask scope)
METHODS = {
    "sosp-h": ({"name": "sosp-h", "num_samples": 1024}, "global"),
    "sosp-h signed": ({"name": "sosp-h", "num_samples": 1024, "absolute": False}, "global"),
    "sosp-h ggn": ({"name": "sosp-h", "num_samples": 1024, "hessian": "ggn"}, "global"),
    "sosp-i": ({"name": "sosp-i", "num_samples": 1024}, "global"),
    "sosp-i upper_bound": ({"name": "sosp-i", "num_samples": 1024, "selection": "upper_bound"},
                           "global"),
    "diagonal only": ({"name": "sosp-i", "num_samples": 1024, "selection": "diagonal"},
                      "global"),
    "l1 global": (L1, "global"),
    "l1 layerwise (L1-filter)": (L1, "layerwise"),
}


def prune_one(dense: torch.nn.Module, method: tuple[dict, str], sparsity: float, loaders,
              finetune: int, example: torch.Tensor) -> dict:
    train_loader, grad_loader, test_loader = loaders
    device = torch.device("cpu")
    model = copy.deepcopy(dense)
    scorer, scope = method
    pipeline = Pipeline.from_config({
        "prune": {"sparsity": sparsity, "loss_samples": 256},
        "scorer": scorer,
        "schedule": {"name": "oneshot"},
        "mask": {"name": "channel", "min_channels": 1, "scope": scope},
    })
    tick = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipeline.prune(model, grad_loader)
    seconds = time.perf_counter() - tick
    pruned_acc, _ = evaluate(model, test_loader, device=device)
    removal = pipeline.remove(model, result.masks, example_input=example)
    removed_acc, _ = evaluate(model, test_loader, device=device)
    train(model, train_loader, TrainConfig(epochs=finetune, lr=0.01), device=device)
    tuned_acc, _ = evaluate(model, test_loader, device=device)
    step = result.steps[0]
    return {
        "pruned": pruned_acc, "removed": removed_acc, "tuned": tuned_acc, "seconds": seconds,
        "params": (removal.params_before, removal.params_after),
        "flops": (removal.flops_before, removal.flops_after),
        "predicted": step.predicted_loss_change, "measured": step.measured_loss_change,
        "bottlenecks": getattr(pipeline.scorer, "bottlenecks", None),
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1%}"
    return f"{statistics.mean(values):.1%} ± {statistics.stdev(values):.1%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, 1 seed, fine-tune 1")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--finetune", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust to other processes on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 15)
    finetune = args.finetune or (1 if args.quick else 2)
    seeds = args.seeds or (1 if args.quick else 3)

    started = time.perf_counter()
    data_cfg = DataConfig(name="digits")
    rows: dict[str, list[dict]] = {name: [] for name in METHODS}
    dense_accs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        loaders = make_loaders(build_data(data_cfg, seed=seed), data_cfg, seed=seed)
        dense = DigitsCNN()
        train(dense, loaders[0], TrainConfig(epochs=epochs, lr=0.05), device=torch.device("cpu"))
        dense_accs.append(evaluate(dense, loaders[2], device=torch.device("cpu"))[0])
        example = next(iter(loaders[2]))[0][:8]
        for name, method in METHODS.items():
            torch.manual_seed(1000 + seed)  # same fine-tuning batches for every method
            rows[name].append(prune_one(dense, method, args.sparsity, loaders, finetune, example))
    elapsed = time.perf_counter() - started

    first = rows["sosp-h"][0]
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, Python {platform.python_version()}")
    print(f"digits CNN, {epochs} epochs, dense accuracy {mean_std(dense_accs)} over {seeds} "
          f"seed(s); {args.sparsity:.0%} of the 112 structures removed (channel mask, "
          f"min_channels 1), fine-tune {finetune} epoch(s) at lr 0.01 on the smaller model; "
          f"{elapsed:.0f} s")
    print()
    print("| method | right after removal | after fine-tune | params (seed 0) | FLOPs (seed 0) | "
          "predicted ΔL | measured ΔL | prune time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        r = runs[0]
        pred = "—" if r["predicted"] is None else (
            f"{statistics.mean(x['predicted'] for x in runs):.3f}")
        meas = statistics.mean(x["measured"] for x in runs)
        assert all(abs(x["pruned"] - x["removed"]) < 1e-12 for x in runs), "removal changed outputs"
        print(f"| {name} | {mean_std([x['pruned'] for x in runs])} | "
              f"{mean_std([x['tuned'] for x in runs])} | {r['params'][1]:,} / {r['params'][0]:,} | "
              f"{r['flops'][1]:,} / {r['flops'][0]:,} | {pred} | {meas:.3f} | "
              f"{statistics.mean(x['seconds'] for x in runs):.2f} s |")
    print()
    for name in rows:
        print(f"right after removal, {name}: {mean_std([x['pruned'] for x in rows[name]])}")
    report = first["bottlenecks"]
    if report is not None:
        print()
        print("SOSP-H kept fraction per group (seed 0): " + ", ".join(
            f"{g.name} {g.kept}/{g.size}" for g in report.groups))


if __name__ == "__main__":
    sys.exit(main())
