"""Loss-change audit: predicted against measured loss change of single-weight removals (digits MLP, WoodFisher + OBS).

For each damping, the digits MLP (trained once, cached) is pruned with ``woodfisher``
(B = 128, m = 256 per-sample gradients) and ``obs`` to 75 % in 3 steps; before each step
``[prune] audit_single`` samples weights still present and compares the OBS prediction
ρ_q = w_q²/(2[F⁻¹]_qq) of removing each alone with the loss change measured (on the whole
training set, 1,437 images, in float64) after its OBS update. Reported: Spearman's ρ and Pearson's r per step, and the summed
predicted against measured change of each whole step. Run:

    python benchmarks/loss_audit.py            # 200 weights per step, 4 dampings
    python benchmarks/loss_audit.py --quick    # 2 epochs, 2 steps, 16 weights, one damping
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

import torch

from curvprune.runs import execute_run

from _machine import describe

HEADLINE = r"^ratio .*$"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="weights audited per step")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.dampings, args.epochs, args.steps = 16, [1e-5], 2, 2
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; digits-mlp, {args.epochs} epochs (Adam 3e-3); woodfisher B = 128, "
          f"m = 256 per-sample gradients; obs; {args.steps} steps to {args.sparsity:.0%}; "
          f"{args.samples} weights audited per step on all training samples; seed {args.seed}")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for damping in args.dampings:
            config = {
                "model": {"name": "digits-mlp"},
                "train": {"epochs": args.epochs, "optimizer": "adam", "lr": 3e-3},
                "prune": {"sparsity": args.sparsity, "loss_samples": 2000, "audit_single": args.samples},
                "estimator": {"name": "woodfisher", "block_size": 128, "num_grads": 256,
                              "damping": damping},
                "scorer": {"name": "obs"},
                "schedule": {"name": "oneshot", "steps": args.steps},
                "run": {"progress": False, "seed": args.seed, "device": "cpu"},
            }
            result = execute_run(config, out=out, name=f"damping-{damping:g}", quiet=True).result
            before = 0.0
            for step in result["steps"]:
                audit = step["single_audit"]
                zeros = sum(1 for v in audit["measured"] if v == 0.0)
                rows.append((damping, step["step"], before, audit["spearman"], audit["pearson"],
                             step["predicted_loss_change"], step["measured_loss_change"], zeros))
                before = step["sparsity"]
            print(f"damping {damping:g}: dense accuracy {result['accuracy']['dense']:.4f}, "
                  f"pruned {result['accuracy']['pruned']:.4f}")
    print()
    print("| damping | step | sparsity before | Spearman ρ | Pearson r | measured exactly 0 | step ΔL predicted | step ΔL measured |")
    print("|---|---|---|---|---|---|---|---|")
    for damping, step, before, rho, r, pred, meas, zeros in rows:
        print(f"| {damping:g} | {step} | {before:.0%} | {rho:.3f} | {r:.3f} | {zeros}/{args.samples} | "
              f"{pred:.3g} | {meas:.3g} |")
    print()
    for damping in args.dampings:
        moderate = [row for row in rows if row[0] == damping and row[2] > 0]
        pick = moderate[-1] if moderate else [row for row in rows if row[0] == damping][-1]
        print(f"ratio single-weight Spearman at {pick[2]:.0%} sparsity, damping {damping:g}: "
              f"{pick[3]:.3f} (expected >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
