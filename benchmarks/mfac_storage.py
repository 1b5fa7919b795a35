"""M-FAC's gradient matrix stored in half precision (``storage_dtype``) against float32.

The static unblocked M-FAC estimator (m = ``--num-grads`` mean-loss gradients of mini-batches of
32, λ = 1e-6, the unblocked settings of the methods page) on the trained digits MLP, with G
stored in float32, bfloat16 and float16 (computed in float32 in every case):

* the relative error of the inverse diagonal and of one IHVP (the OBS update direction of the
  90 % step) against float32 storage, on the same gradients;
* one-shot OBS pruning to 90 % in 4 steps (global mask): the fraction of the weights whose
  keep/prune decision differs from float32 storage, and the test accuracy right after;
* the estimator's bytes (G and Ŵ) from ``memory_bytes``.

Means over ``--seeds`` gradient draws::

    python benchmarks/mfac_storage.py            # m = 256, 3 seeds
    python benchmarks/mfac_storage.py --quick    # m = 32, 1 seed
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

import curvprune
from curvprune import Pipeline, select_parameters
from curvprune.testing.digits import DigitsMLP, digits_loaders

from _digits import accuracy, train_adam
from _machine import describe

HEADLINE = r"^ratio .*$"
STORAGES = ("float32", "bfloat16", "float16")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--num-grads", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    parser.add_argument("--quick", action="store_true", help="m = 32, 1 seed, 5 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_grads, args.seeds, args.epochs = 32, 1, 5
    return args


def _estimator(storage: str, m: int) -> dict:
    return {"name": "mfac", "algorithm": "static", "block_size": None, "num_grads": m,
            "fisher_mini_batch": 32, "damping": 1e-6, "storage_dtype": storage}


def _data(dataset, seed: int) -> DataLoader:
    """The same shuffled order for every storage of one seed."""
    return DataLoader(dataset, batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def _queries(dense: torch.nn.Module, data: DataLoader, storage: str, m: int, seed: int):
    estimator = curvprune.create("estimator", "mfac", **{
        k: v for k, v in _estimator(storage, m).items() if k != "name"})
    layout = select_parameters(dense)
    source = curvprune.GradientSource(dense, layout, fisher_mini_batch=32,
                                      generator=torch.Generator().manual_seed(seed))
    estimator.setup(layout.sizes)
    torch.manual_seed(seed)
    for chunk in source.iter_grads(data, m):
        estimator.update(chunk)
    diagonal = estimator.inverse_diagonal()
    w = layout.gather(dense)
    direction = estimator.ihvp(w / diagonal)  # the OBS update's direction, all weights
    return diagonal, direction


def _prune(dense: torch.nn.Module, data: DataLoader, storage: str, m: int, seed: int):
    model = DigitsMLP()
    model.load_state_dict(dense.state_dict())
    torch.manual_seed(seed)
    pipeline = Pipeline.from_config({
        "estimator": _estimator(storage, m), "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot", "steps": 4}, "mask": {"name": "global"},
        "prune": {"sparsity": 0.9, "loss_samples": 0},
    })
    result = pipeline.prune(model, data)
    return model, result.masks.flat


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    loaders = digits_loaders(batch_size=64)
    dense = train_adam(DigitsMLP(), loaders.train.dataset, args.epochs)
    test_set = loaders.test.dataset
    d = select_parameters(dense).d
    rows: dict[str, dict[str, list[float]]] = {s: {} for s in STORAGES}
    for seed in range(args.seeds):
        train = loaders.train.dataset
        base_diag, base_dir = _queries(dense, _data(train, seed), "float32", args.num_grads,
                                       seed)
        _, base_mask = _prune(dense, _data(train, seed), "float32", args.num_grads, seed)
        for storage in STORAGES:
            diag, direction = _queries(dense, _data(train, seed), storage, args.num_grads, seed)
            model, mask = _prune(dense, _data(train, seed), storage, args.num_grads, seed)
            got = rows[storage]
            got.setdefault("diag", []).append(float(((diag - base_diag).abs() / base_diag).max()))
            got.setdefault("ihvp", []).append(
                float((direction - base_dir).norm() / base_dir.norm()))
            got.setdefault("flips", []).append(float((mask != base_mask).double().mean()))
            got.setdefault("acc", []).append(accuracy(model, test_set))
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; digits MLP ({d:,} weights, dense accuracy "
          f"{accuracy(dense, test_set):.3f}), unblocked static mfac m = {args.num_grads}, "
          f"mini-batch 32, λ = 1e-6; one-shot 90 % in 4 steps; mean of {args.seeds} seeds")
    print()
    print("| storage | estimator bytes (G and the m×m matrices) | max rel. error of diag F⁻¹ "
          "| rel. error of the OBS IHVP | decisions differing from float32 | accuracy at 90 % |")
    print("|---|---:|---:|---:|---:|---:|")
    cls = type(curvprune.create("estimator", "mfac"))
    for storage in STORAGES:
        cfg = curvprune.create("estimator", "mfac", **{
            k: v for k, v in _estimator(storage, args.num_grads).items() if k != "name"}).config
        size = cls.memory_bytes(select_parameters(dense).sizes, cfg)
        r = {k: statistics.mean(v) for k, v in rows[storage].items()}
        print(f"| {storage} | {size / 2**20:.1f} MiB | {r['diag']:.1e} | {r['ihvp']:.1e} | "
              f"{100 * r['flips']:.2f} % | {r['acc']:.3f} |")
    print()
    for storage in STORAGES[1:]:
        r = {k: statistics.mean(v) for k, v in rows[storage].items()}
        f32 = statistics.mean(rows["float32"]["acc"])
        print(f"ratio {storage}: IHVP error {r['ihvp']:.1e}, {100 * r['flips']:.2f} % of "
              f"decisions differ, accuracy {r['acc']:.3f} vs {f32:.3f} in float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
