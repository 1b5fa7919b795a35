"""Loss-change audit against exact curvature: which part of OBS's single-weight prediction fails (digits MLP, float64).

The pipeline's audit (``loss_audit``) finds OBS's ρ_q = w_q²/(2[F⁻¹]_qq) ranking the measured
change of single-weight removals at Spearman 0.3-0.7 on the digits MLP. This script separates
the three suspects on the same MLP trained in float64 (Adam 3e-3, batch 64), in blocks of
B = 128 weights as WoodFisher uses them:

* the curvature estimate: ρ_q from the empirical Fisher of m per-sample gradients against ρ_q
  from the exact Gauss-Newton block (full training set);
* the first-order term ∇Lᵀδw, which OBS drops (it assumes a stationary point);
* the damping: ρ_q = ½δwᵀ(F₀ + λI)δw includes ½λ‖δw‖².

For a sample of weights, drawn from ``--blocks`` random blocks (only those blocks' exact
curvature is computed: B Hessian- and GGN-vector products per block), it measures the loss change
of removing each alone with its OBS update and prints Spearman's ρ of: ρ_q against the measured
change; ρ_q and ½δwᵀF₀δw against the measured change less ∇Lᵀδw; and ∇Lᵀδw + ½δwᵀHδw (H the
exact Hessian block, the local quadratic model without approximation) against the measured change.

    python benchmarks/loss_audit_exact.py            # 16 blocks, 12 weights each, 30 epochs
    python benchmarks/loss_audit_exact.py --quick    # hidden (16, 16), 2 epochs, 4 blocks
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp, vmap

from curvprune.config import DataConfig
from curvprune.pipeline.audit import spearman
from curvprune.run.data import build_data
from curvprune.run.models import DigitsMLP

from _digits import train_adam
from _machine import describe

HEADLINE = r"^ratio .*$"
BLOCK = 128


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, nargs=2, default=[128, 64])
    parser.add_argument("--num-grads", type=int, default=256, help="m for the empirical Fisher")
    parser.add_argument("--blocks", type=int, default=16, help="random blocks to sample from")
    parser.add_argument("--per-block", type=int, default=12, help="weights sampled per block")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.hidden, args.blocks, args.per_block = 2, [16, 16], 4, 6
        args.num_grads, args.dampings = 64, [1e-3]
    torch.manual_seed(args.seed)
    train = build_data(DataConfig(name="digits")).train
    x, y = (t.double() if t.is_floating_point() else t for t in train.tensors)
    model = DigitsMLP(hidden=tuple(args.hidden)).double()
    train_adam(model, torch.utils.data.TensorDataset(x, y), args.epochs)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_of(v: Tensor, inputs: Tensor = x, targets: Tensor = y) -> Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(v.split([s.numel() for s in shapes]),
                                                            shapes, strict=True)), strict=True))
        return F.cross_entropy(functional_call(model, params, (inputs,)), targets)

    base, gradient = loss_of(w).item(), grad(loss_of)(w)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}; digits-mlp hidden {tuple(args.hidden)}, d = {w.numel()}, "
          f"{args.epochs} epochs Adam in float64, loss {base:.4g}, ‖∇L‖ {gradient.norm():.3g}; "
          f"B = {BLOCK}, m = {args.num_grads}; {args.blocks} blocks × {args.per_block} weights; "
          f"seed {args.seed}")

    g = torch.Generator().manual_seed(args.seed)
    starts = _block_starts(shapes)
    chosen = starts[torch.randperm(len(starts), generator=g)[: args.blocks]]
    columns = chosen.unsqueeze(1) + torch.arange(BLOCK)  # [k, B] flat indices (may run past d)
    valid = (columns < w.numel()) & (columns < _block_end(starts, chosen).unsqueeze(1))
    picks = torch.stack([torch.randperm(int(v.sum()), generator=g)[: args.per_block] for v in valid])
    block_of = torch.arange(len(chosen)).repeat_interleave(args.per_block)
    row_in_block = picks.flatten()
    index = columns[block_of, row_in_block]

    sample = torch.randperm(x.shape[0], generator=g)[: args.num_grads]
    per_sample = vmap(grad(lambda v, a, b: loss_of(v, a[None], b[None])), in_dims=(None, 0, 0))
    grads = per_sample(w, x[sample], y[sample])  # [m, d]
    d = w.numel()
    empirical = _blocks_of(d, columns, valid, lambda e: (e @ grads.T) @ grads / args.num_grads)
    gauss_newton = _blocks_of(d, columns, valid, _ggn_product(model, names, shapes, w, x))
    hessian = _blocks_of(d, columns, valid, vmap(lambda v: jvp(grad(loss_of), (w,), (v,))[1]))

    def removal(curvature: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """δw [n, d], its block part [n, B], ρ_q [n], ½δwᵀF₀δw [n] for each OBS removal.

        Padding past a short block's end is decoupled (identity), so the block part is 0 there.
        """
        eye = torch.eye(BLOCK, dtype=torch.float64)
        inverse = torch.linalg.inv(curvature + damping * eye)[block_of]  # [n, B, B]
        diag = inverse[torch.arange(len(index)), row_in_block, row_in_block]
        local = -w[index].unsqueeze(1) * inverse[torch.arange(len(index)), :, row_in_block] / diag.unsqueeze(1)
        moves = torch.zeros(len(index), w.numel(), dtype=torch.float64)
        cols = columns[block_of]
        keep = valid[block_of]
        moves.scatter_add_(1, cols.clamp_max(w.numel() - 1) * keep, local * keep)  # padding adds 0
        rho = w[index].square() / (2 * diag)
        return moves, local, rho, rho - 0.5 * damping * local.square().sum(1)

    print()
    print("| curvature | damping | ρ_q vs measured | ρ_q vs measured − ∇Lᵀδw | ½δwᵀF₀δw vs measured − ∇Lᵀδw "
          "| ∇Lᵀδw + ½δwᵀHδw (exact H) vs measured | measured < 0 |")
    print("|---|---|---|---|---|---|---|")
    headline = {}
    for label, curvature in (("empirical Fisher", empirical), ("exact Gauss-Newton", gauss_newton)):
        for damping in args.dampings:
            moves, local, rho, undamped = removal(curvature, damping)
            losses = vmap(loss_of)(torch.cat([w.unsqueeze(0), w + moves]))  # one call: same sums
            measured = losses[1:] - losses[0]
            first = moves @ gradient
            local_h = torch.einsum("nb,nbc,nc->n", local, hessian[block_of], local) / 2
            row = (spearman(rho, measured), spearman(rho, measured - first),
                   spearman(undamped, measured - first), spearman(first + local_h, measured))
            headline[label, damping] = row
            print(f"| {label} | {damping:g} | " + " | ".join(f"{v:.3f}" for v in row)
                  + f" | {float((measured < 0).double().mean()):.0%} |")
    print()
    for (label, damping), row in headline.items():
        print(f"ratio {label}, damping {damping:g}: Spearman rho_q vs measured {row[0]:.3f}; "
              f"undamped curvature part vs measured - first order {row[2]:.3f}; exact local "
              f"model {row[3]:.3f}")
    return 0


def _block_starts(shapes: Sequence[torch.Size]) -> Tensor:
    """First flat index of every block of B weights (blocks never cross a parameter)."""
    starts, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        starts += range(offset, offset + n, BLOCK)
        offset += n
    return torch.tensor(starts)


def _block_end(starts: Tensor, chosen: Tensor) -> Tensor:
    """End (exclusive) of each chosen block: the next block's start, or d for the last."""
    ends = torch.cat([starts[1:], starts[-1:] + BLOCK])
    position = torch.searchsorted(starts, chosen)
    return ends[position]


