"""GReg filter pruning of the digits CNN vs one-shot L1 on identical filters (GReg paper, Table 1 idea).

One dense ``DigitsCNN`` (trained once, fixed seed) is pruned by several methods, each on a deep copy:

* ``L1 one-shot``: the filters of lowest L1 norm removed at once (half of each prunable layer:
  both convs and the hidden Linear; the classifier's rows are the outputs and stay), no
  regularization. The script checks that these are *exactly* the filters GReg-1 picks.
* ``GReg-1``: the reference schedule (penalty on Conv/Linear weights only), with the reduced
  intervals below, then removal.
* ``GReg-1 +affine``: the same with ``reg_affine = true`` (the pruned filters' BatchNorm γ, β and
  biases are penalised too; not in the paper).
* ``GReg-2`` and ``GReg-2 +affine``: uniform growth first, pick by the resulting magnitude, then as
  GReg-1 (so their filters may differ from L1's).

Each pruned model is then physically made smaller (``Pipeline.remove``: FLOPs and parameters by the
reference's counting rules) and fine-tuned with the same recipe. Reported: test accuracy right
after removal and after fine-tuning (mean over seeds; the seed sets the prune phase's data order
and fine-tuning's), the accuracy right before the removal (after the prune phase's training),
the removal iteration, parameters and FLOPs::

    python benchmarks/greg_filter_digits.py              # width 16, 3 seeds (a few CPU minutes)
    python benchmarks/greg_filter_digits.py --model mlp  # DigitsMLP 64-128-64-10: no BatchNorm
    python benchmarks/greg_filter_digits.py --quick      # width 4, shorter schedule, 1 seed (CI)

Reduced schedule (reference values in parentheses; docs/methods/greg.md): K_u = 1 (5),
δλ = 1e-3 (1e-4), τ = 1 (1), K_s = 300 (40 000), lr_prune = 1e-3 (1e-3), momentum 0.9, weight
decay 1e-4, batch 64; GReg-2: δλ_pick = 1e-4 (1e-5), τ_pick = 1e-2 (1e-2), recover −1e-4.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any

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


def config(schedule: dict[str, Any], ratio: float) -> dict[str, Any]:
    return {
        "prune": {"sparsity": ratio, "loss_samples": 0},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1",
                   "extent": "producers"},
        "schedule": schedule,
        "mask": {"name": "channel", "scope": "layerwise", "remove": True},
    }


def greg(model: nn.Module, pipeline: curvprune.Pipeline, dataset: TensorDataset,
         test_set: TensorDataset, seed: int) -> tuple[curvprune.PruneResult, int, float]:
    """The prune phase: SGD with the schedule's optimizer over shuffled batches until removal.

    Returns the result, the removal iteration and the test accuracy just before the removal
    (after the last optimizer step, before ``session.step()`` removes the groups).
    """
    schedule = pipeline.schedule
    hold = schedule.config.stabilize_reg_interval
    before = float("nan")
    optimizer = schedule.prune_phase_optimizer(model)
    session = pipeline.attach(model, optimizer)
    loader = DataLoader(dataset, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    while not schedule.finished(session.iteration - 1):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            session.before_optimizer_step()
            optimizer.step()
            if schedule.phase == "stabilize" and session.iteration - schedule.stabilize_start >= hold:
                before = accuracy(model, test_set)
                model.train()
            session.step()
            if schedule.finished(session.iteration - 1):
                break
    model.eval()
    return session.close(), session.iteration - 1, before


def finetune(model: nn.Module, dataset: TensorDataset, epochs: int, seed: int) -> None:
    """SGD (lr 0.01 cosine to 0, momentum 0.9, wd 1e-4, batch 64) on the smaller model."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(dataset, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed + 7))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--ratio", type=float, default=0.5, help="per-layer filter ratio")
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn",
                        help="DigitsCNN (BatchNorm after each conv) or DigitsMLP (no BatchNorm)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        width, dense_epochs, ft_epochs, seeds = 4, 5, 1, args.seeds or 1
        base = {"update_reg_interval": 1, "reg_granularity_prune": 0.05,
                "stabilize_reg_interval": 40, "lr_prune": 1e-2}
        pick = {"reg_granularity_pick": 2e-3}
    else:
        width, dense_epochs, ft_epochs, seeds = 16, 15, 5, args.seeds or 3
        base = {"update_reg_interval": 1, "reg_granularity_prune": 1e-3,
                "stabilize_reg_interval": 300, "lr_prune": 1e-3}
        pick = {"reg_granularity_pick": 1e-4}
    methods: dict[str, dict[str, Any] | None] = {
        "L1 one-shot": None,
        "GReg-1": {"name": "greg", "variant": 1, **base},
        "GReg-1 +affine": {"name": "greg", "variant": 1, "reg_affine": True, **base},
        "GReg-2": {"name": "greg", "variant": 2, **base, **pick},
        "GReg-2 +affine": {"name": "greg", "variant": 2, "reg_affine": True, **base, **pick},
    }
    bundle = build_data(DataConfig(name="digits"))
    train_set, test_set = bundle.train, bundle.test
    print(f"machine: {describe()}")
    print(f"versions: torch {torch.__version__}, curvprune {curvprune.__version__}")
    torch.manual_seed(0)  # the initialisation (torch's own start seed differs per process)
    if args.model == "cnn":
        dense, what = DigitsCNN(width=width), f"DigitsCNN(width={width})"
    else:
        dense, what = DigitsMLP(), "DigitsMLP(hidden=(128, 64))"
    print(f"model: {what}, filter ratio {args.ratio} per prunable layer, "
          f"seeds {seeds}, schedule {base} {pick}")
    dense = train_adam(dense, train_set, dense_epochs)
    acc_dense = accuracy(dense, test_set)
    example = test_set.tensors[0][:8]
    print(f"dense accuracy {acc_dense:.4f}")
    rows: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, tuple[int, int, int, int]] = {}
    for seed in range(seeds):
        l1_keep = None
        for label, schedule in methods.items():
            started = time.perf_counter()
            model = copy.deepcopy(dense)
            if schedule is None:
                pipeline = curvprune.Pipeline.from_config(
                    config({"name": "oneshot"}, args.ratio))
                result = pipeline.prune(model, None)
                l1_keep = result.masks.flat.clone()
                removed_at, before = 0, acc_dense
            else:
                pipeline = curvprune.Pipeline.from_config(config(schedule, args.ratio))
                result, removed_at, before = greg(model, pipeline, train_set, test_set, seed)
                if label == "GReg-1" and l1_keep is not None:
                    same = torch.equal(result.masks.flat, l1_keep)
                    print(f"seed {seed}: GReg-1 removes the same filters as L1 one-shot: {same}")
                    assert same, "GReg-1 and L1 one-shot picked different filters"
            after_removal = accuracy(model, test_set)
            removal = pipeline.remove(model, result.masks, example_input=example)
            finetune(model, train_set, ft_epochs, seed)
            after_ft = accuracy(model, test_set)
            row = rows.setdefault(label, {"before": [], "removed": [], "tuned": [], "at": [], "s": []})
            row["before"].append(before)
            row["removed"].append(after_removal)
            row["tuned"].append(after_ft)
            row["at"].append(removed_at)
            row["s"].append(time.perf_counter() - started)
            counts[label] = (removal.params_before, removal.params_after,
                             removal.flops_before or 0, removal.flops_after or 0)
            print(f"seed {seed} {label}: removal at iteration {removed_at}, right before removal "
                  f"{before:.4f}, right after {after_removal:.4f}, after fine-tuning {after_ft:.4f} "
                  f"({row['s'][-1]:.1f} s)")
    print()
    print("| method | right before removal | right after removal | after fine-tuning | "
          "removal iteration | params | FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        pb, pa, fb, fa = counts[label]

        def cell(values: list[float]) -> str:
            mean = statistics.fmean(values)
            if len(values) == 1:
                return f"{100 * mean:.2f} %"
            return f"{100 * mean:.2f} % ({100 * min(values):.2f}–{100 * max(values):.2f})"

        at = statistics.fmean(row["at"])
        print(f"| {label} | {cell(row['before'])} | {cell(row['removed'])} | {cell(row['tuned'])} | {at:.0f} | "
              f"{pb} → {pa} | {fb} → {fa} ({fb / max(fa, 1):.2f}×) |")
    print(f"| dense | {100 * acc_dense:.2f} % | – | – | – | – | – |")
    l1 = statistics.fmean(rows["L1 one-shot"]["removed"])
    for label in ("GReg-1", "GReg-1 +affine"):
        mean = statistics.fmean(rows[label]["removed"])
        print(f"ratio accuracy right after removal, {label} / L1 one-shot (same filters): "
              f"{mean / l1:.2f}x ({100 * mean:.2f} % vs {100 * l1:.2f} %, dense {100 * acc_dense:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
