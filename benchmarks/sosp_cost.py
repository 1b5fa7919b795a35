"""SOSP-H (and SOSP-I) scoring cost per sample against one forward+backward pass, ResNet-20.

The model is a CIFAR ResNet-20 (3 stages of 3 BasicBlocks, 16/32/64 channels, 1×1-conv + BN
downsample shortcuts so the channel groups trace), random weights and random BatchNorm
statistics, on FakeData 32×32 (10 classes). Every scored structure: the 9 block-internal
channel groups and the 3 coupled stage streams, S = 448 structures.

Both passes run over the same pre-built batches with BN in eval mode, interleaved repeat by
repeat (the ratio is measured within each repeat, so machine load cancels to first order):

* baseline: ``loss.backward()`` to the parameters, per batch;
* SOSP-H: ``SospHScorer.score`` with the exact Hessian (the default: forward, gradient with
  ``create_graph``, one more reverse pass) and with ``hessian = "ggn"`` (dual-number forward,
  Λ, two reverse passes);
* SOSP-I (once, fewer samples): ``SospIScorer.score`` (per-sample C = 10 reverse passes,
  the S×S accumulation, greedy selection).

Usage::

    python benchmarks/sosp_cost.py            # 512 samples, batch 64, 5 repeats
    python benchmarks/sosp_cost.py --quick    # 64 samples, batch 32, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import curvprune
from curvprune import PruneContext, StructureGraph, select_parameters

from _machine import describe

HEADLINE = r"^ratio\b.*$"
FULL_ARGS = ("--samples", "512", "--repeats", "5")


class BasicBlock(nn.Module):
    """3×3 conv-BN-ReLU-3×3 conv-BN, plus identity or 1×1 conv-BN shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al. (2016) CIFAR ResNet-20 with option-B (projection) shortcuts."""

    def __init__(self, num_classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def randomise_bn(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=generator))


def fake_batches(samples: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from torchvision.datasets import FakeData
    from torchvision.transforms import ToTensor

    data = FakeData(size=samples, image_size=(3, 32, 32), num_classes=10,
                    transform=ToTensor(), random_offset=seed)
    x = torch.stack([data[i][0] for i in range(samples)])
    y = torch.tensor([int(data[i][1]) for i in range(samples)])
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]


def forward_backward(model: nn.Module, batches) -> None:
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 samples, 1 repeat")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sosp-i-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust to other processes on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples = args.samples or (64 if args.quick else 512)
    batch = args.batch or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 5)
    i_samples = args.sosp_i_samples or (32 if args.quick else 128)

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = ResNet20()
    randomise_bn(model, gen)
    model.eval()
    batches = fake_batches(samples, batch, args.seed)
    layout = select_parameters(model)
    layout = layout.with_structures(StructureGraph.trace(model).structures(layout))
    mask = torch.ones(layout.d, dtype=torch.bool)

    def ctx(n: int) -> PruneContext:
        return PruneContext(model=model, layout=layout, weights=layout.gather(model), mask=mask,
                            target_sparsity=0.5, batches=lambda: iter(batches),
                            loss_fn=F.cross_entropy)

    sosp_h = curvprune.create("scorer", "sosp-h", num_samples=samples, min_rank_correlation=0.0)
    sosp_g = curvprune.create("scorer", "sosp-h", num_samples=samples, min_rank_correlation=0.0,
                              hessian="ggn")
    sosp_i = curvprune.create("scorer", "sosp-i", num_samples=i_samples, min_rank_correlation=0.0)
    params = sum(p.numel() for p in model.parameters())

    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"model: ResNet-20 (CIFAR, option-B shortcuts), {params:,} parameters, "
          f"S = {layout.n_structures} structures in {len(layout.structures.groups)} groups; "
          f"FakeData 3×32×32, {samples} samples in batches of {batch}, BN eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forward_backward(model, batches[:1])  # warm-up
        sosp_h.score(ctx(samples))
        sosp_g.score(ctx(samples))
        base_t, h_t, g_t = [], [], []
        for _ in range(repeats):
            tick = time.perf_counter()
            forward_backward(model, batches)
            base_t.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            sosp_h.score(ctx(samples))
            h_t.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            sosp_g.score(ctx(samples))
            g_t.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        sosp_i.score(ctx(i_samples))
        i_time = time.perf_counter() - tick
        i_base = statistics.median(base_t) * i_samples / samples
    ratios = [h / b for h, b in zip(h_t, base_t, strict=True)]
    g_ratios = [g / b for g, b in zip(g_t, base_t, strict=True)]
    base, h, g = statistics.median(base_t), statistics.median(h_t), statistics.median(g_t)
    print()
    print("| pass | ms per sample | × forward+backward |")
    print("|---|---:|---:|")
    print(f"| forward+backward (loss.backward) | {1e3 * base / samples:.2f} | 1.00 |")
    print(f"| SOSP-H score, exact H (g and H𝟙) | {1e3 * h / samples:.2f} | "
          f"{statistics.median(ratios):.2f} |")
    print(f"| SOSP-H score, GGN (g and G𝟙) | {1e3 * g / samples:.2f} | "
          f"{statistics.median(g_ratios):.2f} |")
    print(f"| SOSP-I score (Q, S×S, greedy; {i_samples} samples, one run) | "
          f"{1e3 * i_time / i_samples:.2f} | {i_time / i_base:.2f} |")
    print()
    print(f"ratio SOSP-H / forward+backward: {statistics.median(ratios):.2f}x "
          f"(median of {repeats} interleaved repeats; "
          f"min {min(ratios):.2f}, max {max(ratios):.2f})")
    print("per-repeat ratios: " + ", ".join(f"{r:.2f}" for r in ratios)
          + " (the table's ms columns are medians taken separately)")
    print(f"SOSP-I jacobian mode: {sosp_i.ggn.mode}; matrix {layout.n_structures}² float32 = "
          f"{layout.n_structures ** 2 * 4 / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
