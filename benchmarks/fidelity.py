"""Issue #20, fidelity to the reference codes: before/after on the digits CNN (mean of seeds).

One dense ``DigitsCNN`` (Adam, 15 epochs, fixed seed) is pruned by each variant on a deep copy;
a seed sets the data order (gradient draws, prune-phase batches, fine-tuning). Three items:

1. **M-FAC blocks** (``mfac``, static, B = 128): ``blocks = "fixed"`` (before: per-parameter
   blocks that keep pruned weights in their slots) against ``"alive"`` (after, the reference's
   ``w[mask]`` blocks of 128 live weights). One-shot OBS to 90 / 95 % in 8 geometric steps,
   m = 128 gradients of 8 samples, λ = 1e-4; test accuracy right after pruning.
2. **WoodTaylor default** (``woodfisher`` B = 128, λ = 1e-4, m = 256 per-sample gradients,
   one-shot): the old default (``normalize = "first_order"``, r = 0.003), the new default (the
   exact method), the reference's normalisation (whole update rescaled, r = 1), that plus the
   reference's ranking, and ``obs``; test accuracy right after pruning at 50 / 70 / 90 %.
3. **GReg-2 per-layer stop**: the schedule as it was (every layer waits for all; no EMA during the
   pick) against the reference's per-layer stop, with and without ``reg_affine``; the reduced
   schedule of ``greg_filter_digits.py``, half the filters of each prunable layer, removal, then
   5 epochs of fine-tuning. Reported: the removal iteration, accuracy right after removal and after
   fine-tuning.

Usage::

    python benchmarks/fidelity.py            # 3 seeds (about 15 CPU minutes on 1 thread)
    python benchmarks/fidelity.py --quick    # 1 seed, small settings (smoke test)
    python benchmarks/fidelity.py --items 1 2
    python benchmarks/fidelity.py --items 5 --mag-ratio-limit 100   # layers stop on their EMA
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from greg_filter_digits import config as greg_config
from greg_filter_digits import finetune, greg
from mfac_accuracy import prune

import curvprune
from curvprune.config import DataConfig
from curvprune.run.data import build_data
from curvprune.run.models import DigitsCNN
from curvprune_greg import GRegSchedule

from _digits import accuracy, train_adam
from _machine import describe


class AllLayersTogether(GRegSchedule):
    """GReg-2 as it was before issue #20: every layer grows until all stop (GReg-1's shared
    counts and all-layers ratio stop), and the EMA starts only after the pick."""

    def _moving_sets(self, params):  # type: ignore[no-untyped-def]
        return {}

    def _finish_layers(self, names, pick_value):  # type: ignore[no-untyped-def]
        return None

    def _grow_per_layer(self, step, params):  # type: ignore[no-untyped-def]
        cfg = self.config
        if cfg.granularity != "weight":
            self._update_ratios(params, self._pruned)
        self.updates += 1
        top = self.pruned_lambda
        for name, lam in self._lam.items():
            lam.copy_(torch.where(self._pruned[name], torch.full_like(lam, top),
                                  torch.full_like(lam, cfg.reg_granularity_recover)))
        self._refresh_affine()
        by_ratio = cfg.granularity != "weight" and bool(self._ema) and all(
            r >= cfg.mag_ratio_limit for r in self._ema.values())
        if by_ratio or top > cfg.reg_upper_limit:
            self._enter("stabilize", step)


def cell(values: list[float], percent: bool = True) -> str:
    mean = statistics.fmean(values)
    if percent:
        text, low, high = f"{100 * mean:.2f} %", 100 * min(values), 100 * max(values)
        return text if len(values) == 1 else f"{text} ({low:.1f}–{high:.1f})"
    text = f"{mean:.0f}"
    return text if len(values) == 1 else f"{text} ({min(values):.0f}–{max(values):.0f})"


def item_mfac(dense, bundle, seeds, quick) -> None:
    common = {"name": "mfac", "algorithm": "static", "block_size": 128, "damping": 1e-4,
              "num_grads": 32 if quick else 128, "fisher_mini_batch": 8}
    levels = (0.9,) if quick else (0.9, 0.95)
    steps = 2 if quick else 8
    print(f"\n### 1. M-FAC blocks: {common}, {steps} geometric steps, obs, global mask")
    rows: dict[tuple[str, float], list[float]] = {}
    for seed in range(seeds):
        for level in levels:
            for blocks in ("fixed", "alive"):
                started = time.perf_counter()
                estimator = {**common, "blocks": blocks}
                model, _ = prune(dense, bundle.train, estimator, level, steps, seed)
                acc = accuracy(model, bundle.test)
                rows.setdefault((blocks, level), []).append(acc)
                print(f"seed {seed} {level:.0%} blocks={blocks}: {acc:.4f} "
                      f"({time.perf_counter() - started:.1f} s)", flush=True)
    print("\n| blocks | " + " | ".join(f"{lv:.0%}" for lv in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for blocks, label in (("fixed", "fixed (before)"), ("alive", "alive (after, reference)")):
        print(f"| {label} | " + " | ".join(cell(rows[blocks, lv]) for lv in levels) + " |")


def item_woodtaylor(dense, bundle, seeds, quick) -> None:
    estimator = {"name": "woodfisher", "block_size": 128, "damping": 1e-4,
                 "num_grads": 64 if quick else 256, "fisher_mini_batch": 1}
    scorers: dict[str, dict[str, Any]] = {
        "obs": {"name": "obs"},
        "woodtaylor, old default (first_order, r = 0.003)": {
            "name": "woodtaylor", "normalize_update": True, "normalize": "first_order",
            "normalize_update_mult": 0.003},
        "woodtaylor, new default (exact)": {"name": "woodtaylor"},
        "woodtaylor, reference normalisation (r = 1)": {
            "name": "woodtaylor", "normalize_update": True},
        "woodtaylor, reference normalisation + ranking": {
            "name": "woodtaylor", "normalize_update": True, "ranking": "reference"},
    }
    levels = (0.7,) if quick else (0.5, 0.7, 0.9)
    print(f"\n### 2. WoodTaylor: {estimator}, one-shot, global mask")
    rows: dict[tuple[str, float], list[float]] = {}
    for seed in range(seeds):
        for level in levels:
            for label, scorer in scorers.items():
                cfg = {"prune": {"sparsity": level}, "schedule": {"name": "oneshot"},
                       "estimator": estimator, "scorer": scorer, "run": {"seed": seed}}
                model = copy.deepcopy(dense)
                loader = torch.utils.data.DataLoader(
                    bundle.train, batch_size=128, shuffle=True,
                    generator=torch.Generator().manual_seed(seed))
                curvprune.Pipeline.from_config(cfg).prune(model, loader)
                acc = accuracy(model, bundle.test)
                rows.setdefault((label, level), []).append(acc)
                print(f"seed {seed} {level:.0%} {label}: {acc:.4f}", flush=True)
    print("\n| scorer | " + " | ".join(f"{lv:.0%}" for lv in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for label in scorers:
        print(f"| {label} | " + " | ".join(cell(rows[label, lv]) for lv in levels) + " |")


def item_greg(dense, bundle, seeds, quick, limit) -> None:
    if quick:
        base = {"update_reg_interval": 1, "reg_granularity_prune": 0.05,
                "stabilize_reg_interval": 40, "lr_prune": 1e-2, "reg_granularity_pick": 2e-3}
        ft_epochs = 1
    else:
        base = {"update_reg_interval": 1, "reg_granularity_prune": 1e-3,
                "stabilize_reg_interval": 300, "lr_prune": 1e-3, "reg_granularity_pick": 1e-4}
        ft_epochs = 5
    base["mag_ratio_limit"] = limit
    print(f"\n### 3. GReg-2: {base}, filter ratio 0.5, fine-tuning {ft_epochs} epochs")
    example = bundle.test.tensors[0][:8]
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in range(seeds):
        for affine in (False, True):
            for before in (True, False):
                label = ("all layers together (before)" if before else "per layer (after)") + (
                    ", reg_affine" if affine else "")
                schedule = {"name": "greg", "variant": 2, "reg_affine": affine, **base}
                pipeline = curvprune.Pipeline.from_config(greg_config(schedule, 0.5))
                if before:
                    pipeline.schedule.__class__ = AllLayersTogether
                model = copy.deepcopy(dense)
                result, removed_at, _ = greg(model, pipeline, bundle.train, bundle.test, seed)
                after_removal = accuracy(model, bundle.test)
                pipeline.remove(model, result.masks, example_input=example)
                finetune(model, bundle.train, ft_epochs, seed)
                tuned = accuracy(model, bundle.test)
                row = rows.setdefault(label, {"at": [], "removed": [], "tuned": []})
                row["at"].append(removed_at)
                row["removed"].append(after_removal)
                row["tuned"].append(tuned)
                events = {n: s for s, n in pipeline.schedule.events}
                ema = {n: round(v, 1) for n, v in pipeline.schedule.magnitude_ratios().items()}
                top = {n: round(float(v.max()), 3) for n, v in pipeline.schedule.lambdas().items()}
                print(f"seed {seed} {label}: removal at {removed_at}, right after "
                      f"{after_removal:.4f}, fine-tuned {tuned:.4f}; EMA {ema}, final λ {top}, "
                      f"events {events}", flush=True)
    print("\n| GReg-2 | removal iteration | right after removal | after fine-tuning |")
    print("|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {cell(row['at'], percent=False)} | {cell(row['removed'])} | "
              f"{cell(row['tuned'])} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--items", type=int, nargs="+", default=[1, 2, 5], choices=[1, 2, 5])
    parser.add_argument("--mag-ratio-limit", type=float, default=1000.0,
                        help="GReg's mag_ratio_limit (reference 1000; on the BatchNorm CNN the "
                             "kept/pruned ratios stay below it, so no layer stops on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = 3 if args.quick else 15
    print(f"machine: {describe()}")
    print(f"versions: torch {torch.__version__}, curvprune {curvprune.__version__}; threads 1")
    bundle = build_data(DataConfig(name="digits"))
    torch.manual_seed(0)
    dense = train_adam(DigitsCNN(), bundle.train, epochs)
    print(f"DigitsCNN(width=16), Adam {epochs} epochs: dense accuracy "
          f"{accuracy(dense, bundle.test):.4f}; seeds {seeds}")
    if 1 in args.items:
        item_mfac(dense, bundle, seeds, args.quick)
    if 2 in args.items:
        item_woodtaylor(dense, bundle, seeds, args.quick)
    if 5 in args.items:
        item_greg(dense, bundle, seeds, args.quick, args.mag_ratio_limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
