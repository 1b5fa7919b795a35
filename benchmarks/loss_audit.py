"""Loss-change audit: predicted against measured loss change of single-weight removals (digits MLP, WoodFisher + OBS).

For each damping, the digits MLP (trained once, cached) is pruned with ``woodfisher``
(B = 128, m = 256 per-sample gradients) and ``obs`` to 75 % in 3 steps; before each step
``[prune] audit_single`` samples weights still present and compares the OBS prediction
ρ_q = w_q²/(2[F⁻¹]_qq) of removing each alone with the loss change measured (on the whole
training set, 1,437 images, in float64) after its OBS update. Reported per step, mean ± std
over seeds: Spearman's ρ of ρ_q with the measured change; of the curvature part ½δwᵀF₀δw
(ρ_q less the damping's ½λ‖δw‖²) with the measured change less its exact first-order part
∇Lᵀδw; of ∇Lᵀδw alone with the measured change (see ``curvprune.pipeline.audit``); and the summed
predicted against measured change of each whole step. Run:

    python benchmarks/loss_audit.py            # 200 weights per step, 3 dampings, 3 seeds
    python benchmarks/loss_audit.py --quick    # 2 epochs, 2 steps, 16 weights, one damping
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

import torch

from curvprune.run.execute import execute_run

from _machine import describe

HEADLINE = r"^ratio .*$"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="weights audited per step")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.dampings, args.epochs, args.steps, args.seeds = 16, [1e-4], 2, 2, [0]
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; digits-mlp, {args.epochs} epochs (Adam 3e-3); woodfisher B = 128, "
          f"m = 256 per-sample gradients; obs; {args.steps} steps to {args.sparsity:.0%}; "
          f"{args.samples} weights audited per step on all training samples; seeds {args.seeds}")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for damping in args.dampings:
            for seed in args.seeds:
                config = {
                    "model": {"name": "digits-mlp"},
                    "train": {"epochs": args.epochs, "optimizer": "adam", "lr": 3e-3},
                    "prune": {"sparsity": args.sparsity, "loss_samples": 2000,
                              "audit_single": args.samples},
                    "estimator": {"name": "woodfisher", "block_size": 128, "num_grads": 256,
                                  "damping": damping},
                    "scorer": {"name": "obs"},
                    "schedule": {"name": "oneshot", "steps": args.steps},
                    "run": {"progress": False, "seed": seed, "device": "cpu"},
                }
                result = execute_run(config, out=out, name=f"d{damping:g}-s{seed}", quiet=True).result
                before = 0.0
                for step in result["steps"]:
                    audit = step["single_audit"]
                    rows.append({
                        "damping": damping, "seed": seed, "step": step["step"], "before": before,
                        **{k: audit[k] for k in ("spearman", "spearman_curvature", "spearman_first_order")},
                        "predicted": step["predicted_loss_change"],
                        "measured": step["measured_loss_change"],
                    })
                    before = step["sparsity"]
    print()
    print("Spearman's ρ over the audited weights, mean ± std over the seeds:")
    print()
    print("| damping | step | sparsity before | ρ_q vs measured | ½δwᵀF₀δw vs measured − ∇Lᵀδw "
          "| ∇Lᵀδw alone vs measured | step ΔL predicted / measured |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for damping in args.dampings:
        for step in range(args.steps):
            group = [r for r in rows if r["damping"] == damping and r["step"] == step]
            stats = {k: _mean_std([r[k] for r in group])
                     for k in ("spearman", "spearman_curvature", "spearman_first_order", "before")}
            summary[damping, step] = stats
            pred = _mean_std([r["predicted"] for r in group])[0]
            meas = _mean_std([r["measured"] for r in group])[0]
            cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in
                               (stats[k] for k in ("spearman", "spearman_curvature", "spearman_first_order")))
            print(f"| {damping:g} | {step} | {stats['before'][0]:.0%} | {cells} | {pred:.3g} / {meas:.3g} |")
    print()
    for (damping, step), stats in summary.items():
        if step == 0:  # the dense model; the issue asks for moderate sparsity
            continue
        print(f"ratio single-weight Spearman at {stats['before'][0]:.0%} sparsity, damping {damping:g}: "
              f"curvature part {stats['spearman_curvature'][0]:.3f}, rho_q vs measured "
              f"{stats['spearman'][0]:.3f} (expected >= 0.8)")
    return 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    data = torch.tensor(values, dtype=torch.float64)
    return float(data.mean()), float(data.std()) if data.numel() > 1 else 0.0


if __name__ == "__main__":
    sys.exit(main())
