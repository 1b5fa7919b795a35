"""Peers (#19): per-sample gradients vs torch.func, BackPACK, Opacus, a loop; prune time vs d.

Part 1, per-sample gradients of the selected weights (Conv2d and Linear weights, the default
targets) for one batch of 128 samples, cross-entropy loss, models in eval mode, on an MLP
784-300-100-10 and a ResNet-20 (CIFAR-sized, written below), on one thread:

* **curvprune**: ``GradientSource(model, select_parameters(model)).iter_grads(batches, n)``,
  the public API, consumed chunk by chunk as an estimator would (``[k, d]`` rows);
* **torch.func vmap(grad)**: bare ``vmap(grad(functional_call))`` over the whole batch
  (per-parameter gradients, no flat rows, no finiteness tracking);
* **BackPACK** ``BatchGrad`` (``extend(model, use_converter=True)`` for the ResNet's residual
  additions) and **Opacus** ``GradSampleModule``: optional (``pip install -e '.[bench]'``), each
  skipped with a note when it does not import or cannot handle the model;
* **per-sample loop**: one forward and backward pass per sample.

Every method's gradients are checked against curvprune's rows first (untimed); then all run in
interleaved rounds and each method's median is reported, as a ratio to curvprune (lower is
faster).

Part 2, one-shot prune time against d: the whole ``Pipeline.prune`` (per-sample gradients,
curvature, OBS scores and update, masks) to 50 % with the ``obs`` scorer on MLPs 784-h-10 whose
selected weights number about 0.1 M, 0.4 M and 1.6 M, for ``woodfisher`` (B = 128, ``auto``) and
``mfac`` (static, B = 128), m = 128 per-sample gradients, damping 1e-4; and the gradient phase
alone (``GradientSource``, same m) for the share it takes.

::

    python benchmarks/peers.py            # batch 128, 5 rounds, d up to 1.6 M (a few minutes)
    python benchmarks/peers.py --quick    # smoke run (< 60 s): small batch, one round, small d
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvprune
from curvprune import GradientSource, ParamLayout, Pipeline, select_parameters

from _machine import describe

#: the suite's headline lines (python -m benchmarks)
HEADLINE = r"^ratio .*$"


# -- models -------------------------------------------------------------------------------------
def mlp(hidden: tuple[int, ...] = (300, 100), inputs: int = 784, classes: int = 10) -> nn.Module:
    """An MLP ``inputs``-``hidden``-``classes`` with ReLUs (784-300-100-10 by default)."""
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """ResNet basic block: two 3×3 conv-BN layers; a 1×1 conv-BN shortcut when the shape
    changes (option B, so that BackPACK's converter sees only modules and additions)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def resnet20(classes: int = 10) -> nn.Module:
    """ResNet-20 for 3×32×32 inputs (He et al. 2016, §4.2): 3 stages of 3 blocks, 16/32/64 wide."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU()]
    c_in = 16
    for c_out, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(c_in, c_out, stride if i == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
    return nn.Sequential(*layers)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics (eval mode uses them)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.num_features, generator=gen))
    return model


# -- per-sample gradient methods ----------------------------------------------------------------
Method = Callable[[Tensor, Tensor], list[Tensor]]


def only_selected(model: nn.Module, layout: ParamLayout) -> nn.Module:
    """A copy of ``model`` in which only the selected weights require gradients."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in layout.names)
    return model.eval()


def curvprune_method(model: nn.Module, layout: ParamLayout) -> Method:
    """The public API: ``[k, d]`` chunks from GradientSource, consumed one by one."""
    source = GradientSource(model, layout)

    def run(x: Tensor, y: Tensor) -> list[Tensor]:
        return list(source.iter_grads([(x, y)], x.shape[0]))

    return run


def vmap_method(model: nn.Module, layout: ParamLayout) -> Method:
    """Bare ``vmap(grad(functional_call))`` over the batch."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    selected = {n: named.pop(n) for n in layout.names}
    frozen = {**named, **dict(model.named_buffers())}

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, ({**frozen, **params},), (x[None],)),
                               y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))

    def run(x: Tensor, y: Tensor) -> list[Tensor]:
        out = per_sample(selected, x, y)
        return [out[n] for n in layout.names]

    return run


def loop_method(model: nn.Module, layout: ParamLayout) -> Method:
    """One forward and backward pass per sample."""
    model = only_selected(model, layout)
    params = layout.parameters(model)

    def run(x: Tensor, y: Tensor) -> list[Tensor]:
        rows = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
                for i in range(x.shape[0])]
        return [torch.stack(g) for g in zip(*rows, strict=True)]

    return run


def backpack_method(model: nn.Module, layout: ParamLayout) -> Method:
    """BackPACK's BatchGrad (gradients of the mean loss's terms, scaled back by the batch)."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    residual = any(isinstance(m, Block) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = extend(only_selected(model, layout), use_converter=residual)
    lossfn = extend(nn.CrossEntropyLoss())
    names = dict(net.named_parameters()) if not residual else None

    def params_of() -> list[Tensor]:
        if names is not None:
            return [names[n] for n in layout.names]
        # the converter renames modules; the selected weights are the trainable ones, in order
        return [p for p in net.parameters() if p.requires_grad]

    def run(x: Tensor, y: Tensor) -> list[Tensor]:
        net.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            lossfn(net(x), y).backward()
        return [p.grad_batch * x.shape[0] for p in params_of()]

    return run


