"""Models the benchmarks share (not benchmarks themselves: the leading underscore)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut. When the width doubles: option A
    (He et al., 2016, §4.2), the shortcut subsamples by 2 and zero-pads the new channels, so
    shortcuts add no parameters; option B, a strided 1×1 conv + BN (what channel pruning
    tools can follow: the zero pad is refused by curvprune and mis-grouped by DepGraph)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = c_out - c_in
        self.stride = stride
        self.down: nn.Module | None = None
        if shortcut == "B" and (stride > 1 or c_in != c_out):
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.down is not None:
            return F.relu(out + self.down(x))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNet20(nn.Sequential):
    """ResNet-20 for 32×32 images (He et al., 2016, §4.2): 3 stages of 3 blocks, 16/32/64 wide.

    With option-A shortcuts (the default) its conv and linear weights number 268,336 (0.27 M
    parameters in all); ``shortcut = "B"`` adds two 1×1 conv + BN downsamples.
    """

    def __init__(self, num_classes: int = 10, shortcut: str = "A") -> None:
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                   nn.ReLU()]
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(_BasicBlock(c_in, c_out, stride if i == 0 else 1, shortcut))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
        super().__init__(*layers)


if __name__ == "__main__":  # pragma: no cover
    model = ResNet20()
    n = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for p in [m.weight])
    print(n, model(torch.randn(2, 3, 32, 32)).shape)
