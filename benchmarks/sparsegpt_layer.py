"""Layer-wise OBS (sparsegpt plugin): magnitude/WANDA/SparseGPT/OBC layer errors, SparseGPT time.

1. Layer error ``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`` (the relative output error ‖WX − ŴX‖²/‖WX‖²) of
   magnitude (per layer), WANDA (per row), SparseGPT (layer-global adaptive masks, B = 128) and
   OBC-exact (layer-global selection from the per-row loss traces; N:M for 2:4) at 50 % and 2:4,
   on square layers with correlated inputs X = Z·Aᵀ, A = diag(e^g)·(I + mix·G/√d), g, G, Z
   standard normal, n = 8·d calibration vectors, float64, default damping 1 %.
2. SparseGPT time at 768×768 and 3072×768 (rows × d_in) with 128 × 512 calibration tokens in
   float32 (the reference precision): Hessian accumulation (batches of 8 sequences), the damped
   inverse factor, and the sweep at 50 % and 2:4; median of ``--repeats`` runs after a warm-up.

Run it from the repository root on a quiet machine::

    python benchmarks/sparsegpt_layer.py             # full (about a minute on one thread)
    python benchmarks/sparsegpt_layer.py --quick     # smoke run
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from _machine import describe, median_time

#: the suite's headline
HEADLINE = r"^ratio\b.*$"
DEVICES = ("cpu", "cuda")


def _plugin():  # noqa: ANN202 - the plugin is not installed by the meta-distribution yet
    try:
        import curvprune_sparsegpt
    except ImportError:
        src = Path(__file__).resolve().parents[1] / "plugins" / "sparsegpt" / "src"
        sys.path.insert(0, str(src))
        import curvprune_sparsegpt
    return curvprune_sparsegpt


def correlated(d: int, n: int, mix: float, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(d, generator=g, dtype=torch.float64))
    mixing = torch.eye(d, dtype=torch.float64) + mix * torch.randn(
        d, d, generator=g, dtype=torch.float64) / d ** 0.5
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z @ (scales[:, None] * mixing).T).to(device)


def errors(sizes: list[int], mixes: list[float], device: str) -> list[tuple[str, float]]:
    sg = _plugin()
    print("| layer (rows × d_in) | mix | pattern | magnitude | WANDA | SparseGPT | OBC-exact "
          "| SparseGPT / OBC |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    ratios = []
    for d in sizes:
        for mix in mixes:
            x = correlated(d, 8 * d, mix, seed=d, device=device)
            acc = sg.LayerHessian(d, dtype=torch.float64, device=device)
            acc.add_batch(x)
            h = acc.hessian
            w = torch.randn(d, d, generator=torch.Generator().manual_seed(d + 1),
                            dtype=torch.float64).to(device)
            base = float(torch.einsum("ri,ij,rj->", w, h, w))
            for pattern, kw in (("50 %", {"sparsity": 0.5}),
                                ("2:4", {"prune_n": 2, "prune_m": 4})):
                layer_kw = dict(kw, scope="layer") if "sparsity" in kw else kw
                res = {
                    "magnitude": sg.magnitude(w, **kw),
                    "WANDA": sg.wanda(w, acc, **kw),
                    "SparseGPT": sg.sparsegpt(w, acc, **layer_kw),
                    "OBC-exact": sg.obc(w, acc, **layer_kw),
                }
                err = {k: float(sg.layer_error(w, r.weight, h)) / base for k, r in res.items()}
                ratio = err["SparseGPT"] / err["OBC-exact"]
                ratios.append((f"{d}×{d} mix {mix} {pattern}", ratio))
                print(f"| {d}×{d} | {mix} | {pattern} | {err['magnitude']:.4g} "
                      f"| {err['WANDA']:.4g} | {err['SparseGPT']:.4g} | {err['OBC-exact']:.4g} "
                      f"| {ratio:.3f} |")
    return ratios


def time_shape(rows: int, d: int, seqs: int, tokens: int, repeats: int,
               device: str) -> tuple[float, float, float, float]:
    sg = _plugin()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(rows + d)
    x = torch.randn(seqs, tokens, d, generator=g).to(device)
    w = torch.randn(rows, d, generator=g).to(device)
    holder = {}

    def accumulate() -> None:
        acc = sg.LayerHessian(d, device=device)
        for part in torch.split(x, 8):
            acc.add_batch(part)
        sync()
        holder["acc"] = acc

    def factor() -> None:
        holder["f"] = holder["acc"].factor()
        sync()

    def sweep(**kw: float) -> None:
        sg.sparsegpt(w, holder["f"], **kw)
        sync()

    return (median_time(accumulate, repeats), median_time(factor, repeats),
            median_time(lambda: sweep(sparsity=0.5), repeats),
            median_time(lambda: sweep(prune_n=2, prune_m=4), repeats))


def timing(shapes: list[tuple[int, int]], seqs: int, tokens: int, repeats: int,
           device: str) -> None:
    print()
    print("| layer (rows × d_in) | calibration tokens | Hessian accumulation s | factor s "
          "| sweep 50 % s | sweep 2:4 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for rows, d in shapes:
        t_h, t_f, t_s, t_nm = time_shape(rows, d, seqs, tokens, repeats, device)
        print(f"| {rows}×{d} | {seqs}×{tokens} | {t_h:.3f} | {t_f:.4f} | {t_s:.3f} "
              f"| {t_nm:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--mixes", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--seqs", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="d ≤ 32, 8×64 tokens, 1 repeat")
    args = parser.parse_args(argv)
    shapes = [(768, 768), (3072, 768)]
    if args.quick:
        args.sizes, args.mixes, args.seqs, args.tokens, args.repeats = [16, 32], [0.2], 8, 64, 1
        shapes = [(96, 64), (384, 64)]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, device {args.device}")
    print(f"layer errors: square layers d = {args.sizes}, n = 8·d, mixes {args.mixes}, "
          "float64; timing: float32, "
          f"{args.seqs}×{args.tokens} tokens, {args.repeats} repeats (median)")
    print()
    ratios = errors(args.sizes, args.mixes, args.device)
    timing(shapes, args.seqs, args.tokens, args.repeats, args.device)
    print()
    for label, ratio in ratios:
        if "50 %" in label and " 0.2 " in f" {label} ":
            print(f"ratio SparseGPT / OBC-exact layer error ({label}): {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