def opacus_method(model: nn.Module, layout: ParamLayout) -> Method:
    """Opacus's GradSampleModule (hooks; with ``loss_reduction="mean"`` it scales the samples'
    gradients back by the batch size itself)."""
    from opacus import GradSampleModule

    net = GradSampleModule(only_selected(model, layout), loss_reduction="mean")
    # Opacus records activations only in training mode; BatchNorm stays in eval mode (running
    # statistics, as for the other methods: no mixing of samples)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    params = [dict(net._module.named_parameters())[n] for n in layout.names]

    def run(x: Tensor, y: Tensor) -> list[Tensor]:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        return [p.grad_sample for p in params]

    return run


def closed_form_method(model: nn.Module, layout: ParamLayout) -> Method:
    """Closed-form rows for Conv2d and Linear weights (the candidate of issue #19, not adopted).

    One batched forward and backward record each selected layer's input x and output gradient
    g; a Conv2d's per-sample weight gradient is g[n] (C_out × L) @ unfold(x[n])ᵀ and a Linear's
    g[n] ⊗ x[n], each one batched GEMM straight into the parameter's columns of a ``[n, d]``
    buffer (weights only, groups = 1, as in the models here).
    """
    model = only_selected(model, layout)
    modules = dict(model.named_modules())
    owners = [modules[name.rsplit(".", 1)[0]] for name in layout.names]

    def run(x: Tensor, y: Tensor) -> list[Tensor]:
        seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            seen[module] = (inputs[0].detach(), output)

        handles = [m.register_forward_hook(record) for m in owners]
        try:
            losses = F.cross_entropy(model(x), y, reduction="none")
            backs = torch.autograd.grad(losses.sum(), [seen[m][1] for m in owners])
        finally:
            for handle in handles:
                handle.remove()
        n = x.shape[0]
        rows = torch.empty(n, layout.d)
        for m, g, start, size in zip(owners, backs, layout.offsets[:-1], layout.sizes,
                                     strict=True):
            inputs = seen[m][0]
            out = rows[:, start : start + size].view(n, m.weight.shape[0], -1)
            if isinstance(m, nn.Conv2d):
                unfolded = F.unfold(inputs, m.kernel_size, m.dilation, m.padding, m.stride)
                torch.bmm(g.reshape(n, g.shape[1], -1), unfolded.mT, out=out)
            else:
                torch.bmm(g.unsqueeze(2), inputs.unsqueeze(1), out=out)
        return [rows]

    return run


METHODS: dict[str, Callable[[nn.Module, ParamLayout], Method]] = {
    "curvprune GradientSource": curvprune_method,
    "torch.func vmap(grad)": vmap_method,
    "BackPACK BatchGrad": backpack_method,
    "Opacus GradSampleModule": opacus_method,
    "per-sample loop": loop_method,
    "closed form, unfold + bmm": closed_form_method,
}


def rows_of(grads: list[Tensor], layout: ParamLayout) -> Tensor:
    """Per-parameter per-sample gradients (or ``[k, d]`` chunks) as one ``[n, d]`` matrix."""
    if grads and grads[0].dim() == 2 and grads[0].shape[1] == layout.d:
        return torch.cat(grads)
    return layout.flatten(grads)


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int,
                        rounds: int) -> dict[str, float]:
    """Median seconds of each ``fn()``, methods interleaved within each round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def per_sample_part(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Time every method on both models; returns the notes and ``{model: {method: cell}}``."""
    notes: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    ratios: dict[str, dict[str, float]] = {}
    models = {
        "MLP 784-300-100-10": (mlp(), (784,)),
        "ResNet-20": (randomize_bn(resnet20()), (3, 32, 32)),
    }
    for label, (model, shape) in models.items():
        torch.manual_seed(0)
        model.eval()
        layout = select_parameters(model)
        x = torch.randn(args.batch, *shape)
        y = torch.randint(0, 10, (args.batch,))
        fns: dict[str, Callable[[], object]] = {}
        reference: Tensor | None = None
        for name, build in METHODS.items():
            try:
                method = build(model, layout)
                got = rows_of(method(x, y), layout)
            except ImportError as exc:
                notes.append(f"{name} skipped: not importable ({exc.name}); "
                             "pip install -e '.[bench]'")
                continue
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run this model
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                notes.append(f"{name} skipped on {label}: {type(exc).__name__}: {first[:160]}")
                continue
            if reference is None:
                reference = got
            else:
                diff = float((got - reference).abs().max() / reference.abs().max())
                if diff > 1e-3:
                    raise SystemExit(f"{name} disagrees with curvprune on {label}: "
                                     f"rel. diff {diff:.1e}")
            fns[name] = lambda method=method, x=x, y=y: method(x, y)
        t = interleaved_medians(fns, args.warmup, args.rounds)
        base = t["curvprune GradientSource"]
        cells[label] = {name: f"{secs / base:.2f} ({1e3 * secs:.0f} ms)"
                        for name, secs in t.items()}
        ratios[label] = {name: secs / base for name, secs in t.items()}
        print(f"sizes: {label}: d = {layout.d} selected weights, batch {args.batch}, "
              f"GradientSource chunk {GradientSource(model, layout).chunk_size} rows",
              flush=True)
    vm = "torch.func vmap(grad)"
    parts = [f"{label} {1 / r[vm]:.2f}x" for label, r in ratios.items() if vm in r]
    print(f"ratio GradientSource / vmap(grad) time: {', '.join(parts)}")
    return notes, cells


