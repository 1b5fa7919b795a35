"""Per-sample gradients: GradientSource (torch.func vmap) against a Python loop of backward passes.

Both paths produce the same ``[n, d]`` matrix of per-sample gradients of the selected weights
(Conv2d and Linear weights, the default targets) of the digits models, for ``n`` random 1×8×8
inputs with random labels, in eval mode. A third column times bare ``vmap(grad(functional_call))``
(per-parameter gradients, no flat rows, no finiteness tracking): the ceiling for GradientSource.

Timings are taken in this one process: warm-up runs, then timed rounds in which the methods are
interleaved, reporting each method's median. Run it on a quiet machine (other busy processes
distort small-kernel CPU timings by large factors)::

    python benchmarks/per_sample_grads.py            # 256 samples, 7 rounds
    python benchmarks/per_sample_grads.py --quick    # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvprune
from curvprune import GradientSource, ParamLayout, select_parameters
from curvprune.run.models import DigitsCNN, DigitsMLP

from _machine import describe, median_time

#: the suite's headline: vmap against the loop (python -m benchmarks)
HEADLINE = r"^speed-up .*$"

MODELS: dict[str, Callable[[], nn.Module]] = {"digits-cnn": DigitsCNN, "digits-mlp": DigitsMLP}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=256, help="samples per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per method first")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="rows per vmap chunk (default: GradientSource's cache-sized default)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--quick", action="store_true", help="small CI-sized run: 32 samples, 1 warm-up, 2 repeats"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.warmup, args.repeats = 32, 1, 2
    for name in ("samples", "repeats", "chunk_size"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 1:
            flag = name.replace("_", "-")
            parser.error(f"--{flag} must be >= 1, got {getattr(args, name)}")
    return args


def loop_grads(model: nn.Module, layout: ParamLayout, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients by one forward and backward pass per sample (the baseline)."""
    params = layout.parameters(model)
    out = torch.empty(x.shape[0], layout.d, dtype=x.dtype)
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        torch.cat([g.reshape(-1) for g in grads], out=out[i])
    return out


def raw_func_grads(model: nn.Module, layout: ParamLayout) -> Callable[[Tensor, Tensor], dict]:
    """Bare ``vmap(grad(functional_call))``: per-parameter gradients, no flat rows, no checks.

    The ceiling for GradientSource, which adds the flat ``[n, d]`` layout and finiteness tracking.
    """
    named = {n: p.detach() for n, p in model.named_parameters()}
    selected = {n: named.pop(n) for n in layout.names}
    frozen = {**named, **dict(model.named_buffers())}

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, ({**frozen, **params},), (x[None],))
        return F.cross_entropy(out, y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    return lambda x, y: per_sample(selected, x, y)


def vmap_grads(source: GradientSource, x: Tensor, y: Tensor) -> list[Tensor]:
    """Per-sample gradients from GradientSource, as the ``[k, d]`` chunks an estimator consumes."""
    return list(source.iter_grads([(x, y)], x.shape[0]))


def consume_grads(source: GradientSource, x: Tensor, y: Tensor) -> int:
    """Stream the chunks as the pipeline does (each one handed on, then dropped); count rows."""
    return sum(chunk.shape[0] for chunk in source.iter_grads([(x, y)], x.shape[0]))


def median_seconds(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall time of each ``fn()`` over ``repeats`` rounds after ``warmup`` untimed ones.

    The methods are interleaved within each round, so a burst of load from another process
    slows all of them alike instead of one method's whole series.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def blocked_seconds(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall time of each ``fn()`` timed back to back (warm caches and allocator).

    Only meaningful on a quiet machine; :func:`median_seconds` is the load-robust figure.
    """
    return {name: median_time(fn, repeats, warmup) for name, fn in fns.items()}


def bench_model(name: str, args: argparse.Namespace) -> dict[str, float | int | str]:
    """Time both methods on one model; check they agree."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    layout = select_parameters(model)
    x = torch.randn(args.samples, 1, 8, 8)
    y = torch.randint(0, 10, (args.samples,))
    source = GradientSource(model, layout, chunk_size=args.chunk_size)

    fast, slow = torch.cat(vmap_grads(source, x, y)), loop_grads(model, layout, x, y)
    # float32 with different summation orders: agreement to ~1e-5 of the largest entry.
    max_diff = float((fast - slow).abs().max() / slow.abs().max())
    if max_diff > 1e-4:
        raise SystemExit(f"vmap and loop gradients disagree on {name}: rel. diff {max_diff:.2e}")

    raw = raw_func_grads(model, layout)
    fns = {
        "vmap": lambda: consume_grads(source, x, y),
        "loop": lambda: loop_grads(model, layout, x, y),
        "raw": lambda: raw(x, y),
    }
    t = median_seconds(fns, args.warmup, args.repeats)
    b = blocked_seconds(fns, args.warmup, args.repeats)
    t_vmap, t_loop, t_raw = t["vmap"], t["loop"], t["raw"]
    return {
        "model": name,
        "d": layout.d,
        "params": sum(p.numel() for p in model.parameters()),
        "vmap": args.samples / t_vmap,
        "loop": args.samples / t_loop,
        "raw": args.samples / t_raw,
        "ratio": t_loop / t_vmap,
        "blocked_vmap": args.samples / b["vmap"],
        "blocked_loop": args.samples / b["loop"],
        "blocked_raw": args.samples / b["raw"],
        "blocked_ratio": b["loop"] / b["vmap"],
        "diff": max_diff,
        "chunk": source.chunk_size,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    print(
        f"versions: torch {torch.__version__}, python {platform.python_version()}, "
        f"curvprune {curvprune.__version__}"
    )
    rows = [bench_model(name, args) for name in args.models]
    chunks = ", ".join(f"{r['model']} {r['chunk']}" for r in rows)
    print(
        f"sizes: {args.samples} samples of 1x8x8 (float32), rows per vmap chunk: {chunks}, "
        f"{args.warmup} warm-up + {args.repeats} timed rounds, methods interleaved (median)"
    )
    print()
    print(
        "| model | d (selected weights) | GradientSource (vmap) samples/s | loop samples/s "
        "| speed-up | bare torch.func samples/s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['d']} | {r['vmap']:.0f} | {r['loop']:.0f} | {r['ratio']:.1f}x "
            f"| {r['raw']:.0f} |"
        )
    print()
    print("back to back (each method's rounds in a row, warm caches; quiet machines only):")
    print()
    print("| model | GradientSource samples/s | loop samples/s | speed-up | bare torch.func samples/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['blocked_vmap']:.0f} | {r['blocked_loop']:.0f} "
            f"| {r['blocked_ratio']:.1f}x | {r['blocked_raw']:.0f} |"
        )
    print()
    for r in rows:
        print(
            f"speed-up (vmap over loop) on {r['model']}: {r['ratio']:.2f}x interleaved, "
            f"{r['blocked_ratio']:.2f}x back to back (max rel. diff {r['diff']:.1e})"
        )


if __name__ == "__main__":
    main()
