"""Accuracy against sparsity on the digits CNN: ``curvprune compare`` over the one-shot example configs.

Runs ``curvprune.run.compare.compare`` on examples/cnn-magnitude.toml, cnn-diagfisher-obs.toml,
cnn-woodfisher-obs.toml, cnn-woodfisher-obs-8steps.toml and cnn-mfac-unblocked-obs-8steps.toml:
one dense model per seed (trained once, cached), every method pruning a copy of it to each
sparsity, no fine-tuning; prints the comparison tables (mean ± std over seeds). Run:

    python benchmarks/compare_digits.py                 # 50-95 %, 1 seed (--seeds N for more)
    python -m benchmarks compare_digits                 # the suite: 2 seeds, 70/90/95 %
    python benchmarks/compare_digits.py --quick         # 3 configs on the digits MLP, 2 epochs, 50 %, m = 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from curvprune.config import load_raw_config
from curvprune.run.compare import compare

from _machine import describe

HEADLINE = r"^ratio .*$"
FULL_ARGS = ("--seeds", "2", "--sparsities", "0.7", "0.9", "0.95")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = ("cnn-magnitude.toml", "cnn-diagfisher-obs.toml", "cnn-woodfisher-obs.toml",
           "cnn-woodfisher-obs-8steps.toml", "cnn-mfac-unblocked-obs-8steps.toml")


def quick_variant(raw: dict) -> dict:
    """The same method on the digits MLP at CI size."""
    raw = {**raw, "model": {"name": "digits-mlp"}, "train": {**raw.get("train", {}), "epochs": 2}}
    if "estimator" in raw:
        raw["estimator"] = {**raw["estimator"], "num_grads": 16}
    if "schedule" in raw:
        raw["schedule"] = {**raw["schedule"], "steps": min(2, raw["schedule"].get("steps", 1))}
    raw["prune"] = {**raw.get("prune", {}), "loss_samples": 32}
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    raws = [load_raw_config(EXAMPLES / name) for name in CONFIGS]
    for raw in raws:
        raw.pop("__source__", None)
        raw.setdefault("run", {})["device"] = "cpu"
    if args.quick:  # three configs cover every code path
        raws = [quick_variant(r) for r in raws[:3]]
        args.sparsities, args.seeds = [0.5], 1
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; configs: {', '.join(CONFIGS[:len(raws)])}"
          + (" (quick: digits MLP, 2 epochs, m = 16, ≤ 2 steps)" if args.quick else "")
          + f"; sparsities {args.sparsities}; {args.seeds} seed(s); no fine-tuning")
    with tempfile.TemporaryDirectory() as out:
        folder = compare(raws, out=out, sparsities=args.sparsities, seeds=args.seeds, quiet=True)
        table = (folder / "comparison.md").read_text()
        summary = json.loads((folder / "comparison.json").read_text())["summary"]
    print()
    print("\n".join(line for line in table.splitlines()
                    if not line.startswith(("# ", "![", "## "))).strip())
    print()
    top = max(args.sparsities)
    for row in summary:
        if row["target"] == top and row["accuracy_pruned"] is not None:
            print(f"ratio accuracy right after pruning to {top:.0%}, {row['label']}: "
                  f"{row['accuracy_pruned']:.4f} (dense {row['accuracy_dense']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