def _blocks_of(d: int, columns: Tensor, valid: Tensor, product: Callable[[Tensor], Tensor]) -> Tensor:
    """``[k, B, B]`` diagonal blocks, at the chosen blocks, of a d × d operator.

    ``product`` maps ``[r, d]`` unit vectors to the operator's ``[r, d]`` columns. Entries past a
    short block's end are zero with a unit diagonal, so the damped block stays invertible and
    decoupled.
    """
    flat = columns.clamp_max(d - 1)
    out = torch.zeros(columns.shape[0], BLOCK, BLOCK, dtype=torch.float64)
    for b in range(columns.shape[0]):  # a block at a time: memory B × d; the work is B products
        units = torch.zeros(BLOCK, d, dtype=torch.float64)
        units[torch.arange(BLOCK), flat[b]] = 1.0
        mask = valid[b].unsqueeze(0) & valid[b].unsqueeze(1)
        out[b] = product(units)[:, flat[b]] * mask + torch.diag((~valid[b]).double())
    return out


def _ggn_product(model: torch.nn.Module, names: list[str], shapes: list[torch.Size], w: Tensor,
                 x: Tensor) -> Callable[[Tensor], Tensor]:
    """Columns of the Gauss-Newton matrix JᵀΛJ of the mean cross-entropy (Λ the softmax Hessian)."""
    sizes = [s.numel() for s in shapes]

    def outputs(v: Tensor) -> Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(v.split(sizes), shapes, strict=True)),
                          strict=True))
        return functional_call(model, params, (x,))

    logits, pullback = vjp(outputs, w)
    probs = logits.softmax(-1)

    def one(v: Tensor) -> Tensor:
        jv = jvp(outputs, (w,), (v,))[1]
        lam_jv = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)
        return pullback(lam_jv / x.shape[0])[0]

    return vmap(one)


if __name__ == "__main__":
    sys.exit(main())