# -- one-shot prune against d -------------------------------------------------------------------
def prune_part(args: argparse.Namespace) -> list[tuple[int, dict[str, float]]]:
    """Median seconds of a one-shot prune per estimator, and of the gradients alone, per d."""
    out = []
    m = args.num_grads
    for target in args.d:
        hidden = max(1, round(target / 794))
        torch.manual_seed(0)
        model = mlp((hidden,)).eval()
        layout = select_parameters(model)
        gen = torch.Generator().manual_seed(0)
        data = [(torch.randn(m, 784, generator=gen), torch.randint(0, 10, (m,), generator=gen))]
        fns: dict[str, Callable[[], object]] = {}
        for name, extra in (("woodfisher", {"block_size": 128}),
                            ("mfac", {"block_size": 128, "fisher_mini_batch": 1})):
            pipe = Pipeline.from_config({
                "prune": {"sparsity": 0.5, "loss_samples": 0},
                "estimator": {"name": name, "num_grads": m, "damping": 1e-4, **extra},
                "scorer": {"name": "obs"},
                "schedule": {"name": "oneshot", "steps": 1},
                "mask": {"name": "global"},
            })
            fns[name] = lambda pipe=pipe, model=model, data=data: pipe.prune(
                copy.deepcopy(model), data)
        source = GradientSource(model, layout)
        fns["gradients"] = lambda source=source, data=data: sum(
            c.shape[0] for c in source.iter_grads(data, m))
        t = interleaved_medians(fns, 0, args.prune_rounds)
        out.append((layout.d, t))
        print(f"sizes: prune MLP 784-{hidden}-10: d = {layout.d}, m = {m}", flush=True)
    return out


# -- main ---------------------------------------------------------------------------------------
def version_of(dist: str) -> str:
    """The installed version of ``dist``, or ``absent``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=128, help="samples per batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--d", type=float, nargs="+", default=[1e5, 4e5, 1.6e6],
                        help="selected weights of the prune-scaling MLPs")
    parser.add_argument("--num-grads", type=int, default=128, help="m of the prunes")
    parser.add_argument("--prune-rounds", type=int, default=3, help="timed prunes per d")
    parser.add_argument("--part", choices=("all", "grads", "prune"), default="all",
                        help="run only the per-sample gradients or the prune scaling")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 16, one round, d 10k and 40k, m = 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.warmup = 16, 1, 0
        args.d, args.num_grads, args.prune_rounds = [1e4, 4e4], 16, 1
    for name in ("batch", "rounds", "threads", "num_grads", "prune_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # BackPACK's hooks on a model whose inputs need no gradient: harmless, said every pass
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    print(f"machine: {describe()}")
    print(f"versions: torch {torch.__version__}, python {platform.python_version()}, "
          f"curvprune {curvprune.__version__}, backpack-for-pytorch "
          f"{version_of('backpack-for-pytorch')}, opacus {version_of('opacus')}")
    print(f"threads: {torch.get_num_threads()}; {args.warmup} warm-up + {args.rounds} timed "
          "rounds, methods interleaved, medians")
    notes, cells = per_sample_part(args) if args.part in ("all", "grads") else ([], {})
    prunes = prune_part(args) if args.part in ("all", "prune") else []
    labels = list(cells)
    if cells:
        print()
        print(f"| per-sample gradients, batch {args.batch}, {args.threads} thread(s): time / "
              f"curvprune (median) | {' | '.join(labels)} |")
        print("|---|" + "---:|" * len(labels))
        for name in METHODS:
            row = [cells[label].get(name, "skipped") for label in labels]
            print(f"| {name} | {' | '.join(row)} |")
    if not prunes:
        for note in notes:
            print(f"note: {note}")
        return 0
    print()
    print(f"| d (selected weights) | woodfisher one-shot (s) | mfac one-shot (s) | gradients "
          f"alone, m = {args.num_grads} (s) | gradients / woodfisher | gradients / mfac |")
    print("|---:|---:|---:|---:|---:|---:|")
    for d, t in prunes:
        g = t["gradients"]
        print(f"| {d:,} | {t['woodfisher']:.2f} | {t['mfac']:.2f} | {g:.2f} | "
              f"{g / t['woodfisher']:.0%} | {g / t['mfac']:.0%} |")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
